"""The compilefuse latency benchmark (``compilefuse-bench`` / ``python -m compilefuse.bench``)."""

from .cli import main

__all__ = ["main"]
