"""Where the checkout's folders are, for tests that start subprocesses or read the repository's files."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
