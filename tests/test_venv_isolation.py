"""Each clone tests its own code, even though clones share one virtual environment for the dependencies."""

import subprocess
import sys
from pathlib import Path

import semisparse
from helpers import paths

ROOT = paths.ROOT


def test_this_process_imports_this_checkouts_source():
    assert Path(semisparse.__file__).resolve().is_relative_to(ROOT / "src")


def test_subprocesses_import_this_checkouts_source():
    """Subprocesses (CLI runs, DDP workers) must not pick up another clone's editable install."""
    out = subprocess.run([sys.executable, "-c", "import semisparse; print(semisparse.__file__)"],
                         capture_output=True, text=True, check=True, cwd="/")
    assert Path(out.stdout.strip()).resolve().is_relative_to(ROOT / "src")
