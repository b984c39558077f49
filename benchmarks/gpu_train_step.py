"""Training-step speed of every sparsity mode on a GPU: one script, parts in priority order.

Parts, each under its own time cap inside an overall budget (a part or measurement that does not fit is
skipped and listed under "skipped"; the JSON is rewritten after every measurement, so a run cut short
still leaves what it measured):

1. ``check``        - the fused Triton kernels against the lean torch path on real layer shapes (same noise:
                      equal masks, close logit gradients).
2. ``eager``        - step time of dense, magnitude 2:4 (parametrization), learned 2:4 (``trainable="mask"``)
                      with each sampler (lean torch, fused Triton, ``torch.compile``d mask function) and SRigL
                      90% (delta=100, a step without update) on ResNet-50 and ViT-B/16: batch 64, bf16
                      autocast, channels-last for the CNN, SGD with momentum. CUDA events around every step
                      (GPU timeline, host gaps included), medians after warm-up, plus wall time per step.
3. ``launches``     - CUDA kernel launches and summed kernel time of one step (torch.profiler), aten ops.
4. ``srigl_update`` - one SRigL topology update over the model, and its share of training time at delta=100.
5. ``compiled``     - the whole model through ``torch.compile(fullgraph=True)`` for each mode: compile
                      time, then the step time as above; ResNet-50 first.

Ratios against dense (same model, same process) are in "ratios". On a GPU (H200, torch 2.11, Triton 3.6),
about 9 minutes with the default budget (``--budget-s``, ``--caps part=seconds,...``, ``--parts`` to choose):

    PYTHONPATH=src python benchmarks/gpu_train_step.py --json $OUT/gpu_train_step.json

``--smoke`` checks the script on CPU with tiny models (Triton under its interpreter, compiles with
``aot_eager``); its numbers mean nothing.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # Triton's interpreter must be chosen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import semisparse as ss  # noqa: E402
from semisparse.masking import gumbel, sampling_triton  # noqa: E402

LEARNED_BACKENDS = ("torch", "triton", "compiled")
VARIANTS = ("dense", "magnitude", "srigl90", "learned")  # learned last: its compiled sampler compiles first


# --- models -------------------------------------------------------------------------------------------------


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, num_classes),
    )  # fmt: skip


def tiny_vit(num_classes: int = 10) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=num_classes)  # fmt: skip


def model_spec(name: str) -> tuple[Callable[[], nn.Module], int, bool, int]:
    """(constructor, image side, channels-last, classes)."""
    if name == "tiny_cnn":
        return tiny_cnn, 16, True, 10
    if name == "tiny_vit":
        return tiny_vit, 16, False, 10
    import torchvision

    return getattr(torchvision.models, name), 224, name.startswith(("resnet", "convnext", "mobilenet")), 1000


# --- building one variant -------------------------------------------------------------------------------------


class Setup:
    """A model in one sparsity mode, its optimizer and what runs after each optimizer step."""

    def __init__(self, name: str, variant: str, device: torch.device, batch: int, steps: int, delta: int = 100) -> None:
        ctor, side, self.channels_last, classes = model_spec(name)
        torch.manual_seed(0)
        model = ctor(num_classes=classes) if name.startswith("tiny") else ctor(weights=None, num_classes=classes)
        model = model.to(device)
        self.sched = None
        if variant == "magnitude":
            ss.sparsify(model, "2:4")
        elif variant == "learned":
            ss.sparsify(model, "2:4", method="gumbel", trainable="mask", total_steps=steps)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        if variant == "srigl90":
            self.sched = ss.SRigL(model, self.opt, 0.9, t_end=10**9, delta=delta)
        self.model, self.variant, self.position = model.train(), variant, 0
        self.x = torch.randn(batch, 3, side, side, device=device)
        if self.channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, classes, (batch,), device=device)

    def step_fn(self, forward: nn.Module, amp: torch.dtype | None) -> Callable[[], None]:
        """forward + loss + backward + optimizer step + the sparsity call the training engine makes."""
        device_type = self.x.device.type

        def step() -> None:
            with torch.autocast(device_type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                loss = F.cross_entropy(forward(self.x), self.y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.position += 1
            if self.variant == "learned":
                gumbel.set_step(self.model, self.position)  # as the engine does: no device op when in step
            elif self.sched is not None:
                self.sched.step()

        return step


# --- timing ---------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, reps: int) -> dict:
    """Per-step CUDA-event times (GPU timeline, host gaps included), host time, wall time per step."""
    t0 = time.perf_counter()
    step()
    sync(device)
    first_s = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        step()
    sync(device)
    host, gpu = [], []
    cuda = device.type == "cuda"
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    events = events if cuda else []
    wall0 = time.perf_counter()
    for i in range(reps):
        h0 = time.perf_counter()
        if cuda:
            events[i][0].record()
        step()
        if cuda:
            events[i][1].record()
        host.append((time.perf_counter() - h0) * 1e3)
    sync(device)
    wall = (time.perf_counter() - wall0) * 1e3 / reps
    gpu = [a.elapsed_time(b) for a, b in events] if cuda else host
    q = statistics.quantiles(gpu, n=10) if len(gpu) >= 2 else [gpu[0]] * 9
    return {"median_ms": statistics.median(gpu), "p10_ms": q[0], "p90_ms": q[-1], "wall_ms_per_step": wall,
            "host_median_ms": statistics.median(host), "first_step_s": first_s, "reps": reps, "warmup": warmup}


def profile_step(step: Callable[[], None], device: torch.device) -> dict:
    """Kernel launches, summed kernel time and aten ops (nested included) of one step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        sync(device)
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]
    gpu_us = sum(e.time_range.elapsed_us() for e in kernels)
    return {"kernel_launches": len(kernels), "kernel_time_ms": gpu_us / 1e3,
            "aten_ops": sum(1 for e in events if e.name.startswith("aten::"))}


