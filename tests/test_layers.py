"""DESIGN.md's layer contract: a module imports only from its own layer or below."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"
LOWER = {
    "core": set(),
    "data": {"core"},
    "nn": {"core"},
    "retrieval": {"core", "data", "nn"},
    "optim": {"core", "nn"},
    "parallel": {"core", "nn"},
    "eval": {"core", "data", "nn", "retrieval"},
    "train": {"core", "data", "nn", "retrieval", "optim", "parallel", "eval"},
    "serve": {"core", "data", "nn", "retrieval"},
    "export": {"core", "data", "nn", "retrieval"},
}
LAYER_3 = {"core", "data", "nn", "retrieval", "optim", "parallel", "eval", "train", "serve", "export"}
for package in ("scaling", "continual", "synth", "report"):
    LOWER[package] = LAYER_3
ALL = set(LOWER) | {"cli"}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this file's package
                base = path.relative_to(SRC.parent).with_suffix("").parts[: -node.level]
                found.append((node.lineno, ".".join(base + ((node.module,) if node.module else ()))))
            elif node.module:
                found.append((node.lineno, node.module))
    return found


def test_every_import_respects_the_layers():
    violations = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).parts
        if len(parts) == 1:
            continue  # lmforge/__init__.py and __main__.py may import anything
        package = parts[0]
        allowed = ALL if package == "cli" else LOWER[package] | {package}
        for line, module in _imports(path):
            names = module.split(".")
            if names[0] == "lmforge" and len(names) > 1 and names[1] not in allowed:
                violations.append(f"{path.relative_to(SRC)}:{line} imports {module} (allowed: {sorted(allowed)})")
            if package == "nn" and module.startswith("torch.distributed"):
                violations.append(f"{path.relative_to(SRC)}:{line} nn must not use torch.distributed")
            if module.startswith("lmforge.cli") and package != "cli":
                violations.append(f"{path.relative_to(SRC)}:{line} nothing imports the cli")
            if package == "scaling" and path.name.startswith("fit") and names[0] == "torch":
                violations.append(f"{path.relative_to(SRC)}:{line} scaling.fit needs no torch")
    assert not violations, "layer violations:\n" + "\n".join(violations)


def test_every_package_is_known():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= ALL, packages - ALL


def test_only_the_cli_parses_arguments():
    """Command-line code lives in cli/; the library takes typed arguments, never an argparse namespace."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).parts[0] == "cli":
            continue
        offenders += [f"{path.relative_to(SRC)}:{line}" for line, module in _imports(path)
                      if module.split(".")[0] == "argparse"]
    assert not offenders, "argparse outside cli/:\n" + "\n".join(offenders)
