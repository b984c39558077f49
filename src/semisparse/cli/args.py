"""argparse for the ``semisparse`` commands: every error one line (the README's promise), no usage dump."""

from __future__ import annotations

import argparse

from ..errors import SemisparseError


def short(message: str, limit: int = 200) -> str:
    """``message`` cut to ``limit`` characters: a huge value (a recipe's, a flag's) never fills an error."""
    return message if len(message) <= limit else message[:limit] + "... (truncated)"


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise one :class:`SemisparseError` line (``semisparse`` prints it
    and exits 2) instead of printing the usage; :meth:`hint` may add advice to a message."""

    def error(self, message: str):
        raise SemisparseError(self.hint(short(message)) + f" (see `{self.prog} --help`)")

    def hint(self, message: str) -> str:
        return message
