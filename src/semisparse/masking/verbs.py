"""The masking verbs of the public API: ``sparsify``, ``masks``, ``check``, ``finalize``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import SemisparseError
from ..layout import Candidate, Layout, plan
from ..patterns import NM, FanIn, parse_pattern
from .coverage import Report, build_report
from .parametrization import Mask, SparseParametrization, Target, attach, detach, sparse_weights, structured_mask
from .permute import annotate_report, permute_channels

METHODS = ("magnitude", "random", "gumbel", "sparsegpt", "wanda")
CALIBRATED = ("sparsegpt", "wanda")
PRIORS = ("magnitude", *CALIBRATED)

# .gumbel is imported where learned masks are asked for: it loads numba (optional) when installed.


def _target_of_given(mask: torch.Tensor, layout: Layout, pattern: NM | FanIn | None) -> Target:
    if isinstance(pattern, NM):
        return pattern
    if isinstance(pattern, FanIn):
        return int(layout.to_view(mask).sum(1).max())
    return None


def _validate_options(method: str, options: Mapping[str, object]) -> None:
    allowed = {
        "magnitude": {"shared_rows"}, "random": {"seed", "shared_rows"},
        "sparsegpt": {"dampening", "blocksize", "progress", "shared_rows"},
        "wanda": {"progress", "shared_rows"},
    }.get(method)
    if allowed is None:
        return  # gumbel validates its own options
    unknown = sorted(set(options) - allowed)
    if unknown:
        extra = f" (accepted: {', '.join(sorted(allowed))})" if allowed else ""
        raise SemisparseError(f"unknown option(s) {', '.join(unknown)} for method={method!r}{extra}")
    shared = options.get("shared_rows", 1)
    if isinstance(shared, bool) or not isinstance(shared, int) or shared < 1:
        raise SemisparseError(f"shared_rows must be an int >= 1 (output rows that keep the same positions), "
                              f"got {shared!r}")
    seed = options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SemisparseError(f"seed must be an int (the random masks' generator seed), got {seed!r}")
    damp = options.get("dampening", 0.01)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not (0 < damp < float("inf")):
        raise SemisparseError(f"dampening must be a number > 0 (share of the Hessian's mean diagonal), got {damp!r}")
    block = options.get("blocksize", 128)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise SemisparseError(f"blocksize must be a positive int (columns per lazy update), got {block!r}")
    if options.get("progress") is not None and not callable(options["progress"]):
        raise SemisparseError("progress must be a callable (layer key, done, total)")


def _check_globs(value: object, what: str) -> None:
    """``include`` / ``exclude``: None, one module-name glob, or a list of them."""
    if value is None or isinstance(value, str):
        return
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return
    raise SemisparseError(f"{what} must be a module-name glob or a list of them (e.g. \"layer4.*\"), got {value!r}")


def _refuse_foreign_weights(candidates: Sequence[Candidate]) -> None:
    """A weight that torch computes (old-style ``weight_norm``) or already parametrizes is refused up front.

    Checked for every layer before any is changed, so a refusal leaves the model as it was.
    """
    for c in candidates:
        m = c.module
        if parametrize.is_parametrized(m, c.param):
            plist = m.parametrizations[c.param]
            foreign = [type(p).__name__ for p in plist if not isinstance(p, SparseParametrization)]
            if foreign:
                raise SemisparseError(
                    f"{c.key} already carries a torch parametrization ({', '.join(foreign)}); semisparse masks "
                    f"plain weights: fold it first with torch.nn.utils.parametrize.remove_parametrizations"
                    f"(module, {c.param!r}) (it keeps the current weight), then sparsify"
                )
        elif c.param not in m._parameters:
            hint = (
                "(torch.nn.utils.weight_norm computes it from weight_g/weight_v): remove it first with "
                "torch.nn.utils.remove_weight_norm(module)"
                if hasattr(m, f"{c.param}_g") and hasattr(m, f"{c.param}_v")
                else "(computed, not stored): make it an nn.Parameter of the layer"
            )
            raise SemisparseError(f"{c.key} is not a parameter of its layer {hint}, then sparsify")


def sparsify(
    model: nn.Module,
    pattern: str | float | NM | FanIn | None = "2:4",
    method: str = "magnitude",
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    example_input: torch.Tensor | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    *,
    pad: bool = False,
    ignore_linear: bool = False,
    ignore_grouped: bool = False,
    overwrite: bool = False,
    permute: bool = False,
    calibration: object = None,
    calib_batches: int | None = None,
    collect: Callable[[object], object] | None = None,
    recalibrate_bn: bool = False,
    **options: object,
) -> Report:
    """Put a sparsity mask on every eligible Linear, Conv and ``nn.MultiheadAttention`` projection weight.

    ``pattern`` is ``"N:M"`` or a float sparsity ``s`` (constant fan-in ``k = max(1, round((1-s)*fan_in))``
    per output neuron). ``method`` is ``"magnitude"``, ``"random"`` (option ``seed``) or ``"gumbel"``
    (learned masks). ``masks`` (``{"layer.weight": BoolTensor}``, e.g. from :func:`masks` of another copy)
    applies the given masks instead of computing any; they are checked against ``pattern``
    (``pattern=None`` accepts any structure). ``pad=True`` makes convs whose channels per group are not a
    multiple of M N:M along their kernel taps. An already sparsified model is an error unless
    ``overwrite=True`` (masks are recomputed from the dense weights kept underneath). ``permute=True``
    (N:M only) first reorders channels so N:M keeps more magnitude, keeping the model's function
    (:mod:`semisparse.masking.permute`); the report's ``extra`` holds the kept share before/after.
    ``shared_rows=4`` (every method): each block of 4 consecutive output
    neurons keeps the same positions, chosen by the block's summed scores (sparsegpt: summed OBS saliency, each
    row still reconstructed on its own; blocks counted within a conv group / q, k, v); every row still has the
    pattern (2:4 for GPU sparse tensor cores too), and a batch-1 CPU conv then feeds each loaded input to 4 rows
    (the ``rows4`` kernel setting).

    **Calibrated one-shot** (``method="sparsegpt"`` or ``"wanda"``, :mod:`semisparse.masking.oneshot`) needs
    ``calibration``: an iterable of input batches (tensor, tuple or dict), a DataLoader (first element of
    each batch, or ``collect(batch)``) or a ``forward_loop(model)`` callable; ``calib_batches`` caps it.
    Layers are pruned in forward order on the outputs of the already-pruned layers before them.
    ``"wanda"`` keeps the largest ``|W_ij| * ||x_j||``; ``"sparsegpt"`` (options ``dampening`` 0.01,
    ``blocksize`` 128) also reconstructs the kept weights: afterwards each layer's ``original`` holds the
    **reconstructed** weights at kept positions and the dense weights at pruned ones, so ``module.weight``,
    ``ss.finalize`` and ``ss.save`` give the reconstructed model (the dense model is not kept). The report
    shows the method and each layer's relative output error on the calibration inputs. ``recalibrate_bn=True``
    then re-estimates BatchNorm statistics on the same calibration (:func:`recalibrate_bn`).
    ``method="gumbel"`` takes ``prior_from="magnitude" | "wanda" | "sparsegpt"``: the learned masks start
    with that method's mask as their argmax (with ``"sparsegpt"``, on its reconstructed weights).
    Learned masks take ``shared_rows`` too: one mask learned per block of rows (:mod:`~semisparse.masking.gumbel`).

    Everything is validated before the model is touched: on error the model is unchanged.
    Returns the coverage :class:`Report` (MACs too when ``example_input`` is given).
    """
    if method not in METHODS:
        raise SemisparseError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    pat = None if pattern is None and masks is not None else parse_pattern(pattern)
    if pat is None and masks is None:
        raise SemisparseError('pattern=None is only allowed with masks=...; use "N:M" or a sparsity in (0, 1)')
    if masks is not None and method == "gumbel":
        raise SemisparseError("masks=... applies fixed masks; it cannot be combined with method='gumbel'")
    prior_from = options.pop("prior_from", None) if method == "gumbel" else None
    if prior_from is not None and prior_from not in PRIORS:
        raise SemisparseError(f"prior_from must be one of {', '.join(map(repr, PRIORS))}, got {prior_from!r}")
    calibrated = method in CALIBRATED or prior_from in CALIBRATED
    if calibrated and masks is not None:
        raise SemisparseError(f"masks=... applies fixed masks; it cannot be combined with method={method!r}")
    if calibrated and permute:
        raise SemisparseError("permute=True works with magnitude, random and gumbel masks, not calibrated ones")
    if not isinstance(recalibrate_bn, bool):
        raise SemisparseError(f"recalibrate_bn must be True or False, got {recalibrate_bn!r}")
    if recalibrate_bn and method not in ("magnitude", "random", *CALIBRATED):
        raise SemisparseError("recalibrate_bn=True is for one-shot methods (magnitude, random, wanda, sparsegpt)")
    if (recalibrate_bn or calibrated) and calibration is None:
        what = "recalibrate_bn=True" if not calibrated else f"method={method!r}" + (
            f" with prior_from={prior_from!r}" if prior_from else "")
        raise SemisparseError(
            f"{what} needs calibration=...: input batches, a DataLoader or a forward_loop(model) callable"
        )
    calib_keys = ("dampening", "blocksize", "progress")
    calib_opts = {k: options.pop(k) for k in calib_keys if k in options} if method == "gumbel" else {}
    _validate_options(method, options)
    if method == "gumbel":
        _validate_options("sparsegpt", calib_opts)
        if "shared_rows" in options:  # a calibrated prior for shared learned masks is itself shared
            calib_opts["shared_rows"] = options["shared_rows"]
    else:
        calib_opts = {k: options[k] for k in ("dampening", "blocksize", "progress", "shared_rows") if k in options}
    if method == "gumbel" and prior_from in CALIBRATED:  # fail before the calibration's work, not after
        from .gumbel import validate_options

        validate_options(options)
        if not isinstance(pat, NM):
            raise SemisparseError(f"method='gumbel' learns N:M masks; got {pat} (use a pattern like '2:4')")
    calib = None
    if calibrated or recalibrate_bn:
        from .calibration import prepare

        calib = prepare(calibration, model, calib_batches, collect)
    _check_globs(include, "include")
    _check_globs(exclude, "exclude")

    existing = list(sparse_weights(model))
    if existing and not overwrite:
        raise SemisparseError(
            f"model is already sparsified ({len(existing)} masked weights); pass overwrite=True to replace "
            "the masks, or call ss.finalize(model) first"
        )

    candidates = plan(
        model, pat, include, exclude, pad=pad, ignore_linear=ignore_linear, ignore_grouped=ignore_grouped
    )
    if masks is not None:
        _refuse_foreign_weights([c for c in candidates if c.eligible and c.key in masks])
    else:
        _refuse_foreign_weights([c for c in candidates if c.eligible])
    calibrated_results = None
    permuted = None
    if permute:
        if existing or masks is not None:
            raise SemisparseError("permute=True needs a dense model and computed masks (not masks=...)")
        if method == "gumbel":
            from .gumbel import validate_options

            validate_options(options)
        permuted = permute_channels(model, pat, candidates)
    existing_keys = {sw.key: sw for sw in existing}

    def dense_weight(c: Candidate) -> torch.Tensor:
        sw = existing_keys.get(c.key)
        return (sw.original if sw is not None else getattr(c.module, c.param)).detach()

    if masks is not None:
        by_key = {c.key: c for c in candidates}
        unknown = sorted(set(masks) - set(by_key))
        if unknown:
            raise SemisparseError(
                f"masks name weights that are not sparsifiable layers of this model: {', '.join(unknown[:5])}"
            )
        chosen = []
        for c in candidates:
            if c.key not in masks:
                if c.eligible:
                    skipped = Candidate(c.name, c.module, c.param, c.kind, None, "no mask given")
                    candidates[candidates.index(c)] = skipped
                continue
            if not c.eligible:
                raise SemisparseError(f"a mask was given for {c.key}, which cannot take it: {c.reason}")
            m = masks[c.key]
            if not isinstance(m, torch.Tensor) or tuple(m.shape) != c.weight_shape:
                got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                raise SemisparseError(f"mask for {c.key} has shape {got}; expected {c.weight_shape}")
            m = m.to(device=dense_weight(c).device, dtype=torch.bool)
            p = Mask(m, c.layout, _target_of_given(m, c.layout, pat))
            p.check(c.key)
            chosen.append((c, p))
    else:
        eligible = [c for c in candidates if c.eligible]
        if not eligible:
            reasons = sorted({c.reason for c in candidates}) or ["it has no Linear, Conv or MultiheadAttention layer"]
            raise SemisparseError(f"no layer of this model can take {pattern!r}: {'; '.join(reasons)}")
        if calibrated:
            from .oneshot import calibrated_masks

            calibrated_results, calib_notes = calibrated_masks(
                model, eligible, pat, method if method in CALIBRATED else prior_from, calib.concatenated(), **calib_opts
            )
        if method == "gumbel":
            from .gumbel import gumbel_parametrizations

            prior = None
            if prior_from == "wanda" or prior_from == "sparsegpt":
                prior = {k: (r.mask, r.weight) for k, r in calibrated_results.items()}
            chosen = gumbel_parametrizations(eligible, pat, dense_weight, options, prior_masks=prior)
        elif calibrated_results is not None:
            chosen = []
            for c in eligible:
                r = calibrated_results[c.key]
                p = Mask(r.mask, c.layout, r.target)
                p.calibrated = {"method": method, "rel_err": r.rel_error}
                chosen.append((c, p))
        else:
            gen = None
            if method == "random":
                gen = torch.Generator().manual_seed(int(options.get("seed", 0)))
            chosen = []
            for c in eligible:
                w = dense_weight(c)
                scores = w.abs() if method == "magnitude" else torch.rand(w.shape, generator=gen).to(w.device)
                m, target = structured_mask(scores, c.layout, pat, int(options.get("shared_rows", 1)))
                chosen.append((c, Mask(m, c.layout, target)))

    # Everything is computed and valid: only now is the model modified.
    for sw in existing:
        detach(sw.module, sw.param)
    for c, p in chosen:
        attach(c.module, c.param, p)
    if calibrated_results is not None:  # the reconstructed weights where kept, the dense ones where pruned
        with torch.no_grad():
            for c, _p in chosen:
                r = calibrated_results[c.key]
                original = c.module.parametrizations[c.param].original
                original.copy_(torch.where(r.mask, r.weight.to(original.dtype), original))
    notes = []
    if method == "gumbel":
        from .gumbel import apply_trainable

        notes = apply_trainable(model, options)
    elif existing:  # fixed masks replaced learned ones: nothing is mask training any more
        from .gumbel import restore_trainable

        restore_trainable(model)
    if recalibrate_bn:
        from .batchnorm import has_batchnorm
        from .batchnorm import recalibrate_bn as recalibrate

        if has_batchnorm(model):
            recalibrate(model, calib)
            notes.append("BatchNorm statistics re-estimated on the calibration inputs")
        else:
            notes.append("recalibrate_bn: the model has no BatchNorm layer; nothing to re-estimate")
    rep = build_report(model, candidates, example_input)
    if calibrated_results is not None:
        notes = [*calib_notes, *notes]
    rep.notes.extend(notes)
    if permuted is not None:
        annotate_report(rep, permuted)
    return rep


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"layer.weight": BoolTensor}`` for every sparsified weight, named as in the original state_dict.

    For learned masks this is the deterministic (argmax) mask. The tensors are copies.
    """
    return {sw.key: sw.parametrization.hard_mask().detach().clone() for sw in sparse_weights(model)}


