"""The layout's rules that import-linter does not check (docs/adr/0001-layout.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "hostguard"
HOOK_PATH_PACKAGES = ("signed", "domain", "host", "preboot")


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    lines = path.read_text().splitlines()
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.ImportFrom) and not sub.level:
                module = sub.module or ""
            elif isinstance(sub, ast.Import):
                module = sub.names[0].name
            else:
                continue
            if module.split(".")[0] != "hostguard":
                continue
            # The reason stands on the import's line or on the comment line above its group of imports.
            first = sub.lineno - 1
            while first > 0 and lines[first - 1].lstrip().startswith(("from ", "import ")):
                first -= 1
            said = lines[first : sub.end_lineno] + ([lines[first - 1]] if first > 0 else [])
            if not any("lazy" in line.lower() for line in said):
                out.append((sub.lineno, module))
    return out


def test_function_level_imports_of_hostguard_say_why() -> None:
    """Only start-up time justifies importing hostguard's own modules inside a function, and the line says so."""
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, module in _function_level_imports(path)
    ]
    assert offenders == []


def test_packages_on_the_hooks_path_have_empty_init_files() -> None:
    for name in HOOK_PATH_PACKAGES:
        assert (PACKAGE / name / "__init__.py").read_text() == "", f"{name}/__init__.py must stay empty"