# --- the run --------------------------------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.device = torch.device(args.device)
        self.result: dict = {"env": env_info(self.device), "settings": vars(args).copy(), "parts": {},
                             "skipped": [], "errors": [], "ratios": {}}  # fmt: skip
        self.part_end = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def start_part(self, name: str, cap_s: float) -> bool:
        left = self.args.budget_s - self.elapsed()
        self.part_end = self.elapsed() + min(cap_s, left)
        if left <= 5:
            self.result["skipped"].append(f"{name}: overall budget spent")
            return False
        print(f"== {name} (cap {min(cap_s, left):.0f}s, {self.elapsed():.0f}s elapsed)", flush=True)
        self.result["parts"].setdefault(name, {})
        return True

    def fits(self, what: str, need_s: float) -> bool:
        if self.elapsed() + need_s > self.part_end:
            self.result["skipped"].append(f"{what}: time cap")
            print(f"   skipped {what}: time cap", flush=True)
            return False
        return True

    def record(self, part: str, keys: tuple[str, ...], value: object) -> None:
        node = self.result["parts"].setdefault(part, {})
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        print(f"   {part} {'/'.join(keys)}: {short(value)}", flush=True)
        self.save()

    def error(self, what: str, exc: BaseException) -> None:
        line = f"{what}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        self.result["errors"].append(line)
        print(f"   ERROR {line}", flush=True)
        if self.args.smoke:
            traceback.print_exc()
        self.save()

    def save(self) -> None:
        self.result["elapsed_s"] = self.elapsed()
        self.result["ratios"] = ratios(self.result["parts"])
        if self.args.json:
            tmp = f"{self.args.json}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.result, f, indent=1)
            os.replace(tmp, self.args.json)


def short(value: object) -> str:
    if isinstance(value, dict):
        keys = ("median_ms", "wall_ms_per_step", "kernel_launches", "update_ms", "share_at_delta_100", "ok")
        return ", ".join(f"{k}={value[k]:.4g}" if isinstance(value[k], float) else f"{k}={value[k]}"
                         for k in keys if k in value) or str(value)[:120]  # fmt: skip
    return str(value)[:120]


def ratios(parts: dict) -> dict:
    """Step-time ratios against dense for every model of the eager and compiled parts."""
    out = {}
    for part in ("eager", "compiled"):
        for model, rows in parts.get(part, {}).items():
            dense = rows.get("dense", {}).get("median_ms")
            if not dense:
                continue
            for variant, row in rows.items():
                if isinstance(row, dict) and "median_ms" in row:
                    out.setdefault(part, {}).setdefault(model, {})[variant] = round(row["median_ms"] / dense, 4)
    eager, compiled = parts.get("eager", {}), parts.get("compiled", {})
    for model, rows in compiled.items():
        for variant, row in rows.items():
            e = eager.get(model, {}).get(variant if variant != "learned" else "learned_torch", {})
            if isinstance(row, dict) and "median_ms" in row and e.get("median_ms"):
                out.setdefault("compiled_vs_eager", {}).setdefault(model, {})[variant] = round(
                    row["median_ms"] / e["median_ms"], 4)  # fmt: skip
    return out


