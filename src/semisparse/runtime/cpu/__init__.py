"""Sparse inference on the CPU: condensed layers on C kernels, planned on the machine at hand.

``ss.deploy(model)`` calls :func:`~.build.deploy_cpu`. Modules, bottom up: :mod:`.cpus` (how many threads
the process may use now), :mod:`.kernels` (the C kernels: build, binding, wrappers), :mod:`.layers`
(condensed Linear and Conv), :mod:`.pool` (max pooling), :mod:`.transformer` (torch's fused encoder layers
around condensed attention), :mod:`.kept` (layers kept dense, as torch's own), :mod:`.planner`,
:mod:`.verify` (the deployed model against the masked one), :mod:`.build` (the deploy flow).
"""

from .build import deploy_cpu

__all__ = ["deploy_cpu"]
