"""Compile semisparse's Triton kernels for an NVIDIA target on a machine without a GPU.

``triton.compile`` with an explicit ``GPUTarget`` runs the whole pipeline (frontend, MLIR passes, LLVM, ``ptxas``
for the cubin) on the CPU. The interpreter tests check what the kernels compute; this checks that the compiler
accepts them, in the specialisations the launchers use. Run as a script in its own process
(``TRITON_INTERPRET`` must be off when Triton is imported, and the test suite turns it on):

    TRITON_INTERPRET=0 PYTHONPATH=src python tests/helpers/triton_aot.py --arch 90 [--full] [--resources]

It prints one line per kernel compiled (``--resources``: with its registers and spill bytes) and exits 1 after
the first that fails, with the compiler's message. Checked with Triton 3.8.0 (this machine's) and 3.6.0 (the GPU
machine's, installed beside it with numpy 2.2): all 666 ``--full`` specialisations compile for sm_90 and sm_80.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from math import comb


def specs(full: bool) -> list[tuple]:
    """``(kernel name, argument types, constexprs, num_warps)``: every axis of each kernel's specialisation at
    least once; ``full``: the product of them (dtype x index width x tile x split/bias)."""
    from semisparse.masking import sampling_triton as st
    from semisparse.runtime.cuda import kernels as tc

    out = []
    tiles = {(c.block_out, c.block_k, c.block_batch, c.num_warps)
             for positions in (1, 8, 64, 4096) for c in tc.configs_for(positions, 307, 4)}
    biggest = max(tiles, key=lambda t: t[0] * t[1] * t[2])

    def cf(dtype, u16, tile, split, bias):
        bo, bk, bb, warps = tile
        types = {"x_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "b_ptr": f"*{dtype}",
                 "y_ptr": f"*{dtype}" if split == 1 else "*fp32", "i_ptr": "*i16" if u16 else "*i32",
                 "perm_ptr": "*i64"}
        return (tc._cf_kernel, types, dict(BO=bo, BK=bk, BB=bb, SPLIT=split, U16=u16, HAS_BIAS=bias), warps)

    if full:
        for dtype in ("fp32", "bf16", "fp16"):
            for u16 in (False, True):
                for tile in sorted(tiles):
                    for split, bias in ((1, True), (4, False)):
                        out.append(cf(dtype, u16, tile, split, bias))
    else:
        out += [cf("fp32", False, (4, 128, 1, 4), 1, True), cf("bf16", True, biggest, 1, False),
                cf("fp16", False, (8, 64, 16, 4), 4, True)]
    for dtype in ("fp32", "bf16", "fp16") if full else ("bf16",):
        out.append((tc._cf_reduce_kernel, {"part_ptr": "*fp32", "b_ptr": f"*{dtype}", "perm_ptr": "*i64",
                                           "y_ptr": f"*{dtype}"}, dict(SPLIT=4, HAS_BIAS=True, BM=16, BR=64), 4))

    strides = dict(s_o="i64", s_c="i64", s_t="i64")
    for dtype, (n, m) in [(d, nm) for d in ("fp32", "bf16") for nm in ((2, 4), (1, 4), (2, 8))] if full else \
            [("bf16", (2, 4)), ("fp32", (2, 8))]:
        p = comb(m, n)
        p_pad, m_pad = 1 << (p - 1).bit_length(), 1 << (m - 1).bit_length()
        shape = dict(P=p, M=m, P_PAD=p_pad, M_PAD=m_pad, BLOCK=st._block(p_pad, m_pad))
        out.append((st._forward_kernel, dict(logits_ptr="*fp32", u_ptr="*fp32", y_ptr="*fp32", w_ptr=f"*{dtype}",
                                             out_ptr=f"*{dtype}", table_ptr="*fp32", scale="fp32", **strides),
                    shape, 4))
        for weight_grad in (False, True):
            out.append((st._backward_kernel, dict(y_ptr="*fp32", gout_ptr=f"*{dtype}", w_ptr=f"*{dtype}",
                                                  gl_ptr="*fp32", gw_ptr=f"*{dtype}", table_ptr="*fp32",
                                                  inv_tau="fp32", coef="fp32", **strides),
                        dict(shape, WEIGHT_GRAD=weight_grad), 4))
    return out


def compile_for(arch: int, fn, types: dict[str, str], consts: dict, num_warps: int):
    """``fn`` compiled to a cubin for ``sm_<arch>``; scalar arguments not named in ``types`` are ``i32``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    names = list(inspect.signature(fn).parameters)
    unknown = (set(types) | set(consts)) - set(names)
    if unknown:
        raise ValueError(f"not arguments of {fn.__name__}: {sorted(unknown)}")
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    src = ASTSource(fn=JITFunction(fn), signature=sig,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    if not kernel.asm.get("cubin"):
        raise RuntimeError("the compiler produced no cubin")
    return kernel


def resources(kernel, arch: int) -> str:
    """Registers per thread and spill bytes of a compiled kernel, from the bundled ``ptxas -v`` (the
    ``CompiledKernel`` only learns them when it is loaded on a GPU)."""
    import re
    import subprocess
    import tempfile

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    target = re.search(r"^\.target\s+(\S+)", kernel.asm["ptx"], re.M)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as fh:
            fh.write(kernel.asm["ptx"])
        arch_name = target.group(1) if target else f"sm_{arch}"
        out = subprocess.run([ptxas, f"-arch={arch_name}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return f"regs={regs.group(1) if regs else '?'} spill_stores={spills.group(1) if spills else '?'}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 90 80")
    p.add_argument("--full", action="store_true", help="every combination, not every axis once")
    p.add_argument("--resources", action="store_true", help="also registers and spills per kernel (ptxas -v)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET must be off for the compiler", file=sys.stderr)
        return 2
    import triton

    print(f"triton {triton.__version__}")
    for arch in args.arch:
        for fn, types, consts, warps in specs(args.full):
            what = f"sm_{arch} {fn.__name__} {types.get('x_ptr') or types.get('w_ptr') or types.get('b_ptr')} " \
                   f"{consts} warps={warps}"
            t0 = time.perf_counter()
            try:
                kernel = compile_for(arch, fn, types, consts, warps)
            except Exception as exc:  # the compiler's own message is the point
                print(f"FAILED {what}\n{type(exc).__name__}: {exc}", file=sys.stderr)
                return 1
            extra = f" {resources(kernel, arch)}" if args.resources else ""
            print(f"ok {time.perf_counter() - t0:5.2f}s {what}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