def env_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "triton": getattr(sampling_triton.triton, "__version__", None), "cuda": torch.version.cuda,
            "triton_interpret": sampling_triton.interpreting()}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()  # fmt: skip
    except OSError:
        pass
    return info


def part_check(run: Run) -> None:
    """Triton vs lean torch on real layer shapes: equal masks, close gradients, both directions."""
    from semisparse.layout import Layout
    from semisparse.masking.gumbel import GumbelMask, prior_logits
    from semisparse.patterns import NM

    shapes = [(8, 16, 3, 3), (12, 32)] if run.args.smoke else [(256, 256, 3, 3), (512, 2048, 1, 1), (1000, 2048),
                                                                (768, 3072)]  # fmt: skip
    if not sampling_triton.available():
        run.record("check", ("triton",), {"ok": False, "why": sampling_triton.why_unavailable()})
        return
    for shape in shapes:
        if not run.fits(f"check {shape}", 10):
            return
        try:
            torch.manual_seed(0)
            w = torch.randn(shape, device=run.device)
            if len(shape) == 4:
                w = w.contiguous(memory_format=torch.channels_last)
            layout = Layout("conv" if len(shape) > 2 else "rows", shape)
            logits = prior_logits(w, layout, NM(2, 4), 3.0)
            up = torch.randn(shape, device=run.device)
            outs = []
            for backend in ("torch", "triton"):
                gumbel.set_backend(backend)
                p = GumbelMask(layout, NM(2, 4), logits.clone(), total_steps=10, tau=(1.0, 1.0), scale=(2.0, 2.0))
                p.to(run.device).train()
                wg = w.detach().clone().requires_grad_(True)
                torch.manual_seed(1)
                out = p(wg)
                (out * up).sum().backward()
                outs.append((out.detach(), p.logits.grad, wg.grad, p.sampler(w)))
            (m0, g0, w0, s0), (m1, g1, w1, s1) = outs
            run.record("check", (str(shape),), {
                "ok": bool(torch.equal(m0, m1)) and bool(torch.allclose(g0, g1, rtol=1e-4, atol=1e-5)),
                "mask_equal_share": float((m0 == m1).float().mean()), "logit_grad_max_abs_diff":
                float((g0 - g1).abs().max()), "weight_grad_equal": bool(torch.equal(w0, w1)), "samplers": [s0, s1],
            })  # fmt: skip
        except Exception as exc:  # a benchmark: record and go on
            run.error(f"check {shape}", exc)
        finally:
            gumbel.set_backend("auto")


def part_eager(run: Run, models: list[str]) -> None:
    a = run.args
    for name in models:
        for variant in VARIANTS:
            backends = LEARNED_BACKENDS if variant == "learned" else (None,)
            if not run.fits(f"eager {name} {variant}", a.est_s):
                continue
            try:
                setup = Setup(name, variant, run.device, a.batch, a.warmup + a.reps + 10)
            except Exception as exc:
                run.error(f"eager {name} {variant} set-up", exc)
                continue
            for backend in backends:
                label = variant if backend is None else f"{variant}_{backend}"
                if backend is not None and not run.fits(f"eager {name} {label}", a.est_s / 2):
                    continue
                try:
                    if backend is not None:
                        gumbel.set_backend(backend)
                    run.record("eager", (name, label), time_steps(setup.step_fn(setup.model, run.amp), run.device,
                                                                  a.warmup, a.reps))  # fmt: skip
                except Exception as exc:
                    run.error(f"eager {name} {label}", exc)
                finally:
                    gumbel.set_backend("auto")
            del setup
            if run.device.type == "cuda":
                torch.cuda.empty_cache()


def part_launches(run: Run, models: list[str]) -> None:
    a = run.args
    for name in models:
        for variant in VARIANTS:
            backends = ("torch", "triton") if variant == "learned" else (None,)
            if not run.fits(f"launches {name} {variant}", a.est_s / 2):
                continue
            try:
                setup = Setup(name, variant, run.device, a.batch, 100)
                for backend in backends:
                    label = variant if backend is None else f"{variant}_{backend}"
                    if backend is not None:
                        gumbel.set_backend(backend)
                    step = setup.step_fn(setup.model, run.amp)
                    for _ in range(3):
                        step()
                    run.record("launches", (name, label), profile_step(step, run.device))
            except Exception as exc:
                run.error(f"launches {name} {variant}", exc)
            finally:
                gumbel.set_backend("auto")


