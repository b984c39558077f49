"""Sparse inference on NVIDIA GPUs: 2:4 layers on cuSPARSELt, constant fan-in layers on condensed Triton
kernels, CUDA graphs and a planner that never slows a model.

``ss.deploy(model, device="cuda", dtype=torch.bfloat16)`` calls :func:`deploy_cuda`. Modules, bottom up:

* :mod:`.backend` - cuSPARSELt through ``torch._cslt_*`` (keywords probed), or its CPU emulation;
* :mod:`.eligibility` - which masks and shapes run 2:4, padding sizes to multiples of 16, reasons;
* :mod:`.forms` - dense and 2:4 GEMMs; Linear, 1x1 conv (channels-last) and k x k conv lowerings;
* :mod:`.layers` - a layer with candidate forms (a registry other kernels can join) and its report row;
* :mod:`.kernels` - the condensed Triton kernels (GPU only);
* :mod:`.condensed_form` - constant fan-in layers through those kernels (any dtype), a form
  whose kernel configs the planner times one by one;
* :mod:`.graph` - one CUDA graph per input shape, static buffers, a bound on the number of shapes;
* :mod:`.planner` - per-layer choices, the whole-model check (timed by :mod:`..timing`'s graphed timers);
* :mod:`.plan_io` - save / load a plan with its compressed weights and algorithm ids;
* :mod:`.build` - the deploy flow.
"""

from . import condensed_form  # noqa: F401  (registers the "triton-condensed" form)
from .backend import CusparseltBackend, EmulatedBackend, require_cusparselt, unavailable_reason
from .build import deploy_cuda
from .graph import CudaGraphs, EmulatedGraphs, GraphedModule
from .layers import FORMS, PlannedLayer, register_form
from .plan_io import save_plan

__all__ = [
    "deploy_cuda",
    "save_plan",
    "register_form",
    "FORMS",
    "PlannedLayer",
    "GraphedModule",
    "CudaGraphs",
    "EmulatedGraphs",
    "CusparseltBackend",
    "EmulatedBackend",
    "require_cusparselt",
    "unavailable_reason",
]
