"""Seed a benchmark cache from the committed results, so a report on a fresh clone keeps them.

benchmarks/cache/ is not committed. Without this, a cell measured on a fresh clone followed by
`--report-only` would rebuild the committed table from that one cell and drop every earlier measurement.
A committed cell is restored only where the cache has no cell of that name (a cell measured again wins);
restored cells carry `"restored_from"`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


def restore_cells(cells_dir: Path, committed: Path, name: Callable[[dict[str, Any]], str]) -> tuple[dict[str, Any], int] | None:
    """Write each committed cell missing from cells_dir to cells_dir/<name(cell)>.json.

    Returns (the committed JSON, how many cells were restored), or None when there is no committed JSON."""
    if not committed.exists():
        return None
    doc = json.loads(committed.read_text())
    cells_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for c in doc.get("cells", []):
        f = cells_dir / f"{name(c)}.json"
        if not f.exists():
            f.write_text(json.dumps({**c, "restored_from": committed.name}, indent=1))
            n += 1
    return doc, n
