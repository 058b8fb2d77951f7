"""Run one of compilefuse's modules in a fresh Python process, with this process's import path."""

from __future__ import annotations

import os
import subprocess
import sys


def run_module(module: str, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m module args...``, output captured; a non-zero exit raises ``ChildFailed`` with
    the last lines of its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise ChildFailed("\n".join(done.stderr.strip().splitlines()[-5:]))
    return done


class ChildFailed(RuntimeError):
    """A fresh process exited with an error; the message is the end of its stderr."""