def part_srigl_update(run: Run, models: list[str]) -> None:
    a = run.args
    for name in models:
        if not run.fits(f"srigl_update {name}", a.est_s):
            continue
        try:
            # delta=1: the dense gradient is captured in every backward; the steps below do not call
            # sched.step(), so the captured gradients stay for the timed updates
            setup = Setup(name, "srigl90", run.device, a.batch, 100, delta=1)
            sched, setup.sched = setup.sched, None
            step = setup.step_fn(setup.model, run.amp)
            for _ in range(3):
                step()
            times = []
            for _ in range(a.update_reps):
                sync(run.device)
                t0 = time.perf_counter()
                sched.update(0.3)
                sync(run.device)
                times.append((time.perf_counter() - t0) * 1e3)
            ss.check(setup.model)
            upd = statistics.median(times)
            eager_step = run.result["parts"].get("eager", {}).get(name, {}).get("srigl90", {}).get("median_ms")
            row = {"update_ms": upd, "update_ms_all": times, "layers": len(sched.layers)}
            if eager_step:
                row["share_at_delta_100"] = upd / (100 * eager_step + upd)
            run.record("srigl_update", (name,), row)
        except Exception as exc:
            run.error(f"srigl_update {name}", exc)


def part_compiled(run: Run, models: list[str]) -> None:
    a = run.args
    for name in models:
        for variant in ("dense", "learned", "srigl90", "magnitude"):
            if not run.fits(f"compiled {name} {variant}", a.compile_est_s):
                continue
            try:
                torch._dynamo.reset()
                setup = Setup(name, variant, run.device, a.batch, a.warmup + a.reps + 10)
                compiled = torch.compile(setup.model, fullgraph=True, backend=a.compile_backend)
                run.record("compiled", (name, variant), time_steps(setup.step_fn(compiled, run.amp), run.device,
                                                                   max(3, a.warmup), a.reps))  # fmt: skip
            except Exception as exc:
                run.error(f"compiled {name} {variant}", exc)
            finally:
                if run.device.type == "cuda":
                    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="write the results here (rewritten after every measurement)")
    p.add_argument("--models", default=None, help="comma-separated (default: resnet50,vit_b_16)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--update-reps", type=int, default=5)
    p.add_argument("--amp", default="bfloat16", choices=("bfloat16", "float16", "none"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget-s", type=float, default=540.0, help="overall time budget in seconds")
    p.add_argument("--caps", default="check=40,eager=300,launches=60,srigl_update=60,compiled=400",
                   help="per-part time caps in seconds, in priority order")
    p.add_argument("--est-s", type=float, default=25.0, help="expected seconds of one eager measurement")
    p.add_argument("--compile-est-s", type=float, default=120.0, help="expected seconds of one compiled one")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--parts", default="check,eager,launches,srigl_update,compiled")
    p.add_argument("--smoke", action="store_true", help="tiny models on CPU: checks the script, not the speed")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.batch, args.warmup, args.reps, args.update_reps = "cpu", 2, 2, 3, 2
        args.models = args.models or "tiny_cnn,tiny_vit"
        args.amp, args.compile_backend, args.est_s, args.compile_est_s = "none", "aot_eager", 1.0, 1.0
        gumbel._COMPILED["backend"] = "aot_eager"
    args.models = args.models or "resnet50,vit_b_16"
    models = [m for m in args.models.split(",") if m]
    caps = {k: float(v) for k, v in (item.split("=") for item in args.caps.split(","))}
    run = Run(args)
    run.amp = None if args.amp == "none" else getattr(torch, args.amp)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(json.dumps(run.result["env"]), flush=True)
    parts = {"check": lambda: part_check(run), "eager": lambda: part_eager(run, models),
             "launches": lambda: part_launches(run, models), "srigl_update": lambda: part_srigl_update(run, models),
             "compiled": lambda: part_compiled(run, models)}  # fmt: skip
    for name in args.parts.split(","):
        if run.start_part(name, caps.get(name, args.budget_s)):
            parts[name]()
    run.save()
    print(json.dumps(run.result["ratios"], indent=1))
    print(f"done in {run.elapsed():.0f}s; {len(run.result['errors'])} errors, {len(run.result['skipped'])} skipped")
    return 0 if not run.result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
