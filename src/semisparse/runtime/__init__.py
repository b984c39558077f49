"""semisparse's runtime: what ``ss.deploy`` builds a fast inference model with, in two wings of one shape.

* :mod:`.cpu` - condensed layers on C kernels (``build``, ``layers``, ``planner``, ``kernels``; threads in
  ``cpus``, pooling, kept-dense layers, the check against the masked model);
* :mod:`.cuda` - 2:4 layers on cuSPARSELt and condensed layers on Triton kernels in CUDA graphs (``build``,
  ``layers``, ``planner``, ``kernels``; back-ends, forms, graphs, saved plans).

Shared by both: example inputs (:mod:`.example`), the folds (:mod:`.fold`), which layers may be swapped
(:mod:`.plain`), the one module swap and walk over masked layers (:mod:`.swap`), attention
(:mod:`.attention`), and timing (:mod:`.timing`). :func:`deploy` below only picks the wing.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SemisparseError
from .cpu.build import deploy_cpu
from .cpu.layers import deployed_layers
from .cuda.build import deploy_cuda
from .example import default_example_input

__all__ = ["deploy", "deployed_layers", "default_example_input"]


def deploy(
    model: nn.Module,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    batch_size: int = 1,
    example_input: torch.Tensor | tuple | None = None,
    *,
    plan: str = "measure",
    fold: bool = True,
    fold_bn: bool = True,
    reps: int = 20,
    graph: bool = True,
) -> nn.Module:
    """A copy of ``model`` for inference whose sparse layers run condensed kernels; outputs equal the
    masked dense model's (for finite inputs: condensed layers compute the pruned layer, so NaN/Inf that only
    pruned weights would read do not propagate, :mod:`.cpu.layers`). ``dtype=torch.bfloat16`` keeps condensed
    values in bf16 with fp32 accumulation; other dtypes, or bf16 without the kernels, run dense.

    ``model`` must hold semisparse masks (``ss.sparsify`` or ``ss.load``). ``plan``: ``"measure"`` (time
    every layer at ``example_input``, default ``batch_size`` inputs of the size the model records
    (``ss.load`` / training checkpoints: the size it was trained at), else ``(batch_size, C, 224, 224)``
    guessed from the first conv with a one-line warning; ``semisparse_plan["input_shape"]`` says which), keep
    dense where the kernel is not faster, then check the whole model is not slower than torch's dense model,
    NCHW or channels-last), ``"condensed"`` (every sparse layer condensed, no timing) or ``"dense"``.
    A batch of images or sequences (one tensor input of 3+ dimensions, batch 2 or more, no forward hooks on
    submodules) is planned at one sample first and timed whole against sample by sample, where activations
    stay in cache; the faster is kept if it computes the same outputs (``semisparse_plan["batch"]``; where whole
    batches win, the layers are planned again at the batch).
    ``fold``: ablated neurons of a Linear that is followed (in an ``nn.Sequential``) only by elementwise
    modules and another Linear are removed, and the next Linear drops the matching input columns (their
    constant contribution goes into its bias).
    ``fold_bn``: every eval BatchNorm fed only by a Conv (sparse or dense) is folded into that conv's weight
    and bias and becomes ``nn.Identity`` (:mod:`.fold`; nothing folded if ``torch.fx`` cannot trace the model).
    Dense-mode layers run the best dense form the planner measured (a 1x1 conv may run as one matrix
    product, ``dense-gemm``), and each plain ``nn.MaxPool2d`` becomes :class:`.cpu.pool.MaxPool2d`, which runs
    semisparse's pooling kernel where the planner measured it faster than torch's. After ``"measure"``, a
    layer kept plain dense is torch's own module again (``nn.Linear``/``ConvNd`` subclasses that carry the
    planner's report row, :mod:`.cpu.kept`), pooling left to torch is ``nn.MaxPool2d`` (hooks kept), and a
    model left with no semisparse code has no hooks: what it keeps dense costs what the original costs.
    ``deployed_layers`` lists the layers that run semisparse code.
    ``ss.report(deployed)`` shows each layer's kernel and measured ratio; ``deployed.semisparse_plan``
    holds the whole-model timing and the pooling choices.

    The result is in eval mode whatever mode ``model`` is in (``ss.load`` returns models in train mode):
    dropout off, BatchNorm on its running statistics; none of its parameters requires grad (``model``'s are
    untouched), so its outputs carry no autograd graph unless the input does. Each call of it (when it runs
    semisparse code) runs its kernels and its torch ops on no more threads than the CPUs the process may use
    at that moment (its CPU affinity, cgroup quota, and what other processes leave free: :mod:`.cpu.cpus`), since
    OpenMP threads beyond them spin-wait for each other; torch's thread count is as it was after the call.
    Only provably plain layers are replaced (:mod:`.plain`: exactly torch's ``nn.Linear`` / ``ConvNd`` /
    ``nn.MultiheadAttention``, or a subclass keeping their forward; forward hooks carried over); any other
    masked layer stays the module it is with its mask multiplied in, listed in ``ss.report`` as "left as is"
    with the reason (``semisparse_plan["left_as_is"]``). Deployed layers keep a ``weight`` (the masked dense
    weight) for code that reads it. The deployed model is checked against the masked model on the example
    input and a second input (:mod:`.cpu.verify`) before planning: a difference undoes the folds, or keeps the
    layers whose swap caused it as torch's modules, with a one-line warning (``semisparse_plan["undone"]``).
    A float64 / bf16 / fp16 model with ``dtype=None`` is deployed in its dtype (its sparse layers dense).
    An ``example_input`` the model refuses, with any ``plan``, is a ``SemisparseError``; deployed layers
    refuse what the original layers refuse, with the same errors (inputs the kernels do not take run torch's
    own op).

    ``device="cuda"``: 2:4 layers through cuSPARSELt in CUDA graphs (``graph=False``: eager), planned on the
    GPU; ``plan`` may then also be ``"sparse"`` or a file written by ``semisparse.runtime.cuda.save_plan``
    (see :func:`semisparse.runtime.cuda.deploy_cuda`).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SemisparseError(f"unknown device {str(device)[:40]!r}; expected 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        return deploy_cuda(model, dtype, batch_size, example_input, plan=plan, graph=graph, fold_bn=fold_bn,
                           reps=reps, device=device)
    if dev.type != "cpu":
        raise SemisparseError(f"deploy supports device='cpu' (condensed kernels); got {device!r}")
    return deploy_cpu(model, dtype, batch_size, example_input, plan=plan, fold=fold, fold_bn=fold_bn, reps=reps)
