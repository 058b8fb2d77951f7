"""Torch's notices that a compilefuse user cannot act on, filtered out once per process."""

from __future__ import annotations

import logging


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=...": its C++ extension loader
    says it when first imported (by Inductor's first CPU compile, or ``torch.utils.benchmark``)
    on any machine with a CUDA toolkit and no GPU. It was the first line the README's demo and
    ``compilefuse-bench`` printed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def quiet() -> None:
    """Install the filters (idempotent). Called when the package is imported, before any module of
    it imports ``torch.utils.cpp_extension``."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNotice) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNotice())
