"""Condensed sparse layers: kept values + input indices per output neuron, run by :mod:`.kernels`.

A layer's ``(rows, K)`` weight view (:mod:`semisparse.layout`) becomes

* ``values`` ``(R, k)`` fp32: the kept weights of the R output neurons that keep any (ablated neurons,
  all-zero mask rows, are not stored and not computed: their output is their bias, or 0);
* ``idx`` ``(R, k)``: the view column of each kept weight, uint16 (stored as int16 bits) while K <= 65,536,
  int32 only beyond (the byte budget of the batch-1 kernel is values + indices);
* ``orow`` ``(R,)``: the output channel of each stored row.

Rows with fewer than ``k`` kept weights (masks that are not constant fan-in) are padded with zero weights
on one of the row's own kept columns.
Every layer also keeps a ``mode``: ``"condensed"`` runs the kernel, ``"dense"`` runs the masked dense
weight through torch (what the planner picks where the kernel does not win on this machine).

What a condensed layer computes is the *pruned* layer: ``y[o] = bias[o] + sum over kept j of w[o, j] * x[j]``.
An input that only pruned weights read is never read, so a NaN or Inf there does not reach the output (the
masked dense product computes ``0 * NaN = NaN``, and so does a layer in dense mode); a kept weight follows
IEEE arithmetic as in the masked model (a kept 0.0 times Inf is NaN). One difference remains where a row
keeps fewer weights than the widest row: its zero padding multiplies one of the row's kept inputs, so an
Inf in that input gives NaN where the pruned sum is +-Inf.

The stored tensors are checked whenever they change (``load_state_dict`` checks what it loads before
copying it; a tensor replaced, resized or changed in place is checked again at the next call): indices
outside the layer, or ``orow`` / ``ablated`` that do not split the output channels, are a one-line
``SemisparseError``. The kernels read private copies of the checked index tables (:class:`.kernels.Table`),
so an in-place write that torch does not record (through ``.data`` or a NumPy view) is never read either.
A layer called under ``torch.jit.trace`` or ``torch.export`` runs torch's dense ops on the masked weight
(a traced or exported graph cannot hold the kernels' ctypes calls), and ``torch.jit.script`` compiles
torch's own layer on the masked weight in its place: such graphs compute the masked model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import SemisparseError
from ...indices import U16_LIMIT, columns, store
from ...layout import Layout
from ...masking.coverage import LayerReport
from . import kernels


def condense(w_view: torch.Tensor, m_view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, K)`` weight and bool mask -> ``values (R, k)``, ``idx (R, k)``, ``orow (R,)``.

    Reads the mask, never the zeros of the weight: a kept weight that happens to be 0.0 stays stored.
    Indices ascend within a row (locality of the activation reads).
    """
    m_view = m_view.to(torch.bool)
    counts = m_view.sum(1)
    orow = torch.nonzero(counts, as_tuple=False).flatten()
    k = int(counts.max()) if len(orow) else 0
    rows_m = m_view[orow]
    order = torch.sort((~rows_m).to(torch.int8), dim=1, stable=True).indices[:, :k]  # kept columns first
    valid = torch.arange(k)[None, :] < counts[orow][:, None]
    # padding points at the row's first kept column, never at an input the row pruned (see the module notes)
    idx = torch.where(valid, order, order[:, :1])
    values = torch.gather(w_view[orow].detach().float(), 1, idx) * valid
    idx = store(idx, w_view.shape[1])
    return values.contiguous(), idx.contiguous(), orow.to(torch.int64).contiguous()


def _plain(w: torch.Tensor) -> torch.Tensor:
    """``w`` with row-major strides. A 1x1 conv weight made ``.contiguous()`` from a permuted view keeps
    strides that torch reads as channels-last, and its conv then takes the channels-last path: 1.4-1.7x
    slower on NCHW inputs (measured on ResNet-50's 1x1 layers)."""
    return w.clone(memory_format=torch.contiguous_format)


