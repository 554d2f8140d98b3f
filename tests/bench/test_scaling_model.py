"""docs/scaling.md quotes benchmarks/scaling_model.py: every figure the script prints is on the
page, so a change to the sizing code or the shapes that moves a number shows up here."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_scaling_page_quotes_the_model(capsys) -> None:
    runpy.run_path(str(REPO / "benchmarks" / "scaling_model.py"), run_name="__main__")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(rows) > 30  # both cases, every row
    page = (REPO / "docs" / "scaling.md").read_text()
    missing = [
        (number, row)
        for row in rows
        for number in re.findall(r"\d+(?:\.\d+)?", row.split("|")[-2])
        if not re.search(rf"(?<![\d.]){re.escape(number)}(?![\d.]?\d)", page)
    ]
    assert not missing, f"figures of the model missing from docs/scaling.md: {missing}"
