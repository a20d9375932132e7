"""The modules a workflow script imports, found without running it, and the digest that changes with them."""

from pathlib import Path

from noduleflow.code_tracking import code_digest, imported_modules


def _package(root: Path) -> Path:
    """noduleflow/ with: a <- b (relative), sub/c <- sub/d (relative, in a function), e unused, and a script."""
    files = {
        "noduleflow/__init__.py": "",
        "noduleflow/a.py": "from .b import helper\n",
        "noduleflow/b.py": "import numpy\n\ndef helper():\n    return 1\n",
        "noduleflow/sub/__init__.py": "",
        "noduleflow/sub/c.py": "def run():\n    from . import d\n    return d\n",
        "noduleflow/sub/d.py": "from ..b import helper\n",
        "noduleflow/e.py": "",
        "script.py": "import os\nfrom noduleflow import a\nfrom noduleflow.sub.c import run\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "noduleflow"


def test_imports_are_followed_through_relative_and_function_level_imports(tmp_path):
    package = _package(tmp_path)
    found = [path.relative_to(package).as_posix() for path in imported_modules(tmp_path / "script.py", package)]
    assert found == ["__init__.py", "a.py", "b.py", "sub/__init__.py", "sub/c.py", "sub/d.py"]


def test_the_digest_follows_the_code_of_used_modules_only(tmp_path):
    package = _package(tmp_path)
    script = tmp_path / "script.py"
    before = code_digest(script, package)
    (package / "e.py").write_text("VALUE = 2\n")
    assert code_digest(script, package) == before
    (package / "sub" / "d.py").write_text("from ..b import helper  # edited\n")
    assert code_digest(script, package) != before


def test_every_workflow_script_reaches_the_modules_it_names():
    repo = Path(__file__).resolve().parents[1]
    package = repo / "lib" / "noduleflow"
    modules = imported_modules(repo / "workflow" / "scripts" / "evaluate_run.py", package)
    names = {path.relative_to(package).as_posix() for path in modules}
    assert {"evaluation/tasks.py", "evaluation/metrics.py", "models/flow.py", "io.py"} <= names
    assert "synthetic.py" not in names and "dicom.py" not in names
