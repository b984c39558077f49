"""When the topology changes and by how much: an update every ``delta`` optimizer steps until ``t_end``,
dropping a fraction ``alpha`` of the active weights, decayed by a cosine to 0 at ``t_end`` (RigL).

Steps count optimizer steps, 1-based: ``step`` is the number of ``optimizer.step()`` calls done so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import SemisparseError


@dataclass(frozen=True)
class UpdateSchedule:
    """``delta``: steps between updates; ``t_end``: last step that may update (exclusive);
    ``alpha``: initial drop fraction; ``static``: never update (a static sparse network)."""

    delta: int = 100
    t_end: int = 1
    alpha: float = 0.3
    static: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.delta, bool) or not isinstance(self.delta, int) or self.delta <= 0:
            raise SemisparseError(f"delta must be a positive number of optimizer steps, got {self.delta!r}")
        if isinstance(self.t_end, bool) or not isinstance(self.t_end, int) or self.t_end <= 0:
            raise SemisparseError(
                f"t_end must be a positive number of optimizer steps (e.g. int(0.75 * total_steps)), "
                f"got {self.t_end!r}"
            )
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= float(a) <= 1.0:
            raise SemisparseError(f"alpha (drop fraction) must be in [0, 1], got {a!r}")

    def is_update(self, step: int) -> bool:
        """True when the optimizer step number ``step`` is followed by a topology update."""
        return not self.static and step > 0 and step % self.delta == 0 and step < self.t_end

    def drop_fraction(self, step: int) -> float:
        """``alpha / 2 * (1 + cos(pi * step / t_end))``: alpha at 0, 0 at ``t_end``."""
        if step >= self.t_end:
            return 0.0
        return float(self.alpha) / 2.0 * (1.0 + math.cos(math.pi * step / self.t_end))
