"""The stateful piece of dynamic sparse training: masks on the model, changed every ``delta`` steps.

:class:`DynamicSparsity` composes a layer budget (:class:`~.budgets.LayerBudget`), an update schedule
(:class:`~.schedule.UpdateSchedule`) and a rule (:mod:`.rules`: :class:`~.rules.Unstructured` for
RigL, :class:`~.rules.ConstantFanIn` for SRigL with neuron ablation, :class:`~.rules.NMGroups` for
prune and regrow inside each group of M), each chosen once and passed in. The short factories in
:mod:`.api` (``ss.RigL``, ``ss.SRigL``) are what users call.

Masks are the core's :class:`~semisparse.masking.Mask` parametrizations (``ss.masks``, ``ss.check`` and
``ss.finalize`` see them; the mask is a buffer in the model's state_dict). A fan-in layer stores its
current ``k`` in the parametrization's ``target``, so ``ss.check`` verifies constant fan-in.

**Where the dense gradient comes from.** Growth needs the gradient of the loss with respect to the
*effective* weight ``original * mask`` - non-zero at inactive positions, unlike ``original.grad``. A
forward hook on each ``Mask`` parametrization module (registered here, in ``_capture``) passes the effective
weight it returns through :class:`GradTap`, whose backward adds the incoming gradient to a per-layer buffer
(zeros allocated between steps, so a ``torch.compile``d forward only adds to them: no graph break). It only
does so while the coming optimizer step is an update step, so other steps cost nothing. The buffer sums
the micro-batches of gradient accumulation; at the update it is averaged over the ranks of
``torch.distributed`` when that is initialised, so every rank computes the same new masks.

Pruned and regrown weights are zeroed in the dense ``original`` and their optimizer state (SGD momentum,
Adam/AdamW moments: every state tensor of the weight's shape) is reset, so masked weights stay exactly 0.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from ..errors import SemisparseError
from ..layout import Candidate
from ..masking.coverage import Report, build_report
from ..masking.parametrization import Mask, attach
from . import checks
from .budgets import LayerBudget
from .rules import Rule, SparseLayer, Start
from .schedule import UpdateSchedule
from .selection import LayerSelection, refuse_ddp, select_layers


def reset_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, keep: torch.Tensor) -> None:
    """Zero every optimizer state tensor of ``param``'s shape outside the bool ``keep`` (momentum, moments)."""
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.mul_(keep.to(value.device))