def expand(values: torch.Tensor, idx: torch.Tensor, orow: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dense ``(rows, K)`` view of a condensed layer (for the dense mode and for tests)."""
    out = torch.zeros(shape, dtype=values.dtype)
    if len(orow):
        out[orow] = out[orow].scatter_add(1, columns(idx), values)
    return out


_STORED = ("values", "idx", "orow", "bias", "ablated")


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return -1


def _recording_a_graph() -> bool:
    """Being recorded by ``torch.jit.trace`` or ``torch.export``: a ctypes call would not be in the graph
    (the trace would replay uninitialised output buffers), so the layers run torch's own ops instead."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def check_stored(key: str, view_shape: tuple[int, int], values: torch.Tensor, idx: torch.Tensor,
                 orow: torch.Tensor, bias: torch.Tensor | None, ablated: torch.Tensor) -> None:
    """The stored form of a condensed layer is self-consistent: ``values``/``idx`` ``(R, k)``, ``idx`` columns
    in ``[0, K)``, ``orow`` ``(R,)`` ascending in ``[0, rows)``, ``ablated`` the other output rows, ``bias``
    ``(rows,)`` or None. Raises a one-line ``SemisparseError`` naming the layer and what is wrong."""
    rows, K = view_shape

    def bad(what: str) -> SemisparseError:
        return SemisparseError(f"condensed layer {key!r}: {what}")

    for name, t in (("values", values), ("idx", idx), ("orow", orow), ("ablated", ablated), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise bad(f"{name} must be a tensor, got {type(t).__name__}")
    if not values.is_floating_point() or values.dim() != 2:
        raise bad(f"values must be a (rows, k) float tensor, got {values.dtype} {tuple(values.shape)}")
    R, k = values.shape
    if idx.dtype not in (torch.int16, torch.int32) or tuple(idx.shape) != (R, k):
        raise bad(f"idx must be int16 or int32 of shape {(R, k)}, got {idx.dtype} {tuple(idx.shape)}")
    if idx.dtype == torch.int16 and K > U16_LIMIT:
        raise bad(f"idx must be int32 for {K} input columns, got int16")
    if orow.dtype != torch.int64 or tuple(orow.shape) != (R,):
        raise bad(f"orow must be int64 of shape {(R,)}, got {orow.dtype} {tuple(orow.shape)}")
    if ablated.dtype != torch.int64 or tuple(ablated.shape) != (rows - R,):
        raise bad(f"ablated must be int64 of shape {(rows - R,)}, got {ablated.dtype} {tuple(ablated.shape)}")
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (rows,)):
        raise bad(f"bias must be a float tensor of shape {(rows,)}, got {bias.dtype} {tuple(bias.shape)}")
    if idx.numel():
        lo, hi = torch.aminmax(columns(idx))
        if int(lo) < 0 or int(hi) >= K:
            raise bad(f"idx holds columns {int(lo)}..{int(hi)}, outside the layer's {K} input columns")
    if R and (int(orow[0]) < 0 or int(orow[-1]) >= rows or (R > 1 and not bool((orow[1:] > orow[:-1]).all()))):
        raise bad(f"orow must ascend strictly within [0, {rows}), got {orow.min().item()}..{orow.max().item()}")
    keep = torch.zeros(rows, dtype=torch.bool)
    keep[orow.cpu()] = True
    if not torch.equal(ablated.cpu(), torch.nonzero(~keep).flatten()):
        raise bad("ablated must list exactly the output rows orow does not")


