"""When the topology changes and by how much: an update every ``delta`` optimizer steps until ``t_end``,
dropping a fraction ``alpha`` of the active weights, decayed by a cosine to 0 at ``t_end`` (RigL).

Steps count optimizer steps, 1-based: ``step`` is the number of ``optimizer.step()`` calls done so far.
``t_end`` is always a step number; a share of the run (``semisparse train --t-end 0.75``) is turned into one
by :meth:`UpdateSchedule.until` once the run's length is known.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from ..errors import SemisparseError
from . import checks


def check_t_end(t_end: object) -> int:
    """``t_end`` as a positive number of optimizer steps, or a one-line :class:`~.checks.ArgumentError`."""
    return checks.number("t_end", t_end, 1, integer=True, example="int(0.75 * total_steps)")


@dataclass(frozen=True)
class UpdateSchedule:
    """``delta``: steps between updates; ``t_end``: last step that may update (exclusive; None: fixed later
    by :meth:`until`); ``alpha``: initial drop fraction; ``static``: never update (a static sparse network)."""

    delta: int = 100
    t_end: int | None = 1
    alpha: float = 0.3
    static: bool = False

    def __post_init__(self) -> None:
        checks.number("delta", self.delta, 1, 2**31, integer=True, example="100 optimizer steps")
        if self.t_end is not None:
            check_t_end(self.t_end)
        checks.number("alpha", self.alpha, 0.0, 1.0, example="0.3")

    def until(self, t_end: int) -> UpdateSchedule:
        """This schedule ending at optimizer step ``t_end`` (only ``t_end`` is new, so only it is checked)."""
        done = copy.copy(self)
        object.__setattr__(done, "t_end", check_t_end(t_end))
        return done

    def end(self) -> int:
        """The step updates stop at; one line if it is not fixed yet."""
        if self.t_end is None:
            raise SemisparseError("t_end is required: the optimizer step after which the topology stays fixed "
                                  "(e.g. int(0.75 * total_steps))")
        return self.t_end

    def is_update(self, step: int) -> bool:
        """True when the optimizer step number ``step`` is followed by a topology update."""
        return not self.static and step > 0 and step % self.delta == 0 and step < self.end()

    def drop_fraction(self, step: int) -> float:
        """``alpha / 2 * (1 + cos(pi * step / t_end))``: alpha at 0, 0 at ``t_end``."""
        t_end = self.end()
        if step >= t_end:
            return 0.0
        return float(self.alpha) / 2.0 * (1.0 + math.cos(math.pi * step / t_end))
