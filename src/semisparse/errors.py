"""Exceptions raised by semisparse.

Every error is a ``ValueError`` subclass so callers that already guard bad input keep working; the
message is one line that says what was wrong and what is expected.
"""

from __future__ import annotations


class SemisparseError(ValueError):
    """Bad input to a semisparse call (pattern, method, model, file...)."""


class PatternError(SemisparseError):
    """A mask breaks the sparsity pattern its layer declares (raised by :func:`semisparse.check`)."""


class UnverifiedFileWarning(UserWarning):
    """A file was loaded without a corruption check: it records no digest (older semisparse, or foreign)."""