def check(model: nn.Module) -> None:
    """Raise :class:`~semisparse.PatternError` naming the first layer whose mask breaks its pattern."""
    for sw in sparse_weights(model):
        sw.parametrization.check(sw.key)


def finalize(model: nn.Module) -> nn.Module:
    """Bake every mask into a plain weight and remove the parametrizations.

    The state_dict then has exactly the original model's keys; masked entries are zero. Learned masks
    use their deterministic mask, and what mask training froze (``trainable="mask"``, ``bn="freeze"``)
    trains again, also when the learned masks were replaced since (``overwrite=True``, ``ss.load``).
    Returns the same model.
    """
    from .gumbel import restore_trainable

    for sw in list(sparse_weights(model)):
        requires_grad = getattr(sw.parametrization, "original_requires_grad", None)
        detach(sw.module, sw.param, bake=True)
        if requires_grad is not None:
            getattr(sw.module, sw.param).requires_grad_(requires_grad)
    restore_trainable(model)  # a no-op unless mask training left its marks
    return model


def parametrization_of(model: nn.Module, key: str) -> SparseParametrization:
    """The parametrization on the weight named ``key`` (e.g. ``"fc.weight"``)."""
    for sw in sparse_weights(model):
        if sw.key == key:
            return sw.parametrization
    raise SemisparseError(f"{key!r} is not a sparsified weight of this model")
