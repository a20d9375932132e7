"""The package's layout: lib/noduleflow grouped by stage, and no stage importing a later one (checked with ast)."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "lib" / "noduleflow"
# Stages in workflow order, each over the shared workflow support (the package's top-level modules); the command
# line entry point sits on top of everything.
ORDER = ["support", "metadata", "registration", "cache", "models", "evaluation", "entry"]
ENTRY_POINTS = {"noduleflow.cli"}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _stage(module: str) -> str:
    if module in ENTRY_POINTS:
        return "entry"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (PACKAGE / parts[-1]).is_dir() else "support"


def _imports(path: Path) -> set[str]:
    """The noduleflow modules `path` imports (`from noduleflow import x` names module x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "noduleflow":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists()
                found.add(candidate if is_module else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "noduleflow"}
    return found


def test_every_module_belongs_to_a_known_stage():
    stages = {_stage(_module(path)) for path in PACKAGE.rglob("*.py")}
    assert stages <= set(ORDER), stages - set(ORDER)
    assert {"metadata", "registration", "cache", "models", "evaluation"} <= stages


def test_no_module_imports_a_later_stage():
    upward = [f"{_module(path)} ({_stage(_module(path))}) imports {name} ({_stage(name)})"
              for path in sorted(PACKAGE.rglob("*.py")) for name in sorted(_imports(path))
              if ORDER.index(_stage(name)) > ORDER.index(_stage(_module(path)))]
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "probe.py"
    module.write_text("from noduleflow.evaluation.forecast import forecast_settings\nfrom noduleflow import io\n")
    assert _imports(module) == {"noduleflow.evaluation.forecast", "noduleflow.io"}
    assert ORDER.index(_stage("noduleflow.evaluation.forecast")) > ORDER.index(_stage("noduleflow.io"))
