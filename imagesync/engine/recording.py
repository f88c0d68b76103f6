"""Recording: what ``check`` will answer from, as a pure function of a plan and its results.

A cell is current after a pass when the planner found it current or the executor just put
the newest version there; the engine writes the cells to the state database in one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from imagesync.engine.results import ActionResult
from imagesync.model import ImageRecord, format_time
from imagesync.plan import Assessment
from imagesync.state import RecordedCell


def recorded_cells(
    assessments: Sequence[Assessment], results: Sequence[ActionResult], now: float
) -> list[RecordedCell]:
    """One cell per (assessed name, site), with the copies just made counted as current."""
    done: dict[tuple[str, str], ImageRecord] = {}
    for r in results:
        for t in r.targets:
            # a boot test's copy, hidden until it boots, is not a copy check may answer
            if t.ok and t.image is not None and not t.image.hidden:
                done[(r.action.name, t.site)] = t.image
    cells: list[RecordedCell] = []
    for a in assessments:
        newest = format_time(a.newest.time) if a.newest else None
        sha = a.newest.sha512 if a.newest else None
        for site, cell in a.cells.items():
            image = done.get((a.name, site)) or cell.image
            state = "current" if (a.name, site) in done else cell.state
            cells.append(
                RecordedCell(
                    name=a.name,
                    site=site,
                    state=state,
                    image_id=image.id if image else None,
                    version=format_time(cell.have.time) if cell.have else None,
                    newest=newest,
                    sha512=sha,
                    recorded=now,
                )
            )
    return cells
