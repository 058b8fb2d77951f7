"""Where bnfuse keeps the packages of compiled graphs (``options={"cache": True}``) and the folds
of inference graphs (``fold_cache``), and their place among ``torch.compiler.save_cache_artifacts``'
artifacts.

Light on purpose: ``import compilefuse`` registers the artifact type (``load_cache_artifacts`` in a
fresh process needs it before any compile), and that must not import the compiler.
"""

from __future__ import annotations

import os
import tempfile

from . import _torch_runtime

#: The types of bnfuse's artifacts in ``torch.compiler.save_cache_artifacts``.
ARTIFACT_TYPE = "compilefuse_package"
FOLD_ARTIFACT_TYPE = "compilefuse_fold"


def directory() -> str:
    """``COMPILEFUSE_CACHE_DIR``, else ``compilefuse/`` in Inductor's cache directory (which
    ``TORCHINDUCTOR_CACHE_DIR`` sets)."""
    return os.environ.get("COMPILEFUSE_CACHE_DIR") or os.path.join(_torch_runtime.inductor_cache_dir(), "compilefuse")


def path_for(key: str) -> str:
    return os.path.join(directory(), f"{key}.pt2")


def store(key: str, content: bytes) -> str:
    """Write a package under ``key``, atomically: a process loading it never sees half a file."""
    return store_file(path_for(key), content)


def store_file(path: str, content: bytes) -> str:
    """Write ``content`` to ``path``, atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(content)
        os.replace(partial, path)
    except BaseException:
        os.unlink(partial)
        raise
    return path


def record(key: str, content: bytes) -> None:
    """Add a package just built to what ``save_cache_artifacts`` returns."""
    _torch_runtime.record_cache_artifact(ARTIFACT_TYPE, key, content)


def fold_path(key: str) -> str:
    return os.path.join(directory(), "folds", f"{key}.pkl")


def store_fold(key: str, content: bytes) -> str:
    return store_file(fold_path(key), content)


def record_fold(key: str, content: bytes) -> None:
    """Add a fold just stored to what ``save_cache_artifacts`` returns."""
    _torch_runtime.record_cache_artifact(FOLD_ARTIFACT_TYPE, key, content)


def register() -> None:
    _torch_runtime.register_cache_artifact(ARTIFACT_TYPE, store)
    _torch_runtime.register_cache_artifact(FOLD_ARTIFACT_TYPE, store_fold)
