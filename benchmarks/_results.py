"""What the benchmark scripts do with a result: print it, and write it where ``--json`` says."""

from __future__ import annotations

import json
from typing import Any


def emit(result: dict[str, Any], path: str | None) -> None:
    print(json.dumps(result, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
