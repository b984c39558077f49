"""``semisparse demo``: the main job on the bundled digits, no arguments needed.

Trains the small digits CNN densely, then makes it sparse every way semisparse knows - one-shot magnitude
2:4 (with and without channel permutation, with BatchNorm statistics re-estimated), calibrated one-shot
2:4 (Wanda, SparseGPT-style reconstruction; 512 unlabeled images), magnitude 2:4 fine-tuned, learned 2:4
masks on the frozen dense weights, RigL and SRigL at 90% from scratch - deploys the SRigL model, and prints one table
(method, pattern, top-1, weights kept, share of MACs sparse, CPU latency vs dense). A speed section deploys
a standard model (ResNet-50 at 90% constant fan-in), since 8x8 digits are too small for kernels to matter.
Writes ``report.json`` and PNG plots into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import masking
from ..dst import DSTSettings
from ..io.files import write_json
from ..models import create_model
from ..runtime import deploy
from ..runtime.cpu import cpus
from ..runtime.timing import blocked_medians, interleaved_medians
from ..train import (
    SparsityConfig,
    TrainingSparsity,
    build_lr_scheduler,
    build_optimizer,
    evaluate,
    fit,
    load_data,
    make_loaders,
)
from .anchors import dense_anchors
from .bench import available_cpus, footnotes, load_sample, loaded, marks, others_busy


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("semisparse demo", description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--output-dir", default="demo-report", help="where report.json and the plots go")
    p.add_argument("--epochs", type=int, default=12, help="dense and from-scratch training epochs (default 12)")
    p.add_argument("--finetune-epochs", type=int, default=2, help="epochs of mask learning / fine-tuning (default 2)")
    p.add_argument("--sparsity", type=float, default=0.9, help="RigL/SRigL sparsity (default 0.9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed-model", default="resnet50", help="model for the speed section (default resnet50)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed section (ResNet-50 deploy)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


@dataclass
class Row:
    method: str
    pattern: str
    acc1: float
    kept: float  # share of all Linear/Conv weights kept (dense layers count as kept)
    mac_share: float  # share of Linear/Conv MACs under sparsity
    latency_ratio: float | None = None  # dense latency / this model's latency (batch 1, CPU)
    seconds: float = 0.0
    layers: list[dict] = field(default_factory=list)


class Demo:
    """Holds the data and the trained dense model; each ``row_*`` method adds one line of the table."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data = load_data("digits")
        torch.manual_seed(args.seed)
        self.train_loader, self.val_loader = make_loaders(self.data, batch_size=32, seed=args.seed)
        self.example = self.data.val[0][0][None]
        self.rows: list[Row] = []
        self.dense: nn.Module | None = None
        self.condensed: tuple[int, int] | None = None  # (condensed, sparse) layers of the deployed row

    # -- helpers ------------------------------------------------------------------------------------------
    def new_model(self) -> nn.Module:
        torch.manual_seed(self.args.seed)
        return create_model("digits_cnn", num_classes=self.data.num_classes)

    def train(self, model: nn.Module, epochs: int, lr: float, opt: str = "sgd",
              config: SparsityConfig | None = None) -> None:  # fmt: skip
        """The engine's loop, with its own sparsity wiring (as ``semisparse train`` uses it)."""
        steps = epochs * len(self.train_loader)
        sparsity = TrainingSparsity(config) if config is not None else None
        if sparsity is not None:
            sparsity.apply(model, total_steps=steps)
        optimizer = build_optimizer(model, opt, lr=lr, weight_decay=5e-4 if opt == "sgd" else 0.0)
        if sparsity is not None:
            sparsity.attach(model, optimizer, total_steps=steps)
        scheduler = build_lr_scheduler(optimizer, "cosineannealinglr", epochs=epochs)
        # Progress bars on a terminal; in a log (CI, `make demo | tee`) only the one line per row.
        show = sys.stderr.isatty() and not self.args.quiet
        fit(model, self.train_loader, self.val_loader, optimizer, scheduler, epochs, sparsity=sparsity,
            seed=self.args.seed, show_progress=show, print_freq=1000)  # fmt: skip

    def acc(self, model: nn.Module) -> float:
        return float(evaluate(model, nn.CrossEntropyLoss(), self.val_loader)["acc1"])

    def add(self, method: str, model: nn.Module, t0: float, latency_ratio: float | None = None) -> Row:
        rep = masking.report(model, example_input=self.example)
        sp = rep.sparse_layers
        pattern = "dense" if not sp else ", ".join(sorted({r.pattern for r in sp if not r.pattern.startswith("fan")}
                                                             | ({"fan-in"} if any(r.pattern.startswith("fan")
                                                                                  for r in sp) else set())))
        kept = sum(r.density * r.params for r in rep.layers) / max(1, sum(r.params for r in rep.layers))
        row = Row(method, pattern, self.acc(model), kept, rep.mac_share or 0.0, latency_ratio,
                  time.perf_counter() - t0, rep.to_dict()["layers"])  # fmt: skip
        self.rows.append(row)
        if not self.args.quiet:
            print(f"  {method}: top-1 {row.acc1:.2f}%  ({row.seconds:.1f} s)", flush=True)
        return row

    # -- the rows -----------------------------------------------------------------------------------------
    def row_dense(self) -> None:
        t0 = time.perf_counter()
        self.dense = self.new_model()
        self.train(self.dense, self.args.epochs, lr=0.05)
        self.add("dense", self.dense, t0)

    def row_magnitude(self, permute: bool = False, finetune: bool = False) -> None:
        t0 = time.perf_counter()
        model = copy.deepcopy(self.dense)
        masking.sparsify(model, "2:4", "magnitude", **({"permute": True} if permute else {}))
        if finetune:
            self.train(model, self.args.finetune_epochs, lr=0.01)
        name = "magnitude 2:4" + (" + permutation" if permute else "") + (" + fine-tune" if finetune else ", one-shot")
        self.add(name, model, t0)

    def calibration(self) -> list[torch.Tensor]:
        """512 unlabeled training images, the calibration set of the one-shot rows."""
        xs = torch.stack([self.data.train[i][0] for i in range(min(512, len(self.data.train)))])
        return list(xs.split(64))

    def row_oneshot(self, method: str, pattern: str = "2:4", recalibrate_bn: bool = False) -> None:
        """Calibrated one-shot (or magnitude with BatchNorm statistics re-estimated): no training at all."""
        t0 = time.perf_counter()
        model = copy.deepcopy(self.dense)
        masking.sparsify(model, pattern, method, calibration=self.calibration(), recalibrate_bn=recalibrate_bn)
        self.add(f"{method} {pattern}" + (" + BN recalibration" if recalibrate_bn else "") + ", one-shot", model, t0)

    def row_learned(self) -> None:
        t0 = time.perf_counter()
        model = copy.deepcopy(self.dense)
        self.train(model, self.args.finetune_epochs, lr=1e-2, opt="adamw",
                   config=SparsityConfig(method="gumbel", pattern="2:4", trainable="mask"))  # fmt: skip
        row = self.add("learned 2:4, frozen weights", model, t0)  # eval mode: the deterministic masks
        masking.finalize(model)
        if self.acc(model) != row.acc1:
            raise RuntimeError("ss.finalize changed the learned-mask model's accuracy")

    def row_dst(self, which: str) -> nn.Module:
        t0 = time.perf_counter()
        model = self.new_model()
        delta = max(1, len(self.train_loader) // 2)
        config = SparsityConfig(method="none", pattern=None,
                                dst=DSTSettings(which.lower(), sparsity=self.args.sparsity, delta=delta))
        self.train(model, self.args.epochs, lr=0.05, config=config)
        self.add(f"{which} {self.args.sparsity:.0%}", model, t0)
        return model

    def row_deployed(self, model: nn.Module, label: str) -> None:
        t0 = time.perf_counter()
        deployed = deploy(copy.deepcopy(model).eval(), batch_size=1)
        rows = [r for r in masking.report(deployed).layers if r.sparse]  # layers kept dense are torch's own
        self.condensed = (sum(r.extra.get("kernel", "").startswith("condensed") for r in rows), len(rows))
        dense_ms, deployed_ms = latency_ms([self.dense.eval(), deployed], self.example, reps=100)
        ratio = dense_ms / deployed_ms
        self.add(f"{label}, deployed", deployed, t0, latency_ratio=ratio)


def latency_ms(models: list[nn.Module], x: torch.Tensor, reps: int = 30, warmup: int = 5) -> list[float]:
    """Median wall time of each ``model(x)`` in milliseconds (inference mode), the models timed in turn within
    every repetition (:func:`~semisparse.runtime.timing.interleaved_medians`), so a slow spell of the machine
    hits them alike."""
    with torch.inference_mode():
        times = interleaved_medians([functools.partial(_fitted, m, x) for m in models], reps, warmup=warmup,
                                    budget_s=1e9)
    return [1000 * t for t in times]


def _fitted(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with cpus.fitted_threads():  # every side on the threads a deployed call gets: the CPUs free now
        return model(x)


def load_line() -> str:
    """The machine's load beside the CPUs this process may use: a ratio measured with the load above them is
    a busy machine's, not the kernels'."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "load unknown"
    n = available_cpus()
    return f"load avg {load:.2f} on {n} CPUs available" + (" (busy: timings unreliable)" if load > n else "")


def speed_section(name: str, sparsity: float, quiet: bool) -> dict:
    """Deploy ``name`` at ``sparsity`` constant fan-in and time batch 1 against the dense model."""
    torch.manual_seed(0)
    dense = create_model(name, num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224)
    sparse = copy.deepcopy(dense)
    rep = masking.sparsify(sparse, sparsity, example_input=x)
    t0 = time.perf_counter()
    deployed = deploy(sparse.eval(), batch_size=1, example_input=x)
    plan_s = time.perf_counter() - t0
    with torch.inference_mode():
        ref, out = sparse(x), deployed(x)
    err = float((out - ref).abs().max() / ref.abs().max())
    before = load_sample()
    dense_ms, fast_ms = latency_ms([dense, deployed], x, reps=20)
    others = others_busy(before, load_sample())
    # the FLOP bound: the MACs left after sparsity; a larger ratio is the dense side stalling, not a speed-up
    limit = 1.0 / max(1e-6, 1.0 - (rep.mac_share or 0.0) * sparsity)
    result = {"model": name, "sparsity": sparsity, "dense_ms": dense_ms, "deployed_ms": fast_ms,
              "speedup": dense_ms / fast_ms, "mac_share": rep.mac_share, "plan_seconds": plan_s,
              "max_rel_err": err, "flop_limit": limit, "above_limit": dense_ms / fast_ms > limit * 1.02,
              "others_busy_cpus": others, "loaded": loaded(others, torch.get_num_threads()),
              "load": load_line()}  # fmt: skip
    result.update(runtime_alone(sparse, deployed, x))
    if not quiet:
        print(f"  {name} at {sparsity:.0%} constant fan-in, batch 1: dense {dense_ms:.1f} ms, deployed "
              f"{fast_ms:.1f} ms -> {dense_ms / fast_ms:.2f}x{marks(result)} (planned in {plan_s:.1f} s; "
              f"{result['load']})", flush=True)  # fmt: skip
        if "onnxruntime_ms" in result:
            print(f"  {runtime_line(result)}", flush=True)
    return result


def runtime_alone(masked: nn.Module, deployed: nn.Module, x: torch.Tensor) -> dict:
    """The masked model in onnxruntime (the dense runtime a CPU model is served with) and the deployed model,
    each alone in blocks after a pause (onnxruntime's spinning threads would slow a call made right after
    its own); empty when onnxruntime is not installed or cannot run the model."""
    anchors, _ = dense_anchors(masked, x, torch.get_num_threads(), runtimes=("onnxruntime",))
    if not anchors:
        return {}
    with torch.inference_mode():
        dep_s, ort_s = blocked_medians([functools.partial(_fitted, deployed, x), anchors[0].fn], 20, rounds=5,
                                       warmup=2, settle_s=0.5)
    return {"onnxruntime_ms": 1e3 * ort_s, "deployed_alone_ms": 1e3 * dep_s, "vs_onnxruntime": ort_s / dep_s}


def runtime_line(speed: dict) -> str:
    return (f"against onnxruntime (dense, each alone in blocks): onnxruntime {speed['onnxruntime_ms']:.1f} ms, "
            f"deployed {speed['deployed_alone_ms']:.1f} ms -> {speed['vs_onnxruntime']:.2f}x")


def format_table(rows: list[Row]) -> str:
    head = ["method", "pattern", "top-1 %", "weights kept", "MACs sparse", "CPU speed vs dense"]
    body = [[r.method, r.pattern, f"{r.acc1:.2f}", f"{r.kept:.0%}" if r.pattern != "dense" else "100%",
             f"{r.mac_share:.0%}", "" if r.latency_ratio is None else f"{r.latency_ratio:.2f}x"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])


_STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--"), ("X", "-."), ("*", ":")]


def accuracy_figure(rows: list[Row]):
    """Horizontal bars of top-1 per method, each labelled with its value; the axis starts at a round floor
    below the worst row (a multiple of 10), so differences show without a misleading cut."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.4 * len(rows) + 1.5))
    bars = ax.barh([r.method for r in rows][::-1], [r.acc1 for r in rows][::-1], color="tab:blue")
    ax.bar_label(bars, labels=[f"{r.acc1:.1f}" for r in rows][::-1], padding=3, fontsize=8)
    lo = min(r.acc1 for r in rows)
    ax.set_xlim(max(0.0, 10.0 * ((lo - 5.0) // 10.0)), 103)
    ax.set_xlabel("validation top-1 (%) on digits")
    ax.set_title("semisparse demo: accuracy per method")
    fig.tight_layout()
    return fig


def density_figure(rows: list[Row]):
    """Per-layer kept share, one line per sparse row. Rows with the same densities (every 2:4 method) would
    coincide: each line gets its own marker and dash and a small sideways offset, and the legend sits outside
    the axes so it hides no data."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    shown = [r for r in rows if r.pattern != "dense" and "deployed" not in r.method]
    names: list[str] = []
    for i, r in enumerate(shown):
        names = [lay["name"] for lay in r.layers]
        marker, dash = _STYLES[i % len(_STYLES)]
        offset = (i - (len(shown) - 1) / 2) * 0.06
        ax.plot([j + offset for j in range(len(names))], [lay["density"] for lay in r.layers], marker=marker,
                linestyle=dash, markersize=6, alpha=0.85, label=r.method)  # fmt: skip
    ax.set_xticks(range(len(names)), [n.replace(".weight", "") for n in names], rotation=30, ha="right")
    ax.set_ylabel("kept share of weights")
    ax.set_ylim(0, 1.05)
    ax.set_title("per-layer density")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def plot(rows: list[Row], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, make in (("accuracy.png", accuracy_figure), ("density.png", density_figure)):
        fig = make(rows)
        paths.append(os.path.join(out_dir, name))
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    # The digits CNN is tiny: one thread trains it fastest (a thread pool only adds overhead);
    # the speed section uses every thread it was given.
    torch.set_num_threads(1)
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.perf_counter()
    demo = Demo(args)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))  # noqa: E731
    say(f"semisparse demo: digits ({len(demo.data.train)} train / {len(demo.data.val)} val images)")
    say("[1/4] dense training")
    demo.row_dense()
    say("[2/4] one-shot 2:4 (magnitude, calibrated), fine-tuned 2:4, learned 2:4 masks on frozen weights")
    demo.row_magnitude()
    demo.row_magnitude(permute=True)
    if masking.batchnorm.has_batchnorm(demo.dense):  # the digits CNN has none: the row would repeat magnitude's
        demo.row_oneshot("magnitude", recalibrate_bn=True)
    demo.row_oneshot("wanda")
    demo.row_oneshot("sparsegpt")
    demo.row_magnitude(finetune=True)
    demo.row_learned()
    say(f"[3/4] dynamic sparse training at {args.sparsity:.0%} from scratch")
    demo.row_dst("RigL")
    srigl = demo.row_dst("SRigL")
    demo.row_deployed(srigl, f"SRigL {args.sparsity:.0%}")
    speed = None
    torch.set_num_threads(threads)
    if not args.no_speed:
        say(f"[4/4] speed: {args.speed_model} deployed on this CPU ({threads} threads)")
        speed = speed_section(args.speed_model, args.sparsity, args.quiet)
    table = format_table(demo.rows)
    print()
    print(table)
    load = load_line()
    print(f"(CPU speed: batch 1, dense and deployed timed interleaved on the same thread sizing; {load})")
    if demo.condensed is not None:
        print(f"(the 8x8 digits CNN is too small for sparse kernels to matter much: the planner ran "
              f"{demo.condensed[0]} of its {demo.condensed[1]} sparse layers condensed; the speed line below is a "
              "standard model)")
    if speed:
        print(f"\n{speed['model']} at {speed['sparsity']:.0%} constant fan-in, batch 1, {torch.get_num_threads()} "
              f"threads (dense given the same thread sizing): dense {speed['dense_ms']:.1f} ms, deployed "
              f"{speed['deployed_ms']:.1f} ms ({speed['speedup']:.2f}x{marks(speed)}, FLOP limit "
              f"{speed['flop_limit']:.2f}x; {speed['load']})")  # fmt: skip
        if "onnxruntime_ms" in speed:
            print(runtime_line(speed))
        for line in footnotes([dict(speed, kind="model")]):
            print(line)
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},  # fmt: skip
        "args": vars(args),
        "rows": [r.__dict__ for r in demo.rows],
        "speed": speed,
        "load": load,
        "seconds": time.perf_counter() - start,
    }
    write_json(os.path.join(args.output_dir, "report.json"), report, indent=2)
    paths = plot(demo.rows, args.output_dir)
    print(f"\nwrote {os.path.join(args.output_dir, 'report.json')}, {', '.join(paths)} "
          f"in {report['seconds']:.0f} s")  # fmt: skip
    return 0
