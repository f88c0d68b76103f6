"""What ``status`` shows, and the plans and results ``push``/``sync`` show, as plain JSON-ready
data.

One function builds the names x sites document that ``imagesync status --json`` prints and the
daemon's ``/status.json`` serves (with more keys of its own around it), so the two cannot drift
apart. It is a pure function of assessments and inventories, like ``recording``; and like it,
:func:`with_results` counts the copies a pass just made as current, so that what the daemon
shows after a pass is what the next listing will find.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from imagesync.engine.results import ActionResult
from imagesync.model import PROP_QUARANTINED, SiteInventory, format_time
from imagesync.plan import Action, Assessment, Copy, Retire, Skip


def image_status(a: Assessment) -> dict[str, Any]:
    """One name: its newest version and every site's cell."""
    return {
        "name": a.name,
        "newest": {
            "version": format_time(a.newest.time),
            "sha512": a.newest.sha512,
            "origin": a.newest.origin,
        }
        if a.newest
        else None,
        "not_copyable": a.not_copyable,
        "sites": {
            s: {
                "state": c.state,
                "required": c.required,
                "image_id": c.image.id if c.image else None,
                "duplicates": list(c.duplicates),
                "have": format_time(c.have.time) if c.have else None,
                # a converted copy (another disk format) of the same version: still current
                "converted_to": c.image.disk_format if c.image and c.image.converted else None,
            }
            for s, c in a.cells.items()
        },
        "ignored": [{"site": i.site, "image_id": i.image_id, "owner": i.owner} for i in a.ignored],
    }


def status_document(
    assessments: Iterable[Assessment], inventories: Mapping[str, SiteInventory]
) -> dict[str, Any]:
    """``{"images": [...], "unreachable": {site: error}, "quarantined": [...]}``: what
    ``status --json`` prints."""
    return {
        "images": [image_status(a) for a in assessments],
        "unreachable": {s: inv.error for s, inv in inventories.items() if not inv.ok},
        "quarantined": quarantine_rows(inventories),
    }


def quarantine_rows(inventories: Mapping[str, SiteInventory]) -> list[dict[str, Any]]:
    """The images a boot test quarantined (``imagesync.quarantined``): the version they hold
    is not copied, not answered and retires nothing (``plan.quarantined_versions``)."""
    return [
        {
            "name": rec.name,
            "site": site,
            "image_id": rec.id,
            "version": format_time(rec.version.time),
            "origin": rec.version.origin,
            "hidden": rec.hidden,
            "reason": rec.properties[PROP_QUARANTINED],
        }
        for site, inv in inventories.items()
        if inv.ok
        for rec in sorted(inv.images, key=lambda r: (r.name, r.id))
        if rec.properties.get(PROP_QUARANTINED) and inv.trusts(rec)
    ]


def with_results(
    assessments: Sequence[Assessment], results: Sequence[ActionResult]
) -> list[Assessment]:
    """The assessments with every target a copy just reached marked current (its new id)."""
    done = {
        (r.action.name, t.site): t.image
        for r in results
        for t in r.targets
        if t.ok and t.image and not t.image.hidden  # a boot test's copy is not current yet
    }
    if not done:
        return list(assessments)
    out = []
    for a in assessments:
        cells = dict(a.cells)
        for site, cell in a.cells.items():
            image = done.get((a.name, site))
            if image is not None:
                cells[site] = dataclasses.replace(
                    cell, state="current", image=image, have=a.newest, duplicates=()
                )
        out.append(dataclasses.replace(a, cells=cells))
    return out


def action_dict(a: Action) -> dict[str, Any]:
    """One planned action as ``--json`` shows it (a dry run's plan, a skip)."""
    d: dict[str, Any] = {"kind": a.kind, "name": a.name}
    if isinstance(a, Copy):
        d.update(
            source=f"{a.source_site}:{a.source_id}",
            targets=list(a.targets),
            version=format_time(a.version.time),
            sha512=a.version.sha512,
            reason=a.reason,
        )
    elif isinstance(a, Retire):
        d.update(site=a.site, image_id=a.image_id, mode=a.mode, reason=a.reason)
    elif isinstance(a, Skip):
        d.update(site=a.site, reason=a.reason)
    return d


def result_dict(r: ActionResult) -> dict[str, Any]:
    """One action's result as ``push``/``sync --json`` show it: the action, and each target's."""
    d = action_dict(r.action)
    d["ok"] = r.ok
    if r.detail:
        d["detail"] = r.detail
    if r.copy is not None:
        d["bytes"] = r.copy.bytes_read
        d["seconds"] = round(r.copy.seconds, 3)
        d["sha512"] = r.copy.sha512
    if r.targets:
        d["results"] = [
            {
                "site": t.site,
                "ok": t.ok,
                "image_id": t.image.id if t.image else None,
                "error": t.error,
                "kind": t.error_kind,
                # relay (through imagesync) or the target's own import (web-download)
                "via": t.via if t.ok else None,
            }
            for t in r.targets
        ]
    return d
