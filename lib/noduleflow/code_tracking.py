"""Which noduleflow modules a workflow script runs, and a digest of their code.

Snakemake's `code` rerun trigger sees a rule's own script but not the modules that script imports. The workflow
adds this digest to each script rule's recorded code, so editing a module in lib/noduleflow reruns exactly the
rules whose scripts import it (directly or through other noduleflow modules), and
`snakemake --list-changes code` lists their outputs.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE = "noduleflow"


def _module_file(package_dir: Path, name: str) -> Path | None:
    """The file of module `name` (dotted, starting with the package), or None if it is not a module of it."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = package_dir.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(package_dir: Path, path: Path) -> tuple[str, bool]:
    """Dotted name of a module file of the package, and whether it is a package's __init__."""
    relative = path.relative_to(package_dir).with_suffix("")
    parts = [PACKAGE, *relative.parts]
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _imported_names(path: Path, own_name: str | None, is_package: bool) -> frozenset[str]:
    """Dotted names `path` imports (relative imports resolved against `own_name`), with every parent package."""
    return _names_in_source(path.read_text(), own_name, is_package)


@functools.cache
def _names_in_source(source: str, own_name: str | None, is_package: bool) -> frozenset[str]:
    """What _imported_names finds, cached by source: every rule's script walks much the same modules."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if own_name is None:
                    continue
                anchor = own_name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                base = ".".join(anchor[:len(anchor) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from package import module`
    with_parents = set()
    for name in names:
        parts = name.split(".")
        with_parents.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return frozenset(with_parents)


def imported_modules(script: str | Path, package_dir: str | Path) -> list[Path]:
    """Files of the package's modules that running `script` imports, directly or indirectly, sorted."""
    package_dir = Path(package_dir).resolve()
    found: set[Path] = set()
    pending = [(Path(script), None, False)]
    while pending:
        path, own_name, is_package = pending.pop()
        for name in _imported_names(path, own_name, is_package):
            module = _module_file(package_dir, name)
            if module is not None and module not in found:
                found.add(module)
                pending.append((module, *_module_name(package_dir, module)))
    return sorted(found)


def code_digest(script: str | Path, package_dir: str | Path) -> str:
    """SHA-256 over the relative paths and contents of the package modules `script` imports."""
    package_dir = Path(package_dir).resolve()
    digest = hashlib.sha256()
    for module in imported_modules(script, package_dir):
        digest.update(module.relative_to(package_dir).as_posix().encode() + b"\0")
        digest.update(module.read_bytes() + b"\0")
    return digest.hexdigest()
