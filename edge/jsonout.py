"""JSON that every reader accepts: NaN and infinities become null (bare `NaN` is not JSON)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def json_safe(obj):
    """numpy scalars and arrays -> Python; NaN and infinities -> None; paths and tuples -> str, list."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bool | str) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and not isinstance(obj, int | float):  # numpy scalar or array
        return json_safe(obj.tolist())
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    return str(obj)


def dumps(obj, indent: int | None = None) -> str:
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)
