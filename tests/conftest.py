"""Suite-wide settings and fixtures (the helpers the tests import are in ``helpers.py``)."""

from __future__ import annotations

import os

import pytest
import torch

import compilefuse

# The suite runs strict: a folding failure raises instead of falling back to plain Inductor.
os.environ["COMPILEFUSE_STRICT"] = "1"

# Exactness is the point of these tests: no TF32 in CUDA convolutions and matmuls (cuDNN's default).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _own_compilefuse_cache(tmp_path_factory, monkeypatch):
    """Each test folds for itself: bnfuse's fold cache (kept across processes beside Inductor's)
    gets a directory of its own, so a test that plants a failure in the fold sees the fold run."""
    monkeypatch.setenv("COMPILEFUSE_CACHE_DIR", str(tmp_path_factory.mktemp("compilefuse_cache")))


@pytest.fixture
def restore_records():
    """Tests that fill bnfuse's process-wide record deque leave it as they found it."""
    saved = list(compilefuse.RECORDS)
    yield compilefuse.RECORDS
    compilefuse.RECORDS.clear()
    compilefuse.RECORDS.extend(saved)
