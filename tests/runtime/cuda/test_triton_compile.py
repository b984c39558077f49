"""The Triton kernels compile for Hopper and Ampere here, without a GPU (``tests/helpers/triton_aot.py``).

The interpreter runs kernels as numpy and accepts code the compiler refuses (a constexpr misuse, a dtype the
backend cannot lower); the GPU run is rare and short, so a compile error found there costs the whole run.
The compiler needs ``TRITON_INTERPRET`` off when Triton is imported, which conftest turns on: each check runs in
its own process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import paths

pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.compiler import ASTSource  # noqa: F401
except ImportError:  # pragma: no cover - Triton before 3.0
    pytest.skip("this Triton has no ahead-of-time compile API", allow_module_level=True)

ROOT = paths.ROOT


def compile_all(cache: Path, *args: str) -> subprocess.CompletedProcess:
    """``tests/helpers/triton_aot.py args`` in its own process with an empty Triton cache: a real compile."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(cache), PYTHONPATH=os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "triton_aot.py"), *args], env=env,
                          capture_output=True, text=True, timeout=900)


def check(proc: subprocess.CompletedProcess) -> None:
    if "no such file" in proc.stderr.lower() and "ptxas" in proc.stderr:  # pragma: no cover
        pytest.skip("this Triton wheel has no ptxas")
    assert proc.returncode == 0, proc.stderr[-4000:]
    compiled = [ln for ln in proc.stdout.splitlines() if ln.startswith("ok ")]
    assert len(compiled) >= 8, proc.stdout


def test_every_kernel_compiles_for_hopper(tmp_path):
    """Each kernel, with each specialisation axis (dtype, index width, tile, split-k, bias, N:M) once, for sm_90."""
    check(compile_all(tmp_path, "--arch", "90"))


@pytest.mark.slow
def test_every_specialisation_compiles_for_hopper_and_ampere(tmp_path):
    check(compile_all(tmp_path, "--arch", "90", "80", "--full"))


def test_a_kernel_the_compiler_refuses_fails_the_check(tmp_path):
    """The check can fail: a kernel whose block shape is not a power of two is refused by the compiler (the
    interpreter would run it)."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests" / "helpers")]))
    code = (
        "import triton.language as tl, sys\n"
        "from triton_aot import compile_for\n"
        "def bad(x_ptr, BLOCK: tl.constexpr):\n"
        "    tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)\n"
        "try:\n"
        "    compile_for(90, bad, {'x_ptr': '*fp32'}, {'BLOCK': 12}, 4)\n"
        "except Exception as exc:\n"
        "    print('refused', type(exc).__name__); sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    script = tmp_path / "bad_kernel.py"
    script.write_text(code)  # a file, so Triton can read the kernel's source
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "refused" in proc.stdout, proc.stdout + proc.stderr
