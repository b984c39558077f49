"""The one check of each sparse-training argument: its name, the range it must lie in, one line if not.

Every value object of :mod:`semisparse.dst` (``LayerBudget``, ``UpdateSchedule``, ``ConstantFanIn``, ``SRSTE``,
:class:`~.settings.DSTSettings`) checks its own arguments with these functions, once, when it is built.
The error keeps the argument's name apart from the words, so ``semisparse train`` names its flag instead
(``sparsity`` -> ``--sparsity-level``) without checking the value again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import SemisparseError


class ArgumentError(SemisparseError):
    """A bad value of one argument: ``"{argument} must be {expected}, got {value!r}"``."""

    def __init__(self, argument: str, expected: str, value: object) -> None:
        self.argument, self.expected, self.value = argument, expected, value
        shown = repr(value)
        super().__init__(f"{argument} must be {expected}, got {shown if len(shown) <= 60 else shown[:60] + '...'}")

    def named(self, spelling: str) -> ArgumentError:
        """The same error with the argument spelled another way (a command-line flag)."""
        return ArgumentError(spelling, self.expected, self.value)


def number(argument: str, value: object, lo: float, hi: float = math.inf, *, integer: bool = False,
           open_lo: bool = False, open_hi: bool = False, example: str | None = None) -> float | int:
    """``value`` if it is a finite number (an int when ``integer``) in the range, else :class:`ArgumentError`.

    The range reads as written: ``[lo, hi]``, with ``open_lo`` / ``open_hi`` excluding a bound."""
    kind = "an int" if integer else "a number"
    if hi == math.inf:
        where = f"{'>' if open_lo else '>='} {_bound(lo)}"
    else:
        where = f"in {'(' if open_lo else '['}{_bound(lo)}, {_bound(hi)}{')' if open_hi else ']'}"
    expected = f"{kind} {where}" + (f" (e.g. {example})" if example else "")
    ok_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        raise ArgumentError(argument, expected, value)
    v = float(value)
    if not math.isfinite(v) or v < lo or v > hi or (open_lo and v == lo) or (open_hi and v == hi):
        raise ArgumentError(argument, expected, value)
    return value if integer else v


def _bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def choice(argument: str, value: object, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else :class:`ArgumentError` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ArgumentError(argument, f"one of {', '.join(choices)}", value)
    return value
