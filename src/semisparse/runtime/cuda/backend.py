"""The 2:4 GEMM back-end: cuSPARSELt through ``torch._cslt_*``, or an emulation of it for CPU tests.

A back-end does three things to a weight ``W (out, K)`` that is 2:4 along K and an activation ``x (T, K)``:

* ``compress(W)`` -> an opaque packed tensor (kept values + metadata), once at deploy time;
* ``search(packed, x.t(), bias)`` -> the fastest algorithm id for that problem size, once at deploy time;
* ``mm(packed, x.t(), bias, alg_id)`` -> ``x @ W.T + bias`` as ``(T, out)``, bias fused and the result
  transposed inside cuSPARSELt (``transpose_result=True``), which the H200 prototype needed to win.

cuSPARSELt wants both sides' sizes multiples of 16 (for 16-bit types); the callers pad (:mod:`.eligibility`).
:class:`EmulatedBackend` does the same arithmetic with dense torch ops and *checks those constraints*
(2:4 weight, sizes multiples of 16, the transposed operand), so the padding logic is tested on CPU.
"""

from __future__ import annotations

import inspect

import torch

from ...errors import SemisparseError

#: Both operands' sizes must be multiples of this for bf16 / fp16 cuSPARSELt (dense min rows/cols are 8,
#: but the H200 refused 197 tokens and accepted multiples of 16; 16 satisfies both).
ALIGN = 16

#: Floating dtypes the 2:4 tensor cores run (fp32 has no 2:4 tensor-core path).
SPARSE_DTYPES = (torch.bfloat16, torch.float16)


class EmulatedBackend:
    """cuSPARSELt's contract with dense torch arithmetic: for CPU tests, ``--smoke`` runs and reference checks."""

    name = "emulated"

    def compress(self, w: torch.Tensor) -> torch.Tensor:
        out, k = w.shape
        if out % ALIGN or k % ALIGN:
            raise SemisparseError(f"2:4 weight {out}x{k}: both sizes must be multiples of {ALIGN}")
        if int((w.reshape(out, k // 4, 4) != 0).sum(-1).max()) > 2:
            raise SemisparseError("weight is not 2:4: a group of 4 along K holds more than 2 non-zeros")
        return w.detach().clone()

    def mm(self, packed: torch.Tensor, dense_t: torch.Tensor, bias: torch.Tensor | None, alg_id: int = 0
           ) -> torch.Tensor:
        k, t = dense_t.shape
        if k != packed.shape[1] or t % ALIGN:
            raise SemisparseError(f"dense operand {k}x{t}: K must be {packed.shape[1]} and T a multiple of {ALIGN}")
        out = dense_t.t() @ packed.t()
        return out if bias is None else out + bias

    def search(self, packed: torch.Tensor, dense_t: torch.Tensor, bias: torch.Tensor | None) -> int:
        self.mm(packed, dense_t, bias)
        return 0

    def describe(self) -> dict:
        return {"backend": self.name}


class CusparseltBackend:
    """``torch._cslt_compress`` / ``torch._cslt_sparse_mm`` / ``torch._cslt_sparse_mm_search``.

    The keyword arguments of ``_cslt_sparse_mm`` changed between torch releases; the ones this module uses
    (``bias``, ``transpose_result``, ``alg_id``) are read from the op's schema once, and a missing one is
    worked around (bias added afterwards, result transposed by a view) rather than assumed.
    """

    name = "cusparselt"

    def __init__(self) -> None:
        self.keywords = _mm_keywords()
        self.has_search = hasattr(torch, "_cslt_sparse_mm_search")

    def compress(self, w: torch.Tensor) -> torch.Tensor:
        return torch._cslt_compress(w.contiguous())

    def mm(self, packed: torch.Tensor, dense_t: torch.Tensor, bias: torch.Tensor | None, alg_id: int = 0
           ) -> torch.Tensor:
        kw = {}
        fuse_bias = bias is not None and "bias" in self.keywords
        if fuse_bias:
            kw["bias"] = bias
        if "alg_id" in self.keywords:
            kw["alg_id"] = alg_id
        if "transpose_result" in self.keywords:
            out = torch._cslt_sparse_mm(packed, dense_t, transpose_result=True, **kw)
        else:
            out = torch._cslt_sparse_mm(packed, dense_t, **kw).t()
        if bias is not None and not fuse_bias:
            out = out + bias
        return out

    def search(self, packed: torch.Tensor, dense_t: torch.Tensor, bias: torch.Tensor | None) -> int:
        if not self.has_search:
            return 0
        kw = {"bias": bias} if bias is not None and "bias" in self.keywords else {}
        if "transpose_result" in self.keywords:
            kw["transpose_result"] = True
        try:
            found = torch._cslt_sparse_mm_search(packed, dense_t, **kw)
        except RuntimeError:  # no search for this problem: cuSPARSELt's default algorithm
            return 0
        return int(found[0] if isinstance(found, (tuple, list)) else found)

    def describe(self) -> dict:
        return {"backend": self.name, "cusparselt": cusparselt_version(), "mm_keywords": sorted(self.keywords),
                "search": self.has_search}


def _mm_keywords() -> set[str]:
    """Argument names ``torch._cslt_sparse_mm`` accepts on this torch (from its schema)."""
    op = getattr(torch.ops.aten, "_cslt_sparse_mm", None)
    try:
        return {a.name for a in op.default._schema.arguments}
    except Exception:  # pragma: no cover - very old torch: fall back to the Python signature if any
        try:
            return set(inspect.signature(torch._cslt_sparse_mm).parameters)
        except (TypeError, ValueError, AttributeError):
            return set()


def cusparselt_version() -> int | None:
    mod = getattr(torch.backends, "cusparselt", None)
    try:
        return mod.version() if mod is not None and mod.is_available() else None
    except Exception:  # pragma: no cover
        return None


def unavailable_reason() -> str:
    """"" when this process can run cuSPARSELt 2:4 GEMMs, else why not (one line)."""
    if not torch.cuda.is_available():
        return (f"device='cuda' needs a CUDA GPU, but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use device='cpu'")
    mod = getattr(torch.backends, "cusparselt", None)
    if mod is None or not mod.is_available() or not hasattr(torch, "_cslt_sparse_mm"):
        return (f"device='cuda' runs 2:4 layers through cuSPARSELt, which this torch {torch.__version__} does "
                "not have (torch.backends.cusparselt.is_available() is False); install a CUDA build of torch with it")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return (f"2:4 sparse tensor cores need compute capability 8.0 or newer; "
                f"{torch.cuda.get_device_name()} is {major}.{minor}")
    return ""


def require_cusparselt() -> CusparseltBackend:
    """The cuSPARSELt back-end, or a one-line :class:`SemisparseError` saying what is missing."""
    reason = unavailable_reason()
    if reason:
        raise SemisparseError(reason)
    return CusparseltBackend()