class _Condensed(nn.Module):
    """State shared by the condensed layers: buffers, mode, planner figures, the layer report."""

    kind = "Linear"
    dense_gemm = False  # dense mode of a 1x1 conv: one matrix product instead of torch's conv (planner's pick)

    def _init_condensed(self, key: str, w_view: torch.Tensor, m_view: torch.Tensor, bias: torch.Tensor | None,
                        weight: torch.Tensor, pattern: str) -> None:
        self.key = key
        self.pattern = pattern
        self.shape = tuple(weight.shape)
        self.view_shape = tuple(w_view.shape)
        values, idx, orow = condense(w_view, m_view)
        ablated = torch.ones(w_view.shape[0], dtype=torch.bool)
        ablated[orow] = False
        with torch.inference_mode(False):  # tensors with a version counter: in-place writes are seen
            self.register_buffer("values", values.clone())
            self.register_buffer("idx", idx.clone())
            self.register_buffer("orow", orow.clone())
            self.register_buffer("bias", None if bias is None else bias.detach().float().clone().contiguous())
            self.register_buffer("ablated", torch.nonzero(ablated).flatten().clone())
        self.n_ablated = int(self.ablated.numel())
        self.density = float(m_view.float().mean())
        mask = self._layout().from_view(m_view).to(torch.float32)
        self.dense_weight: torch.Tensor | None = _plain(weight.detach().float() * mask)  # until planned
        self.mode = "condensed" if kernels.available() else "dense"
        self.figures: dict = {}  # the planner's measurements: dense_us, sparse_us, ratio
        self.path = ""  # which kernel (and setting) the planner chose, e.g. "gemv/gather", "spmm/64"
        self._macs = None

    def _opening(self, x: torch.Tensor) -> tuple[bool, torch.Tensor | None]:
        """What every forward starts with: whether the condensed path runs (not while a graph is recorded; the
        stored values re-checked), and the output where the call is answered here already (under CPU autocast,
        or bf16 inputs the kernels take: fp32 inside, the input's dtype out)."""
        if torch.is_autocast_enabled("cpu") and x.is_cpu:
            return False, self._autocast_forward(x)
        condensed = self.mode == "condensed" and not _recording_a_graph()
        if condensed:
            self._fresh()
            if x.dtype == torch.bfloat16 and self._kernel_takes(x):  # bf16 values, fp32 accumulation
                return True, self.forward(x.float()).to(torch.bfloat16)
        return condensed, None

    def _autocast_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Under CPU autocast, ``nn.Linear``/``ConvNd`` return the autocast dtype: the layer runs in fp32 (its
        values' dtype; as exact as the masked model's low-precision product, or more) with autocast off, and
        returns that dtype, so the deployed model's dtypes are the masked model's and the next layer still
        takes the kernels."""
        with torch.autocast("cpu", enabled=False):  # forward, not __call__: hooks run once, around this call
            y = self.forward(x.float() if x.is_floating_point() else x)
        return y.to(torch.get_autocast_dtype("cpu"))

    @property
    def weight(self) -> torch.Tensor:
        """The masked dense weight, shaped as the replaced layer's (what its ``weight`` was), for code that reads
        a layer's weight outside its forward (``F.linear(x, self.fc.weight)``, ``.weight.dtype``, tied heads).
        The dense-mode copy, or built from the stored values on first read and kept until they change."""
        if self.dense_weight is not None:
            return self.dense_weight
        w = self.__dict__.get("_weight")
        if w is None:
            w = self.__dict__["_weight"] = self._dense_now()
        return w

    def set_mode(self, mode: str) -> None:
        """``"condensed"`` or ``"dense"``; the representation not chosen is dropped to save memory."""
        if mode not in ("condensed", "dense"):
            raise ValueError(f"mode must be 'condensed' or 'dense', got {mode!r}")
        if mode == "dense" and self.dense_weight is None:
            view = expand(self.values, self.idx, self.orow, self.view_shape)
            self.dense_weight = _plain(self._layout().from_view(view))
        self.mode = mode
        self._unbind()

    def drop_unused(self) -> None:
        """After planning: a condensed layer no longer needs its dense copy."""
        if self.mode == "condensed":
            self.dense_weight = None

    def bias_rows(self) -> torch.Tensor | None:
        """Bias of the stored rows (cached: the kernel adds it while accumulating)."""
        b = getattr(self, "_bias_rows", None)
        if b is None and self.bias is not None:
            b = self.bias[self._tables()["orow"].tensor()].float().contiguous()
            self._bias_rows = b
        return b

    def _layout(self) -> Layout:
        return Layout("rows" if self.kind in ("Linear", "MultiheadAttention") else "conv", self.shape)

    def _output_init(self, shape: tuple[int, ...], channel_dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Output buffer (``out`` or a new one); rows that are not computed (ablated neurons) hold their
        bias (or 0). ``channel_dim`` 0: ``(out_channels, positions...)``; 1: ``(batch, out_features)``."""
        out = torch.empty(shape) if out is None else out
        if self.n_ablated:
            fill = self.ablated_fill()
            rows = self._tables()["ablated"]
            if channel_dim == 0:
                positions = math.prod(shape[1:])
                kernels.fill_rows(out, rows, fill, positions, positions, 1)
            else:
                kernels.fill_rows(out, rows, fill, 1, shape[0], shape[1])
        return out

    def ablated_fill(self) -> torch.Tensor:
        """The constant output of each ablated neuron (its bias, or 0), cached."""
        fill = self.__dict__.get("_ablated_fill")
        if fill is None:
            fill = torch.zeros(self.n_ablated) if self.bias is None else self.bias[self.ablated].float()
            fill = self.__dict__["_ablated_fill"] = fill.contiguous()
        return fill

    def _forget_derived(self) -> None:
        """Drop what is derived from the stored tensors (they may have been replaced or refilled)."""
        for name in ("_bias_rows", "_ablated_fill", "_held", "_index_tables", "_values32", "_values_rows4", "_weight"):
            self.__dict__.pop(name, None)
        for name in ("_offsets", "_geometry"):  # hold sorted copies of the values (channel tiles)
            cache = self.__dict__.get(name)
            if cache:
                cache.clear()
        self._unbind()

    def _apply(self, fn, recurse=True):
        self._forget_derived()  # .to(), .float(), ... may replace the stored tensors
        out = super()._apply(fn, recurse)
        if self.dense_weight is not None:  # not a buffer (never saved), but it must follow dtype and device
            self.dense_weight = fn(self.dense_weight)
        return out

    def _fresh(self) -> None:
        """At each call: when a stored tensor was replaced, resized or changed in place since the last call
        (as far as torch records it), check them all again and drop everything derived from them."""
        b = self._buffers
        held = self.__dict__.get("_held")
        if held is not None:
            try:
                for name, (h, ptr, ver) in zip(_STORED, held):
                    t = b[name]
                    if t is not h or (t is not None and (t.data_ptr() != ptr or t._version != ver)):
                        break
                else:
                    return
            except RuntimeError:  # replaced by an inference tensor (no version counter): check again
                pass
        self._forget_derived()
        for name in _STORED:  # tensors torch keeps a version counter for, so later in-place writes are seen
            t = b[name]
            if t is not None and t.is_inference():
                with torch.inference_mode(False):
                    b[name] = t.clone()
        check_stored(self.key, self.view_shape, *(b[n] for n in ("values", "idx", "orow", "bias", "ablated")))
        self._tables()  # the copies the kernels read: made now, from what was just checked
        self.__dict__["_held"] = tuple((None, 0, 0) if b[n] is None else (b[n], b[n].data_ptr(), _version(b[n]))
                                       for n in _STORED)

    def _tables(self) -> dict:
        """Private copies of the checked index tables (:class:`.kernels.Table`): what the kernels read and
        every derived table is built from, made when :meth:`_fresh` checked the stored tensors."""
        t = self.__dict__.get("_index_tables")
        if t is None:
            t = {"orow": kernels.Table(self.orow), "ablated": kernels.Table(self.ablated),
                 "idx": kernels.Table(self.idx, unsigned16=True)}
            self.__dict__["_index_tables"] = t
        return t

    def _idx_table(self) -> kernels.Table:
        return self._tables()["idx"]

    def _kvalues(self) -> torch.Tensor:
        """The values as the kernels take them: fp32 (a bf16 layer's converted once, until they change)."""
        v = self.values
        if v.dtype == torch.float32:
            return v
        v32 = self.__dict__.get("_values32")
        if v32 is None:
            v32 = self.__dict__["_values32"] = v.float().contiguous()
        return v32

    def _rows4_values(self) -> torch.Tensor:
        """The values in the rows4 kernels' order (cached). Rows in blocks of 4 that keep the same inputs (masks
        chosen per block of 4 neurons, ``ss.sparsify(shared_rows=4)``) let one loaded input vector feed 4 rows,
        as in a dense GEMM microkernel, instead of 1."""
        v = self.__dict__.get("_values_rows4")
        if v is None:
            v = self.__dict__["_values_rows4"] = kernels.rows4_values(self._kvalues())
        return v

    def _dtype_takes(self, x: torch.Tensor) -> bool:
        """fp32 inputs (fp32 or bf16 values), or bf16 inputs to bf16 values (run in fp32, returned in bf16)."""
        return (x.dtype == torch.float32 and self.values.dtype in (torch.float32, torch.bfloat16)) or (
            x.dtype == torch.bfloat16 and self.values.dtype == torch.bfloat16)

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` compiles torch's own layer on the masked weight (what dense mode runs) in place
        of this one: the kernels are ctypes calls, which TorchScript cannot hold."""
        weight = self.dense_weight if self.dense_weight is not None else self._dense_now()
        with torch.device("meta"):
            if isinstance(self, SparseLinear):
                mod = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
            else:
                mod = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[self.nd - 1](
                    self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
                    self.groups, bias=self.bias is not None)
        mod.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
        if self.bias is not None:
            mod.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return mod.train(self.training)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # what would be stored is checked before anything is copied: a bad entry leaves this layer as it was
        after = {}
        for n in _STORED:
            cur, inc = getattr(self, n), state_dict.get(prefix + n)
            if not (isinstance(inc, torch.Tensor) and cur is not None and inc.shape == cur.shape):
                after[n] = cur  # not loaded (torch reports entries of another shape and copies none of them)
                continue
            index = n in ("idx", "orow", "ablated")
            if index and (inc.is_floating_point() or inc.is_complex() or inc.dtype == torch.bool):
                raise SemisparseError(f"condensed layer {self.key!r}: {prefix + n} must hold integers, got {inc.dtype}")
            after[n] = inc.to(cur.dtype)
            if index and not torch.equal(columns(after[n]), columns(inc)):
                raise SemisparseError(f"condensed layer {self.key!r}: {prefix + n} holds values outside {cur.dtype}")
        check_stored(self.key, self.view_shape, *(after[n] for n in _STORED))
        self._forget_derived()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.dense_weight is not None:  # a dense-mode layer runs this copy: rebuild it from what was loaded
            view = expand(self.values, self.idx, self.orow, self.view_shape)
            self.dense_weight = _plain(self._layout().from_view(view).to(self.dense_weight.dtype))

    def semisparse_layer_report(self, name: str) -> LayerReport:
        stored = (self.values.numel() * self.values.element_size() + self.idx.numel() * self.idx.element_size()
                  + self.orow.numel() * 8)
        extra = {"kernel": self.kernel_name(), "bytes": stored if self.mode == "condensed" else
                 math.prod(self.shape) * 4}
        extra.update(self.figures)
        return LayerReport(self.key, self.kind, self.shape, self.pattern, self.density, math.prod(self.shape),
                           macs=self._macs, extra=extra)

    def kernel_name(self) -> str:
        if self.mode == "dense":
            return "dense-gemm" if self.dense_gemm else "dense"
        return "condensed" + (f"-{self.path}" if self.path else "")

    def variants(self, x: torch.Tensor) -> list[dict]:
        """Kernel settings the planner may time for input ``x`` (each a dict of attributes to set)."""
        return [{}]

    def dense_variants(self, x: torch.Tensor) -> list[dict]:
        """Ways to run the layer dense that the planner may time; the first is torch's own layer."""
        return [{}]

    def use_variant(self, v: dict) -> None:
        for name, value in v.items():
            setattr(self, name, value)
        self._unbind()

    def _unbind(self) -> None:
        """Forget the kernel calls bound to the current tensors and settings (they hold raw pointers)."""
        self.__dict__["_bound_gemv"] = None
        self.__dict__["_fast_conv"] = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # a bound kernel call holds raw pointers: never copied or pickled
        for name in ("_bound_gemv", "_fast_conv", "_bias_rows", "_ablated_fill", "_held", "_index_tables", "_weight",
                     "_values_rows4"):
            state.pop(name, None)
        return state


def deployed_layers(model: nn.Module) -> list[tuple[str, _Condensed]]:
    """``[(module name, condensed layer)]`` of a deployed model."""
    return [(n, mod) for n, mod in model.named_modules() if isinstance(mod, _Condensed)]


class SparseLinear(_Condensed):
    """Condensed ``nn.Linear`` (also an MHA's packed in-projection). ``x (..., in) -> (..., out)``.

    Batch 1 runs the gather kernel (bytes moved: values + indices, ~k * 6 bytes per neuron); larger
    batches are packed into ``(K, PB)`` panels and run the broadcast-FMA kernel, vectorised over the batch.
    """

    kind = "Linear"

    def __init__(self, key: str, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
                 pattern: str = "", kind: str = "Linear") -> None:
        super().__init__()
        self.kind = kind
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self._init_condensed(key, weight, mask, bias, weight, pattern)
        self.panel_width = kernels.BLOCK
        self.gemv_variant = "packed"
        self.pairs = False  # two rows per kernel pass (PB 32)
        self.transposed_out = False  # batch > 1: write (out, B) and transpose, instead of strided stores
        self.rows4 = False  # batch >= 24: rows in blocks of 4 that read the same inputs (panels of 24)
        self._offsets: dict[int, torch.Tensor] = {}  # panel width -> int32 offsets (runtime cache)
        self._batch1_macs = self.out_features * self.in_features
        self._bound_gemv = None  # the bound batch-1 kernel while condensed with no ablated rows

    def variants(self, x: torch.Tensor) -> list[dict]:
        if x.numel() // self.in_features == 1:
            return [{"gemv_variant": v} for v in kernels.GEMV_VARIANTS]
        # (channel tiles, as SparseConv has, measured slower here: a panel row is only PB floats wide)
        settings = [{"panel_width": w, "pairs": p, "transposed_out": t, "rows4": False}
                    for t in (False, True) for w, p in ((64, False), (32, False), (32, True))]
        if x.numel() // self.in_features >= 24 and self._idx_table().rows_in_fours():
            settings.append({"panel_width": 24, "pairs": False, "transposed_out": True, "rows4": True})
        return settings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        condensed, done = self._opening(x)
        if done is not None:
            return done
        bound = self.__dict__.get("_bound_gemv")
        if bound is not None and condensed and x.dim() == 2 and x.shape[0] == 1 and (
                x.shape[1] == self.in_features and x.dtype == torch.float32 and x.is_cpu and not x.requires_grad
                and x.is_contiguous()):  # fmt: skip
            # batch-1 latency in condensed mode: as little Python as possible around the bound kernel
            y = torch.empty(1, self.out_features)
            try:
                bound(x, y)
                self.__dict__["_macs"] = self._batch1_macs
                return y
            except kernels.Stale:  # a stored tensor resized under it: check everything again, bind again
                self._forget_derived()
                self._fresh()
        if not condensed or not self._kernel_takes(x):
            # Kept dense by the planner, or an input the kernel does not take: torch's own op on the masked
            # weight, which computes what nn.Linear computes and raises what it raises (its __setattr__ skipped
            # on purpose: no more work than nn.Linear).
            w = self.dense_weight if self.dense_weight is not None else self._dense_now()
            y = F.linear(x, w, self.bias)
            self.__dict__["_macs"] = y.numel() * self.in_features
            return y
        if x.dim() == 2 and x.shape[0] == 1 and x.is_contiguous() and not self.n_ablated:
            run = self._batch1()
            if run is not None:
                y = torch.empty(1, self.out_features)
                run(x, y)
                self.__dict__["_macs"] = self._batch1_macs
                return y
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        self.__dict__["_macs"] = x2.shape[0] * self.out_features * self.in_features
        B = x2.shape[0]
        orow = self._tables()["orow"]
        if B == 1:
            y = self._output_init((self.out_features,), 0)
            kernels.gemv(x2[0], self._kvalues(), self._idx_table(), self.bias_rows(), orow, y, self.gemv_variant)
            return y.view(*lead, self.out_features)
        PB = min(self.panel_width, -(-B // 8) * 8)
        X = kernels.pack_panels(x2, PB)
        off = self._offsets.get(PB)
        if off is None:
            off = kernels.Table(kernels.offsets(self._idx_table().tensor(),
                                                torch.arange(self.in_features, dtype=torch.int64) * PB,
                                                torch.zeros(len(self.orow), dtype=torch.int64)))
            self._offsets[PB] = off
        rows4 = self.rows4 and PB == 24 and off.rows_in_fours()
        if rows4 and orow.adjacent_in_fours():  # (B, out) stored directly: a block's 4 outputs are adjacent
            y = self._output_init((B, self.out_features), 1)
            kernels.spmm(X, self._rows4_values(), off, self.bias_rows(), orow, y, B, 1, PB, self.in_features * PB,
                         ldp=self.out_features, rows4=True)
            return y.view(*lead, self.out_features)
        if self.transposed_out or rows4:  # rows of (out, B) stored as whole vectors, then one blocked transpose
            yt = self._output_init((self.out_features, B), 0)
            kernels.spmm(X, self._rows4_values() if rows4 else self._kvalues(), off, self.bias_rows(), orow, yt, B,
                         B, PB, self.in_features * PB, pairs=self.pairs and PB == 32, prefer_blocks=True, rows4=rows4)
            return kernels.transpose(yt).view(*lead, self.out_features)
        y = self._output_init((B, self.out_features), 1)  # each output element stored on its own, strided
        kernels.spmm(X, self._kvalues(), off, self.bias_rows(), orow, y, B, 1, PB, self.in_features * PB,
                     ldp=self.out_features, pairs=self.pairs and PB == 32, prefer_blocks=True)
        return y.view(*lead, self.out_features)

    def _kernel_takes(self, x: torch.Tensor) -> bool:
        """An input the condensed kernels compute exactly what ``nn.Linear`` would: fp32 on the CPU (as the
        stored values), ``(..., in_features)``, not empty, no autograd."""
        return (x.dim() >= 1 and x.shape[-1] == self.in_features and self._dtype_takes(x) and x.is_cpu
                and not x.requires_grad and x.numel() > 0)

    def _batch1(self):
        """Bind the batch-1 kernel to the stored tensors (None without kernels); forward then takes the
        bound call directly until the mode, the variant or the stored tensors change."""
        values = self.values if self.values.dtype == torch.bfloat16 else self._kvalues()  # bf16: read as bf16
        run = kernels.gemv_binding(values, self._idx_table(), self.bias_rows(), self._tables()["orow"],
                                   self.gemv_variant)
        self.__dict__["_bound_gemv"] = run
        return run

    def _dense_now(self) -> torch.Tensor:
        return expand(self.values, self.idx, self.orow, self.view_shape)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.values.shape[1]}, "
                f"rows={len(self.orow)}, mode={self.mode}")


class SparseConv(_Condensed):
    """Condensed ``Conv1d/2d/3d`` (zeros padding; any stride, dilation, groups, padding incl. "same").

    Lowering, no im2col: the input is zero-padded and split by stride phase into ``X (C, phases, N, H', W')``
    so every kernel tap is a constant shift of the flattened plane; the kernel broadcasts each kept weight
    and accumulates it over a block of 64 consecutive output positions of that plane. View column
    ``j = tap * in_per_group + c`` maps to the offset ``coff[j]``; a grouped conv adds its group's channel
    offset per row (``base``). Positions of the plane that are not outputs (the padded border) are computed
    and cropped, ~(H'W')/(HoWo) extra work.
    """

    padding_mode = "zeros"  # as the replaced conv's (only zero-padded convs are condensed), for code that reads it

    def __init__(self, key: str, conv: nn.modules.conv._ConvNd, weight: torch.Tensor, mask: torch.Tensor,
                 bias: torch.Tensor | None, pattern: str = "") -> None:
        super().__init__()
        self.kind = type(conv).__name__
        self.nd = weight.dim() - 2
        self.in_channels, self.out_channels, self.groups = conv.in_channels, conv.out_channels, conv.groups
        self.kernel_size = tuple(weight.shape[2:])
        self.stride, self.dilation = tuple(conv.stride), tuple(conv.dilation)
        self.padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        layout = Layout("conv", tuple(weight.shape))
        self._init_condensed(key, layout.to_view(weight), layout.to_view(mask), bias, weight, pattern)
        self.cin_g = self.in_channels // self.groups
        self._geometry: dict = {}
        self.block = kernels.BLOCK  # positions per kernel block: narrower keeps a block's input in L1
        self.pairs = False  # two rows per kernel pass (block 32)
        self.tile_kb = 0  # > 0: sweep input channels in tiles whose input block fits this many KiB (L1)
        self.rows4 = False  # 2-D convs: rows in blocks of 4 that read the same inputs (_rows4_values)

    def _pads(self) -> list[tuple[int, int]]:
        if self.padding == "valid":
            return [(0, 0)] * self.nd
        if self.padding == "same":
            out = []
            for k, d in zip(self.kernel_size, self.dilation):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return out
        return [(p, p) for p in self.padding]

    def _plan_geometry(self, n: int, spatial: tuple[int, ...]) -> dict | None:
        """Offsets and sizes for an input ``(n, C, *spatial)``; cached per shape (the int32 offset table
        is 4 bytes per kept weight: a runtime cache, not part of the stored form)."""
        key = (n, spatial)
        g = self._geometry.get(key)
        if g is not None:
            return g
        pads = self._pads()
        sub = [s if k == 1 and p == (0, 0) else 1 for s, k, p in zip(self.stride, self.kernel_size, pads)]
        spatial_in = [-(-s // u) for s, u in zip(spatial, sub)]  # 1-wide kernels: subsample first
        strides = [s // u if u > 1 else s for s, u in zip(self.stride, sub)]
        padded = [s + a + b for s, (a, b) in zip(spatial_in, pads)]
        outs = [(p - d * (k - 1) - 1) // s + 1 for p, d, k, s in zip(padded, self.dilation, self.kernel_size, strides)]
        if any(o <= 0 for o in outs):
            return None  # too small for the kernel: torch's conv raises its own error
        planes = [-(-p // s) for p, s in zip(padded, strides)]  # H' = ceil(padded / stride)
        plane = math.prod(planes)
        nph = math.prod(strides)
        row_strides = [math.prod(planes[i + 1:]) for i in range(self.nd)]
        ph_strides = [math.prod(strides[i + 1:]) for i in range(self.nd)]
        used = nph * n * plane
        # Channels start on 64-byte boundaries: with 1-tap kernels every offset is then a multiple of 16
        # floats and, with blocks of 16k positions, every vector load is aligned (no cache-line splits).
        c_stride = -(-used // 16) * 16
        taps = list(_taps(self.kernel_size))
        tap_off = []
        for t in taps:
            q = [ti * d for ti, d in zip(t, self.dilation)]
            phase = sum((qi % s) * ps for qi, s, ps in zip(q, strides, ph_strides))
            shift = sum((qi // s) * rs for qi, s, rs in zip(q, strides, row_strides))
            tap_off.append(phase * n * plane + shift)
        tap_off = torch.tensor(tap_off, dtype=torch.int64)
        coff = (tap_off[:, None] + torch.arange(self.cin_g, dtype=torch.int64)[None, :] * c_stride).reshape(-1)
        tables = self._tables()
        base = ((tables["orow"].tensor() // (self.out_channels // self.groups)) * self.cin_g * c_stride).contiguous()
        last = (n - 1) * plane + sum((o - 1) * rs for o, rs in zip(outs, row_strides)) + 1
        g = dict(sub=sub, strides=strides, pads=pads, padded=padded, outs=outs, planes=planes, plane=plane,
                 nph=nph, off=kernels.Table(kernels.offsets(tables["idx"].tensor(), coff, base)), P=last,
                 total=self.in_channels * c_stride, tap_off=tap_off, used=used, c_stride=c_stride)
        self._geometry[key] = g
        return g

    def prepare_input(self, x: torch.Tensor, g: dict) -> torch.Tensor:
        """``x (N, C, *S)`` -> flat ``X (C, phases, N, *H')`` zero-padded, with ``BLOCK`` floats of slack."""
        n, c = x.shape[:2]
        if any(u > 1 for u in g["sub"]):
            x = x[(slice(None), slice(None), *[slice(None, None, u) for u in g["sub"]])]
        pad_arg = []
        for (a, b), p, pl, s in reversed(list(zip(g["pads"], g["padded"], g["planes"], g["strides"]))):
            pad_arg += [a, b + pl * s - p]
        buf = torch.empty(g["total"] + kernels.BLOCK)
        buf[g["total"]:].zero_()
        chans = buf[: g["total"]].view(c, g["c_stride"])
        if g["c_stride"] > g["used"]:
            chans[:, g["used"]:].zero_()  # never stored, but read by the last block's spare lanes
        chans = chans[:, : g["used"]]
        if g["nph"] == 1 and n == 1:  # one pass: zero the border, copy the interior
            view = chans.view(c, *g["padded"])
            if any(pad_arg):
                view.zero_()
                inner = view[(slice(None), *[slice(a, a + s) for (a, _), s in zip(g["pads"], x.shape[2:])])]
                inner.copy_(x[0])
            else:
                view.copy_(x[0])
            return buf
        xp = F.pad(x, pad_arg) if any(pad_arg) else x
        shape = [n, c]
        for pl, s in zip(g["planes"], g["strides"]):
            shape += [pl, s]
        nd = self.nd
        perm = [1] + [3 + 2 * i for i in range(nd)] + [0] + [2 + 2 * i for i in range(nd)]
        dst_shape = [c] + list(g["strides"]) + [n] + list(g["planes"])
        chans.view(dst_shape).copy_(xp.reshape(shape).permute(perm))
        return buf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        condensed, done = self._opening(x)
        if done is not None:
            return done
        fast = self.__dict__.get("_fast_conv")
        if fast is not None and condensed and x.shape == fast[0] and x.dtype == torch.float32 and x.is_cpu and (
                not x.requires_grad and x.is_contiguous()):  # fmt: skip
            out = torch.empty(fast[2])  # batch-1 2-D conv in condensed mode: one bound C call
            try:
                fast[1](x, out)
                self.__dict__["_macs"] = fast[3]
                return out
            except kernels.Stale:  # a stored tensor resized under it: check everything again, bind again
                self._forget_derived()
                self._fresh()
        if condensed and self._kernel_takes(x):
            batched = x.dim() == self.nd + 2
            y = self._condensed_forward(x.contiguous() if batched else x.unsqueeze(0).contiguous())
            if y is not None:
                self.__dict__["_macs"] = y.numel() * math.prod(self.shape[1:])
                return y if batched else y.squeeze(0)
        # Kept dense by the planner, or an input the kernel does not take: torch's own op on the masked weight,
        # which computes what nn.ConvNd computes and raises what it raises (its __setattr__ skipped on purpose).
        w = self.dense_weight if self.dense_weight is not None else self._dense_now()
        if self.mode == "dense" and self.dense_gemm and x.dim() == self.nd + 2 and x.is_contiguous() and (
                x.shape[1] == self.in_channels and x.dtype == w.dtype and x.device == w.device):  # fmt: skip
            y = self._gemm(x, w)
        else:
            conv = (F.conv1d, F.conv2d, F.conv3d)[self.nd - 1]
            y = conv(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        self.__dict__["_macs"] = y.numel() * math.prod(self.shape[1:])
        return y

    def _kernel_takes(self, x: torch.Tensor) -> bool:
        """An input the condensed kernels compute exactly what the conv would: fp32 on the CPU (as the stored
        values), ``([N,] C, *spatial)`` with this conv's channels, not empty, no autograd."""
        return (x.dim() in (self.nd + 1, self.nd + 2) and x.shape[-self.nd - 1] == self.in_channels
                and self._dtype_takes(x) and x.is_cpu
                and not x.requires_grad and x.numel() > 0)

    def _dense_now(self) -> torch.Tensor:
        return self._layout().from_view(expand(self.values, self.idx, self.orow, self.view_shape))

    def _gemm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """A 1x1, stride-1, ungrouped conv as ``W (out, in) @ x (in, positions)`` per sample: at batch 1 on
        NCHW inputs, 1.0-1.5x faster than torch's conv on ResNet-50's 1x1 shapes (machine R)."""
        n, c = x.shape[:2]
        w2 = w.view(self.out_channels, c)
        xs = x.view(n, c, -1)
        if n == 1:
            y = torch.mm(w2, xs[0]) if self.bias is None else torch.addmm(self.bias[:, None], w2, xs[0])
        elif self.bias is None:
            y = torch.matmul(w2, xs)
        else:
            y = torch.baddbmm(self.bias[None, :, None], w2.expand(n, -1, -1), xs)
        return y.view(n, self.out_channels, *x.shape[2:])

    def gemm_eligible(self) -> bool:
        """1x1 kernel, stride 1, no padding, one group: the conv is a plain matrix product."""
        return (self.groups == 1 and all(k == 1 for k in self.kernel_size) and all(s == 1 for s in self.stride)
                and all(p == (0, 0) for p in self._pads()))

    def dense_variants(self, x: torch.Tensor) -> list[dict]:
        if self.gemm_eligible() and x.dim() == self.nd + 2:
            return [{"dense_gemm": False}, {"dense_gemm": True}]
        return [{"dense_gemm": False}]

    def _condensed_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x (N, C, *spatial)`` contiguous fp32 through the kernels; None where the input is too small for
        the kernel (torch's conv then says so)."""
        n = x.shape[0]
        if self.nd == 2 and kernels.available():
            # one bound batch-1 call per sample: no (C, N, H, W) copy of the input nor transpose of the output,
            # and 1x1 inputs read in place (1.0-4.0x the batched path at batch 32 on ResNet-50's convs)
            g1 = self._plan_geometry(1, tuple(x.shape[2:]))
            if g1 is None:
                return None
            fast = self.__dict__.get("_fast_conv")
            if fast is None or fast[0] != (1, *x.shape[1:]):
                fast = self._bind_conv(x[:1], g1)
            out = torch.empty(n, *fast[2][1:])
            for i in range(n):
                fast[1](x[i], out[i])
            return out
        g = self._plan_geometry(n, tuple(x.shape[2:]))
        if g is None:
            return None
        X = self.prepare_input(x, g)
        full = n * g["plane"]
        uncropped = n == 1 and list(g["planes"]) == list(g["outs"])  # 1x1, no padding: y is the output
        y = self._output_init((self.out_channels, full), 0,
                              None if uncropped else kernels.scratch("conv-output", self.out_channels * full))
        if self.rows4 and g["off"].rows_in_fours():
            W, off = self._rows4_tables(g)
            kernels.spmm(X, W, off, self.bias_rows(), self._tables()["orow"], y, g["P"], full, 24, 24, rows4=True)
        elif self.tile_kb and self.block in (32, 64):
            W, off, seg = self._tiles(g)
            kernels.spmm_tiled(X, W, off, seg, self.bias_rows(), self._tables()["orow"], y, g["P"], full, self.block,
                               self.block)
        else:
            kernels.spmm(X, self._kvalues(), g["off"], self.bias_rows(), self._tables()["orow"], y, g["P"], full,
                         self.block, self.block, pairs=self.pairs and self.block == 32)
        if uncropped:
            return y.view(1, self.out_channels, *g["outs"])
        y = y.view(self.out_channels, n, *g["planes"])
        y = y[(slice(None), slice(None), *[slice(0, o) for o in g["outs"]])]
        # always a copy: y lives in the reused scratch buffer (with one output channel and nothing cropped,
        # .contiguous() would hand out the buffer itself, and the next call would overwrite the result)
        return y.transpose(0, 1).clone(memory_format=torch.contiguous_format)

    def _bind_conv(self, x: torch.Tensor, g: dict) -> tuple:
        """Bind the one-call batch-1 convolution for this input shape and kernel setting; forward then calls it
        directly until the shape, the mode, the setting or the stored tensors change."""
        seg = None
        if self.rows4 and g["off"].rows_in_fours():
            (W, off), kind, PB = self._rows4_tables(g), 3, 24
        elif self.tile_kb and self.block in (32, 64):
            W, off, seg = self._tiles(g)
            kind, PB = 2, self.block
        elif self.pairs and self.block == 32:
            W, off, kind, PB = self._kvalues(), g["off"], 1, 32
        else:
            W, off, kind, PB = self._kvalues(), g["off"], 0, self.block
        (H0, W0), (sh, sw) = x.shape[2:], g["sub"]
        geo = dict(C=self.in_channels, H0=H0, W0=W0, sh=sh, sw=sw, H=-(-H0 // sh), W=-(-W0 // sw),
                   pt=g["pads"][0][0], pl=g["pads"][1][0], Hp=g["padded"][0], Wp=g["padded"][1], cs=g["c_stride"],
                   stH=g["strides"][0], stW=g["strides"][1], Hq=g["planes"][0], Wq=g["planes"][1], P=g["P"],
                   Ho=g["outs"][0], Wo=g["outs"][1])
        bias, fill = self.bias_rows(), self.ablated_fill() if self.n_ablated else torch.zeros(0)
        tables = self._tables()
        run = kernels.conv2d_binding(geo, W, off, seg, bias, tables["orow"], tables["ablated"], fill, PB, kind,
                                     self.out_channels)
        out_shape = (1, self.out_channels, *g["outs"])
        fast = (x.shape, run, out_shape, math.prod(out_shape) * math.prod(self.shape[1:]), (W, off, seg, bias, fill))
        self.__dict__["_fast_conv"] = fast
        return fast

    def _rows4_tables(self, g: dict) -> tuple[torch.Tensor, kernels.Table]:
        """The rows4 values and offsets of geometry ``g``, each block's inputs in memory order (cached in ``g``)."""
        if "rows4" not in g:
            g["rows4"] = kernels.rows4_by_offset(self._rows4_values(), g["off"])
        return g["rows4"]

    def _tiles(self, g: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weights sorted by input offset and cut into channel tiles whose block input fits ``tile_kb``."""
        key = ("tiles", self.block, self.tile_kb)
        if key not in g:
            starts = sorted(set(g["tap_off"].tolist()))  # a block reads [o, o + block) of a channel per tap
            span, end = 0, starts[0]
            for o in starts:
                span += o + self.block - max(o, end)
                end = o + self.block
            per_tile = max(1, (self.tile_kb * 1024) // (4 * span))
            channel = columns(self._idx_table().tensor()) % self.cin_g
            W, off, seg = kernels.tile(self._kvalues(), g["off"], channel, per_tile)
            g[key] = (W, kernels.Table(off), kernels.Table(seg))
        return g[key]

    def variants(self, x: torch.Tensor) -> list[dict]:
        # the settings that won somewhere on ResNet-50's layers (benchmarks: interleaved A/B on machine R)
        settings = [{"block": 64, "pairs": False, "tile_kb": 0}, {"block": 32, "pairs": True, "tile_kb": 0},
                    {"block": 64, "pairs": False, "tile_kb": 32}, {"block": 64, "pairs": False, "tile_kb": 16},
                    {"block": 32, "pairs": False, "tile_kb": 16}, {"block": 32, "pairs": False, "tile_kb": 32}]
        settings = [{**v, "rows4": False} for v in settings]
        # rows4: the stored rows read the same inputs in blocks of 4 at this geometry (a grouped conv's blocks
        # must not straddle groups), 2-D convs
        g = self._plan_geometry(x.shape[0], tuple(x.shape[2:])) if x.dim() == self.nd + 2 else None
        if self.nd == 2 and g is not None and g["off"].rows_in_fours():
            settings.append({"block": 24, "pairs": False, "tile_kb": 0, "rows4": True})
        return settings

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"k={self.values.shape[1]}, mode={self.mode}")


def _taps(kernel: tuple[int, ...]):
    """Kernel tap multi-indices in row-major order (the order of the conv layout's view)."""
    if not kernel:
        yield ()
        return
    for i in range(kernel[0]):
        for rest in _taps(kernel[1:]):
            yield (i, *rest)
