"""Time and peak memory of calibrated one-shot 2:4 on a standard model (SparseGPT-style by default).

    OMP_NUM_THREADS=2 python benchmarks/oneshot_speed.py --model resnet50 --images 128 --threads 2

Runs ``ss.sparsify(model, "2:4", method=..., calibration=...)`` on ``--images`` random 224x224 images (the
speed and memory do not depend on the weights or the images; torchvision's random init, no download), and
prints wall time, the process's peak RSS (``ru_maxrss``), the machine load, and a few layers' relative
output errors. Acceptance on a 2-core machine: ResNet-50 and ViT-B/16 within 3 minutes and 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import torch
import torchvision

import semisparse as ss


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch", type=int, default=32, help="calibration batch size (batches are concatenated)")
    p.add_argument("--method", default="sparsegpt", choices=("sparsegpt", "wanda"))
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval().to(args.device)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(min(args.batch, args.images - i), 3, 224, 224, generator=g).to(args.device)
             for i in range(0, args.images, args.batch)]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load0 = os.getloadavg()
    done = []
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    rep = ss.sparsify(model, args.pattern, method=args.method, calibration=calib,
                      progress=lambda key, i, n: done.append((key, time.perf_counter() - t0)))
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ss.check(model)
    errs = [(r.name, r.extra["rel_err"]) for r in rep.sparse_layers]
    result = {
        "model": args.model, "method": args.method, "pattern": args.pattern, "images": args.images,
        "threads": args.threads, "device": args.device, "seconds": seconds, "cpu_seconds": cpu_seconds,
        "peak_rss_mb": peak, "rss_before_mb": rss0, "load_before": load0, "load_after": os.getloadavg(),
        "layers": len(rep.sparse_layers), "cpu": platform.processor() or platform.machine(),
        "rel_err_first_last": [errs[0], errs[-1]] if errs else [],
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
