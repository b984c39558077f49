"""semisparse: semi-structured (N:M, constant fan-in) sparsity for PyTorch vision models, made fast.

The public API is a few verbs::

    import semisparse as ss
    rep = ss.sparsify(model, "2:4")          # masks on every eligible Linear / Conv / MHA projection
    ss.sparsify(model, "2:4", method="sparsegpt", calibration=batches)   # calibrated one-shot, no retraining
    ss.check(model); print(ss.report(model, example_input=x))
    ss.finalize(model)                       # plain weights, original state_dict keys
    sched = ss.SRigL(model, opt, sparsity=0.9, t_end=steps)   # or ss.RigL / ss.SRSTE; .step() after opt.step()
    fast = ss.deploy(model)                  # condensed CPU kernels where they win, never slower
    ss.save(model, "m.safetensors"); model = ss.load("m.safetensors")

(``ss.deploy`` is the function; the runtime it builds with is the package ``semisparse.runtime``.)
"""

from .dst import SRSTE, RigL, SRigL
from .errors import PatternError, SemisparseError, UnverifiedFileWarning
from .io.compressed import load, save
from .masking import check, finalize, masks, recalibrate_bn, report, sparsify
from .masking.coverage import Report
from .patterns import NM, FanIn, parse_pattern
from .runtime import deploy

__version__ = "0.1.0"

__all__ = [
    "PatternError",
    "SemisparseError",
    "UnverifiedFileWarning",
    "sparsify",
    "recalibrate_bn",
    "masks",
    "check",
    "report",
    "finalize",
    "Report",
    "NM",
    "FanIn",
    "parse_pattern",
    "deploy",
    "save",
    "load",
    "RigL",
    "SRigL",
    "SRSTE",
]
