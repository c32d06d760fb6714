"""Worker processes: each arm (or GPU matrix worker) runs as ``bench/train_throughput.py --_worker <kind>`` in a fresh
interpreter and its own process group; the driver waits, stops it past a timeout, and reads its result file and (GPU
matrix) its progress events."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import REPO

SCRIPT = Path(__file__).resolve().parents[1] / "train_throughput.py"  # what a worker process runs


def emit(progress: Path, event: dict[str, Any]) -> None:
    """Append one event line for the driver, which reads the file while the worker runs (and after it died)."""
    with progress.open("a") as f:
        f.write(json.dumps({**event, "t": time.time()}) + "\n")
        f.flush()


def read_events(progress: Path) -> list[dict[str, Any]]:
    """The worker's events so far; a line still being written (or cut by a crash) is left out."""
    events = []
    try:
        lines = progress.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


class WorkerError(RuntimeError):
    """A worker process that failed, died or was stopped: ``reason`` in one line, ``log_tail`` its last output."""

    def __init__(self, tag: str, reason: str, log_tail: str) -> None:
        super().__init__(f"{tag} failed ({reason}):\n{log_tail}")
        self.reason, self.log_tail = reason, log_tail


def stop_process_group(proc: subprocess.Popen) -> None:
    """Kill the worker with its children (loader workers, compiler processes): it leads its own process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_or_stop(proc: subprocess.Popen, timeout: float, watch: Callable[[], str | None] | None) -> str | None:
    """Wait for the worker; stop it past ``timeout`` or when ``watch`` (polled twice a second) gives a reason."""
    end = time.monotonic() + timeout
    try:
        while True:
            try:
                proc.wait(timeout=0.5)
                return None
            except subprocess.TimeoutExpired:
                pass
            reason = f"ran past --timeout {timeout:g} s" if time.monotonic() > end else (watch() if watch else None)
            if reason:
                stop_process_group(proc)
                return reason
    except BaseException:  # Ctrl-C: the worker is in its own session and would not get the signal
        stop_process_group(proc)
        raise


def run_worker(
    kind: str,
    spec: dict[str, Any],
    workdir: Path,
    timeout: float,
    watch: Callable[[], str | None] | None = None,
) -> dict[str, Any]:
    """One arm (or a GPU matrix worker) in a fresh interpreter; its stdout/stderr (progress bar included) go to a
    log file. Raises WorkerError when it fails, dies, or is stopped by ``timeout`` or ``watch``."""
    tag = f"{kind}_{spec.get('config', 'matrix')}_{spec.get('round', 0)}"
    spec_file, out_file, log_file = (workdir / f"{tag}.{ext}" for ext in ("spec.json", "out.json", "log"))
    spec_file.write_text(json.dumps(spec))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--_worker",
        kind,
        "--_spec",
        str(spec_file),
        "--_out",
        str(out_file),
    ]
    with log_file.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        stopped = wait_or_stop(proc, timeout, watch)
    if stopped or proc.returncode != 0 or not out_file.is_file():
        tail = log_file.read_text(errors="replace")[-3000:]
        raise WorkerError(tag, stopped or f"exit {proc.returncode}", tail)
    return json.loads(out_file.read_text())
