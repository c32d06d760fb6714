"""The built wheel is a working install on its own: configs, sample data and the ``lesionnet`` command included."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_trains_from_another_folder() -> None:
    """scripts/check_wheel.sh: build, install beside .venv's packages (no torch reinstall), train, check the origin."""
    result = subprocess.run(
        ["bash", "scripts/check_wheel.sh"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "check_wheel: passed" in result.stdout
    origin = next(line for line in result.stdout.splitlines() if "lesionnet imported from" in line)
    assert str(REPO_ROOT) not in origin and "site-packages/lesionnet" in origin


def test_markers_are_registered_and_strict() -> None:
    """A typo in a marker (``@pytest.mark.slwo``) must fail collection instead of leaving the test in every run."""
    text = (REPO_ROOT / "pyproject.toml").read_text()
    assert "--strict-markers" in text
    for marker in ("slow", "browser", "docker", "ddp"):
        assert f'"{marker}: ' in text, marker
