"""The README's demo, as a new user runs it: the fold report on stdout, and nothing on stderr
(torch's notices that a user cannot act on, such as "No CUDA runtime is found" on a CPU machine
with a CUDA toolkit, or "Failed to initialize NumPy", included)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_prints_the_report_and_no_warnings(tmp_path):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}  # a first compile, as a new user's
    out = subprocess.run([sys.executable, "-m", "compilefuse.examples.demo"], capture_output=True, text=True,
                         env=env, timeout=600, check=True)
    assert "folded 4 of 5 BatchNorms" in out.stdout
    assert out.stderr == ""
