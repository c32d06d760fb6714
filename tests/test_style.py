"""The repository stays ``ruff check`` and ``ruff format`` clean, keeps its layers (``lint-imports``) and type-checks
(``mypy``); CI runs this with the rest of the suite."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
MYPY = shutil.which("mypy", path=str(Path(sys.executable).parent)) or shutil.which("mypy")
PACKAGE = REPO_ROOT / "lesionnet"


@pytest.mark.skipif(RUFF is None, reason="ruff is installed by the dev extra")
@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_repository_is_ruff_clean(command: list[str]) -> None:
    result = subprocess.run([RUFF, *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]


@pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter is installed by the dev extra")
def test_imports_keep_the_layers() -> None:
    """The contracts of pyproject.toml's [tool.importlinter]: the layers, nothing importing the CLI from below, evaluate
    and export apart, no cycles between sibling modules."""
    result = subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(MYPY is None, reason="mypy is installed by the dev extra")
def test_package_type_checks() -> None:
    """``mypy`` on lesionnet/ with pyproject.toml's [tool.mypy]: strict, less the relaxations listed there with their
    reasons. The config's cache_dir, .mypy_cache (git-ignored), spares later runs re-analysing the dependencies."""
    result = subprocess.run([MYPY], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def uses_hydra_main(path: Path) -> bool:
    """Whether a file decorates with (or imports) ``hydra.main``: ``@hydra.main``, ``from hydra import main``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "main" and getattr(node.value, "id", None) == "hydra":
            return True
        if isinstance(node, ast.ImportFrom) and (
            node.module == "hydra.main" or (node.module == "hydra" and any(a.name == "main" for a in node.names))
        ):
            return True
    return False


def test_only_the_cli_is_a_hydra_app() -> None:
    """Library modules are functions of a config; ``hydra.main`` (argv, the working directory, logging) is the entry
    points' alone (import-linter sees packages, not ``hydra.main``, hence this check)."""
    offenders = [
        str(path.relative_to(REPO_ROOT))
        for path in sorted(PACKAGE.rglob("*.py"))
        if PACKAGE / "cli" not in path.parents and uses_hydra_main(path)
    ]
    assert not offenders, f"hydra.main outside lesionnet/cli: {offenders}"


def entry_points(path: Path) -> list[str]:
    """What makes a file a command of its own: its name ``__main__.py``, an ``argparse`` import, an
    ``if __name__ == "__main__"`` block."""
    found = ["__main__.py"] if path.name == "__main__.py" else []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names)) or (
            isinstance(node, ast.ImportFrom) and node.module == "argparse"
        ):
            found.append("argparse")
        if (
            isinstance(node, ast.Compare)
            and getattr(node.left, "id", None) == "__name__"
            and any(getattr(c, "value", None) == "__main__" for c in node.comparators)
        ):
            found.append("__main__")
    return found


def test_the_package_has_one_way_in() -> None:
    """``lesionnet <command>`` -> lesionnet/cli/<command>.py -> a pipeline function: no argparse ``main`` and no
    ``__main__`` block or file elsewhere in the package (bench/ and scripts/ are scripts and keep theirs)."""
    offenders = [
        f"{path.relative_to(REPO_ROOT)}: {', '.join(found)}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if PACKAGE / "cli" not in path.parents and (found := entry_points(path))
    ]
    assert not offenders, f"entry points outside lesionnet/cli: {offenders}"
