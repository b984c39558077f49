"""Editing a compressed checkpoint file for tests: read it, change tensors or header, write it elsewhere."""

from __future__ import annotations

import json

from safetensors import safe_open
from safetensors.torch import save_file


def resave(path, out, edit_tensors=None, edit_header=None, digest_of=None):
    """Write ``path`` again at ``out`` with edits; the digest is kept (so the edit is caught by it) unless
    ``digest_of(header, tensors)`` recomputes it (so only the semantic checks remain). Returns ``out``."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        header = json.loads(f.metadata()["semisparse"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_header:
        edit_header(header)
    if digest_of:
        header["digest"] = digest_of(header, tensors)
    save_file(tensors, str(out), metadata={"semisparse": json.dumps(header)})
    return out
