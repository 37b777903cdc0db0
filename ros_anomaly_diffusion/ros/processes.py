"""Nodes as child processes (the demo's graph, the soak's detector): started and stopped one way."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def spawn(cmd: list[str], log: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start `cmd` in a session of its own, so that stopping it reaches everything it started;
    its output (stderr included) goes to the file `log`, or to a text pipe read by `stop`."""
    if log is None:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                start_new_session=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:  # the child has its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    """SIGINT to the process group (a ROS node shuts down cleanly on it), SIGKILL if it is still
    running after `timeout` s; returns what it wrote to the pipe ("" when it wrote to a log)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out or ""
