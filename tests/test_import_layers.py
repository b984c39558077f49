"""The package's import structure: folders import downward only, and no function shadows its module."""

import ast
import importlib
from pathlib import Path

import semisparse as ss

ROOT = Path(ss.__file__).parent

#: Bottom to top; a module may import only from units strictly below its own (and from its own unit).
RANKS = {
    "errors": 0, "indices": 0, "registry": 1, "patterns": 1, "layout": 2, "masking": 3,
    "dst": 4, "runtime": 4, "runtime.cpu": 5, "runtime.cuda": 5, "runtime.__init__": 6,
    "io": 7, "models": 8, "__init__": 9, "train": 10, "cli": 11, "__main__": 12,
}


def _unit(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return "__init__"
    if parts[0] == "runtime" and len(parts) > 1 and parts[1] in ("cpu", "cuda"):
        return f"runtime.{parts[1]}"
    if parts == ["runtime"]:
        return "runtime.__init__"
    return parts[0]


def _imports(path: Path) -> list[str]:
    """Every ``semisparse`` module ``path`` imports, at module level or inside a function."""
    rel = path.relative_to(ROOT.parent).with_suffix("")
    package = list(rel.parts[:-1]) if path.name != "__init__.py" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:  # `from . import kernels` imports a module
                sub = f"{mod}.{a.name}"
                is_module = (ROOT.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or (
                    ROOT.parent / Path(*sub.split("."))).is_dir()
                out.append(sub if is_module else mod)
    return [m for m in out if m == "semisparse" or m.startswith("semisparse.")]


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if path.name == "__init__.py" else rel.parts
    return ".".join(parts)


def test_every_import_points_to_a_lower_folder():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        mod = _module(path)
        for target in _imports(path):
            a, b = _unit(mod), _unit(target)
            if a != b and RANKS[b] >= RANKS[a]:
                upward.append(f"{mod} -> {target}")
    assert upward == []


def test_every_unit_has_a_rank():
    units = {_unit(_module(p)) for p in ROOT.rglob("*.py")}
    assert units <= set(RANKS), units - set(RANKS)


def test_the_wings_kernels_import_by_their_dotted_path():
    cpu = importlib.import_module("semisparse.runtime.cpu.kernels")
    import semisparse.runtime.cpu.kernels as K  # noqa: N812 - the form that failed while ss.deploy shadowed the package
    import semisparse.runtime.cuda.kernels as T  # noqa: N812

    assert K is cpu and callable(K.available) and callable(T.available)
    assert callable(ss.deploy) and ss.runtime.deploy is ss.deploy


def test_no_function_shadows_its_module():
    import semisparse.masking as masking
    import semisparse.masking.coverage as coverage

    assert callable(masking.report) and coverage.report is masking.report
    for path in ROOT.rglob("*.py"):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        mod = importlib.import_module(_module(path))
        parent = importlib.import_module(_module(path).rpartition(".")[0])
        child = getattr(parent, path.stem, None)
        assert child is None or child is mod, f"{parent.__name__}.{path.stem} is {child!r}, not the module"