class GradTap(torch.autograd.Function):
    """Identity on the effective weight; backward adds the gradient to ``buffer`` (the dense-gradient capture)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(buffer)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (buffer,) = ctx.saved_tensors
        buffer.add_(grad)
        return grad, None


#: Std of a sparse weight's initial value times ``sqrt(its kept fan-in)`` (He init for ReLU nets).
INIT_GAIN = math.sqrt(2.0)


def _ending(schedule: UpdateSchedule) -> UpdateSchedule:
    """``schedule`` with its end fixed (a static one ends at once); one line if an updating one has none."""
    if schedule.t_end is None and schedule.static:
        return schedule.until(1)
    schedule.end()
    return schedule


class DynamicSparsity:
    """Dynamic sparse training scheduler; call :meth:`step` after every ``optimizer.step()``.

    Construction validates everything, then sparsifies ``model`` (random masks meeting the budget),
    re-initialises the sparse weights with the std of their real fan-in (``init_gain / sqrt(fan_in)``,
    ``sqrt(2 / fan_in)`` for ReLU nets) unless ``sparse_init=False``, and hooks the dense-gradient capture.
    Resume: build model, optimizer and scheduler as at the start, then load the three state_dicts.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        rule: Rule,
        budget: LayerBudget | None,
        schedule: UpdateSchedule,
        *,
        layers: LayerSelection | None = None,
        sparse_init: bool = True,
        init_gain: float = INIT_GAIN,
        seed: int = 0,
        grad_steps: int = 1,
    ) -> None:
        checks.number("grad_steps", grad_steps, 1, integer=True, example="1 optimizer step")
        schedule = _ending(schedule)
        sel = select_layers(model, optimizer, rule.pattern, "dynamic sparse training", layers)
        candidates, eligible, forced, budgeted = sel.candidates, sel.eligible, sel.dense, sel.budgeted
        shapes = [c.weight_shape for c in budgeted]
        densities = rule.densities(shapes, budget)
        classifier = eligible[-1]

        gen = torch.Generator().manual_seed(int(seed))
        chosen: list[tuple[Candidate, Start]] = []
        dense_reason: dict[int, str] = {id(c): "kept dense (dense_layers)" for c in forced}
        for c, d, shape in zip(budgeted, densities, shapes):
            start = rule.start(torch.rand(shape[0], math.prod(shape[1:]), generator=gen), d)
            if start is None:
                dense_reason[id(c)] = f"{budget.distribution} density {d:.2f}: kept dense"
                continue
            chosen.append((c, start))

        # Everything is validated and computed: only now is the model modified.
        self.model = model
        self.optimizer = optimizer
        self.rule = rule
        self.schedule = schedule
        self.sparsity = rule.sparsity(budget)
        self.layers: list[SparseLayer] = []
        self._dense_grads: dict[str, torch.Tensor] = {}
        self._accumulate = False
        self.grad_steps = grad_steps
        self._step = 0
        self._handles = []
        for c, start in chosen:
            mask = c.layout.from_view(start.mask).to(getattr(c.module, c.param).device)
            p = Mask(mask, c.layout, rule.target(start))
            attach(c.module, c.param, p)
            layer = SparseLayer(c.key, c.module, c.param, c.layout, p, start.budget, start.k0,
                                rule.ablates(c, classifier))
            self.layers.append(layer)
            with torch.no_grad():
                if sparse_init:
                    self._sparse_init(layer, init_gain, gen)
                layer.original.mul_(mask)
            reset_optimizer_state(optimizer, layer.original, mask)
            self._handles.append(p.register_forward_hook(self._capture(layer.key)))
        self._candidates = [
            Candidate(c.name, c.module, c.param, c.kind, None, dense_reason[id(c)]) if id(c) in dense_reason else c
            for c in candidates
        ]
        self._dense_params = sum(math.prod(c.weight_shape) for c in budgeted if id(c) in dense_reason)
        self._budget_params = sum(math.prod(s) for s in shapes)
        self._accumulate = self._capturing(0)
        self._grad_buffers()

    @property
    def method(self) -> str:
        """The method's name (``"rigl"``, ``"srigl"``, ``"nm"``), as the state_dict records it."""
        return self.rule.name

    # -- dense gradient capture ---------------------------------------------------------------------
    def _capture(self, key: str):
        def forward_hook(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor | None:
            if self._accumulate and torch.is_tensor(output) and output.requires_grad:
                return GradTap.apply(output, self._dense_grads[key])
            return None

        return forward_hook

    def _grad_buffers(self) -> None:
        """Zero dense-gradient buffers for the layers while capturing (allocated here, outside the forward)."""
        if self._accumulate:
            for layer in self.layers:
                if layer.key not in self._dense_grads:
                    self._dense_grads[layer.key] = torch.zeros_like(layer.original, memory_format=torch.preserve_format)

    def _gathered_grads(self) -> list[torch.Tensor]:
        """Per layer, the dense gradient summed over micro-batches and averaged over DDP ranks."""
        grads = []
        for layer in self.layers:
            g = self._dense_grads.get(layer.key)
            grads.append(g if g is not None else torch.zeros_like(layer.original))
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([g.reshape(-1).float() for g in grads])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            grads = [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]), grads)]
        return grads

    # -- the update ---------------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Optimizer steps seen so far."""
        return self._step

    def step(self, stepped: bool = True) -> bool:
        """Call after every ``optimizer.step()``. Returns True when the topology was updated.

        ``stepped=False``: the optimizer skipped this step (a GradScaler found inf/NaN gradients under fp16):
        it is not counted, and the gradients captured in it are dropped.
        """
        if not stepped:
            for buf in self._dense_grads.values():
                buf.zero_()
            return False
        self._step += 1
        due = self.schedule.is_update(self._step)
        updated = due and self.update(self.schedule.drop_fraction(self._step))
        self._accumulate = self._capturing(self._step)
        if due or not self._accumulate:
            self._dense_grads.clear()
        self._grad_buffers()
        return updated

    def _capturing(self, step: int) -> bool:
        """Whether the steps after ``step`` record the dense gradient: an update is at most ``grad_steps``
        optimizer steps away (the gradient is summed over those steps and their micro-batches)."""
        return any(self.schedule.is_update(step + i) for i in range(1, self.grad_steps + 1))

    @torch.no_grad()
    def update(self, drop_fraction: float) -> bool:
        """One topology update of every layer with the captured dense gradients; returns False, changing
        nothing, when any of them is not finite (an overflowed fp16 backward: growth would rank infs)."""
        grads = self._gathered_grads()
        if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return False
        for layer, g in zip(self.layers, grads):
            view, back = self.rule.view(layer)
            new, target = self.rule.update(layer, view(layer.mask.mask), view(layer.original), view(g),
                                               drop_fraction)
            self._apply(layer, back(new), target)
        return True

    def _apply(self, layer: SparseLayer, new: torch.Tensor, target: object) -> None:
        keep = new & layer.mask.mask  # survivors keep their value; pruned and newly grown start at 0
        layer.original.mul_(keep)
        reset_optimizer_state(self.optimizer, layer.original, keep)
        layer.mask.mask.copy_(new)
        layer.mask.target = target

    @staticmethod
    def _sparse_init(layer: SparseLayer, gain: float, gen: torch.Generator) -> None:
        """Normal init with std ``gain / sqrt(kept fan-in of the neuron)`` on the kept weights."""
        w = layer.original
        view = layer.layout.to_view(layer.mask.mask)
        fan = view.sum(1, keepdim=True).clamp(min=1).float()
        values = torch.randn(view.shape, generator=gen) * (gain / fan.sqrt()).cpu()
        w.copy_(layer.layout.from_view(values.to(w.device, w.dtype)))

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Step count and per-layer targets (masks and weights are in the model's state_dict)."""
        return {
            "rule": self.method,
            "step": self._step,
            "schedule": {"delta": self.schedule.delta, "t_end": self.schedule.t_end,
                         "alpha": self.schedule.alpha, "static": self.schedule.static},
            "dense_grads": {k: v.clone() for k, v in self._dense_grads.items()},  # mid-window (grad_steps > 1)
            "layers": {
                layer.key: {"budget": layer.budget, "k": layer.mask.target if isinstance(layer.mask.target, int)
                            else None}
                for layer in self.layers
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` of a scheduler built the same way."""
        if state.get("rule") != self.method:
            raise SemisparseError(f"state_dict is for rule {state.get('rule')!r}, this scheduler is {self.method!r}")
        saved = state.get("layers", {})
        mine = {layer.key: layer for layer in self.layers}
        if set(saved) != set(mine):
            diff = sorted(set(saved) ^ set(mine))
            raise SemisparseError(f"state_dict layers differ from this scheduler's: {', '.join(diff[:3])}")
        for key, info in saved.items():
            if info["budget"] != mine[key].budget:
                raise SemisparseError(f"state_dict budget of {key} is {info['budget']}, expected {mine[key].budget}")
            self.rule.restore(mine[key], info)
        self._step = int(state["step"])
        self._dense_grads = {k: v.clone() for k, v in state.get("dense_grads", {}).items()}
        self._accumulate = self._capturing(self._step)
        self._grad_buffers()

    # -- inspection ----------------------------------------------------------------------------------
    @property
    def achieved_sparsity(self) -> float:
        """Zero share over the budgeted layers (layers ERK made dense included)."""
        kept = sum(int(layer.mask.mask.sum()) for layer in self.layers) + self._dense_params
        return 1.0 - kept / self._budget_params

    def layer_stats(self) -> list[dict]:
        """Per sparse layer: key, kept weights, budget, fan-in k (constant fan-in), alive neurons."""
        out = []
        for layer in self.layers:
            view = layer.layout.to_view(layer.mask.mask)
            out.append({
                "key": layer.key, "kept": int(view.sum()), "budget": layer.budget,
                "k": layer.mask.target if isinstance(layer.mask.target, int) else None,
                "alive": int((view.sum(1) > 0).sum()), "neurons": view.shape[0],
            })
        return out

    def report(self, example_input: torch.Tensor | None = None) -> Report:
        """The core's coverage report plus the achieved sparsity and ablated neurons."""
        rep = build_report(refuse_ddp(self.model), self._candidates, example_input)
        target = f"{self.sparsity:.4g}"
        rep.notes.append(
            f"{self.method}: achieved sparsity {self.achieved_sparsity:.4f} over the budgeted layers "
            f"(target {target}); step {self._step}"
        )
        ablated = [f"{s['key']} {s['neurons'] - s['alive']}/{s['neurons']}" for s in self.layer_stats()
                   if s["alive"] < s["neurons"]]
        if ablated:
            rep.notes.append("ablated neurons: " + ", ".join(ablated))
        return rep

    def remove_hooks(self) -> None:
        """Detach the gradient-capture hooks (the masks stay); the scheduler cannot update afterwards."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.schedule = replace(self.schedule, static=True)

    def __repr__(self) -> str:
        s = self.schedule
        return (f"DynamicSparsity(rule={self.method!r}, sparsity={self.sparsity:.4g}, layers={len(self.layers)}, "
                f"delta={s.delta}, t_end={s.t_end}, alpha={s.alpha}, step={self._step})")
