"""Where jobs leave their results: the rows as JSON and a markdown report beside them."""

from __future__ import annotations

import json
from pathlib import Path


def write_rows(path: str | Path, rows: list[dict], report: str) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    out.with_suffix(".md").write_text(report if report.endswith("\n") else report + "\n")
    return out
