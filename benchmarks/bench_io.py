"""What the CPU benchmark scripts share: their JSON record (rows under a ``meta`` header)."""

from __future__ import annotations

import datetime as dt
import json
import platform
from pathlib import Path


def write_rows(out: Path, rows: list[dict], **meta: object) -> None:
    """Write ``{"meta": {date, machine, **meta}, "rows": rows}`` to ``out`` (folders made)."""
    head = {
        "date": dt.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        **meta,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": head, "rows": rows}, indent=1) + "\n")
