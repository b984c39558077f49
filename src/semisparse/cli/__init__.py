"""``semisparse`` command line: ``semisparse <command> [args]``.

Each sub-command lives in its own module exposing ``get_args_parser()`` and ``main(argv) -> int``.
Errors the user can fix (:class:`~semisparse.SemisparseError`, missing files) print one line and exit 2;
``--debug`` anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import warnings

from .. import __version__
from ..errors import SemisparseError, UnverifiedFileWarning

COMMANDS = {
    "demo": ("semisparse.cli.demo", "train a small CNN on the bundled digits, sparsify it every way, compare"),
    "train": ("semisparse.cli.train", "train / fine-tune a model with masks or sparse training (torchvision flags)"),
    "prune": ("semisparse.cli.prune", "one-shot sparsity of a trained model (sparsegpt, wanda, magnitude)"),
    "bench": ("semisparse.cli.bench", "speed of dense vs sparse layers or whole models on this machine"),
    "eval": ("semisparse.cli.eval", "top-1/top-5 and loss of a training checkpoint or compressed file"),
    "report": ("semisparse.cli.inspect", "per-layer sparsity report of a checkpoint or compressed file"),
    "export": ("semisparse.cli.inspect", "write the compressed form of a training checkpoint"),
}


def _usage() -> str:
    lines = ["usage: semisparse <command> [args] [--debug]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`semisparse <command> --help` for the command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd in ("-V", "--version"):
        print(__version__)
        return 0
    if cmd not in COMMANDS:
        print(f"semisparse: error: unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[cmd][0])  # Ctrl-C while torch imports: one line too
        entry = getattr(module, f"main_{cmd}", None) or module.main
        with _notes_on_one_line():
            return int(entry(rest) or 0)
    except KeyboardInterrupt:
        print("semisparse: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user, the traceback only on request
        if debug or not isinstance(exc, (SemisparseError, FileNotFoundError, NotADirectoryError, PermissionError)):
            if debug:
                raise
            msg = f"semisparse: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)"
            print(msg, file=sys.stderr)
            return 1
        print(f"semisparse: error: {exc}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _notes_on_one_line():
    """Show semisparse's notes (a file loaded without a digest) as one ``semisparse: note:`` line each."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UnverifiedFileWarning):
            print(f"semisparse: note: {message}", file=sys.stderr, flush=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown
