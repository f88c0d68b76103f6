"""What ``push``, ``status``, ``sync`` and ``history`` do, in terms of the engine and the planner.

Each function returns the process exit code and prints its result (a table, or JSON with
``--json``); it holds no logic of its own beyond choosing what to plan and how to show it.
Names, ids and reasons come from the sites, where anyone may have set them: text output shows
them through ``model.printable`` (no terminal escape sequences); JSON escapes them itself.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from imagesync.config.types import Config
from imagesync.engine import ActionResult, Engine, summarize
from imagesync.engine.report import status_document
from imagesync.errors import UsageError
from imagesync.model import SiteInventory, format_time, printable
from imagesync.plan import (
    Action,
    Assessment,
    Copy,
    Ignored,
    Plan,
    Retire,
    Rule,
    Skip,
    TargetRule,
    plan,
    plan_name,
    rule_for,
)
from imagesync.progress import ProgressBar, wants_progress


def _check_sites(config: Config, names: Sequence[str], what: str) -> None:
    for n in names:
        if n not in config.site_names:
            known = ", ".join(config.site_names) or "none"
            raise UsageError(f"{what}: no cloud or store called {n!r} (known: {known})")


def _progress_factory() -> Callable[[str, int | None], Callable[[int], None] | None] | None:
    if not wants_progress():
        return None
    return lambda label, total: ProgressBar(label, total)


def action_dict(a: Action) -> dict[str, Any]:
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


def action_line(a: Action) -> str:
    """One line for people; printable whatever the sites named things."""
    if isinstance(a, Copy):
        line = (
            f"copy   {a.name} {a.version.short()} from {a.source_site}:{a.source_id[:8]} "
            f"to {', '.join(a.targets)}"
        )
    elif isinstance(a, Retire):
        line = f"retire {a.name} {a.image_id[:8]} on {a.site} ({a.mode}): {a.reason}"
    else:
        line = f"skip   {a.name} on {a.site}: {a.reason}"
    return printable(line)


def result_dict(r: ActionResult) -> dict[str, Any]:
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
            }
            for t in r.targets
        ]
    return d


def _print_results(results: Sequence[ActionResult]) -> None:
    for r in results:
        if isinstance(r.action, Copy):
            if not r.targets:
                print(printable(f"ok     {r.action.name}: {r.detail}"))
            for t in r.targets:
                if t.ok and t.image is not None:
                    secs = r.copy.seconds if r.copy else 0.0
                    size = r.copy.bytes_read if r.copy else 0
                    rate = size / secs / 1e6 if secs else 0.0
                    print(
                        printable(
                            f"copied {r.action.name} to {t.site}: {t.image.id} "
                            f"({size} bytes, {secs:.1f}s, {rate:.0f} MB/s)"
                        )
                    )
                else:
                    print(printable(f"FAILED {r.action.name} to {t.site}: {t.error}"))
        elif isinstance(r.action, Retire):
            print(
                printable(
                    f"{'retired' if r.ok else 'FAILED retire'} {r.action.name} "
                    f"{r.action.image_id[:8]} on {r.action.site}: {r.detail}"
                )
            )


def push(
    config: Config,
    name: str,
    *,
    targets: Sequence[str] = (),
    source: str | None = None,
    dry_run: bool = False,
    as_json: bool = False,
) -> int:
    """Copy the newest version of ``name`` to every site its rule names (or ``targets``)."""
    _check_sites(config, targets, "--to")
    if source:
        _check_sites(config, [source], "--from")
    cfg_rule = rule_for(config.images, name)
    if cfg_rule is None and not targets:
        raise UsageError(
            f"no image rule in {config.path} matches {name!r}: add one under "
            "'images:' or name the targets with --to SITE"
        )
    rule: Rule = cfg_rule if cfg_rule else TargetRule(pattern=name, sites=tuple(targets))

    def make_plan(inventories: Mapping[str, SiteInventory]) -> Plan:
        assessment, actions = plan_name(
            name,
            rule,
            inventories,
            config.site_names,
            targets=targets or None,
            prefer_source=source,
        )
        return Plan(actions=actions, assessments=[assessment])

    done = _plan_and_run(config, make_plan, name=name, dry_run=dry_run, as_json=as_json)
    if done is None:
        return 0
    p, results = done
    if not as_json and not results and not p.skips:
        print(
            f"{printable(name)}: already current on {', '.join(targets if targets else rule.sites)}"
        )
    _, failed = summarize(results)
    blocking = [s for s in p.skips if s.site == "*" or s.why.blocks]
    return 1 if failed or blocking else 0


def _plan_and_run(
    config: Config,
    make_plan: Callable[[Mapping[str, SiteInventory]], Plan],
    *,
    name: str | None,
    dry_run: bool,
    as_json: bool,
) -> tuple[Plan, list[ActionResult]] | None:
    """Inventory, plan, and either print the plan (dry run: returns None) or run and report it.

    A dry run changes nothing: not even crash leftovers are removed.
    """
    engine = Engine(config)
    try:
        inventories = engine.inventories(name=name)
        # a dry run changes nothing: not even crash leftovers are removed
        p = make_plan(inventories if dry_run else engine.recover(inventories))
        if dry_run:
            _emit_plan(p, as_json)
            return None
        results = engine.execute(p, progress=None if as_json else _progress_factory())
    finally:
        engine.close()
    if as_json:
        print(
            json.dumps(
                {
                    **({"name": name} if name else {}),
                    "results": [result_dict(r) for r in results],
                    "skipped": [action_dict(a) for a in p.skips],
                },
                indent=2,
            )
        )
    else:
        _print_results(results)
        for s in p.skips:
            print(action_line(s))
        for a in p.assessments:  # why an image with the name was not copied
            for line in ignored_lines(a):
                print(line)
    return p, results


def _emit_plan(p: Plan, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"actions": [action_dict(a) for a in p.actions]}, indent=2))
        return
    if not p.actions:
        print("nothing to do")
    for a in p.actions:
        print(action_line(a))


def sync(config: Config, *, dry_run: bool = False, as_json: bool = False) -> int:
    """One reconcile pass over every rule."""
    done = _plan_and_run(
        config,
        lambda inv: plan(config.images, inv, config.site_names),
        name=None,
        dry_run=dry_run,
        as_json=as_json,
    )
    if done is None:
        return 0
    _, failed = summarize(done[1])
    return 1 if failed else 0


def _cell_text(a: Assessment, site: str) -> str:
    c = a.cells[site]
    if c.state == "current" and c.image is not None:
        dup = f" (+{len(c.duplicates)} dup)" if c.duplicates else ""
        return printable(f"current {c.image.short_id}{dup}")
    if c.state in ("stale", "mismatch") and c.have is not None:
        return f"{c.state} {format_time(c.have.time)}"
    return c.state


def ignored_lines(a: Assessment) -> list[str]:
    """Once per name and owner: the images with this name that do not count, and why."""
    by_owner: dict[str | None, list[Ignored]] = {}
    for i in a.ignored:
        by_owner.setdefault(i.owner, []).append(i)
    lines = []
    for owner, found in sorted(by_owner.items(), key=lambda kv: kv[0] or ""):
        whose = f"owned by project {owner}" if owner else "owned by no project"
        where = ", ".join(f"{i.site}:{i.image_id[:8]}" for i in found)
        lines.append(printable(f"  {a.name}: ignored: {whose} ({where})"))
    return lines


def status(config: Config, name: str | None = None, *, as_json: bool = False) -> int:
    """Names x sites: current, stale (which version), missing, not copyable, in flight; and
    the images with a managed name that do not count (owned by a project not trusted)."""
    engine = Engine(config)
    try:
        inventories = engine.inventories(name=name)
    finally:
        engine.close()
    rules = engine.rules
    if name is not None:
        from imagesync.plan import assess, rule_for

        rule = rule_for(rules, name)
        required = rule.sites if rule else ()
        assessments = [assess(name, inventories, config.site_names, required=required)]
    else:
        assessments = plan(rules, inventories, config.site_names).assessments
    if as_json:
        print(json.dumps(status_document(assessments, inventories), indent=2))
        return 0
    sites = list(config.site_names)
    if not assessments:
        print("no managed images found" + (f" named {name!r}" if name else ""))
    rows = [[printable(a.name)] + [_cell_text(a, s) for s in sites] for a in assessments]
    widths = [max([len("NAME")] + [len(r[0]) for r in rows])]
    for i, s in enumerate(sites, start=1):
        widths.append(max([len(s)] + [len(r[i]) for r in rows]))
    header = ["NAME", *sites]
    if assessments:
        print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        for r in rows:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
        for a in assessments:
            if a.newest:
                print(
                    printable(
                        f"  {a.name}: newest {a.newest.short()} from {a.newest.origin}"
                        + (f" — NOT COPYABLE: {a.not_copyable}" if a.not_copyable else "")
                    )
                )
            for line in ignored_lines(a):
                print(line)
    for s, inv in inventories.items():
        if not inv.ok:
            print(printable(f"  {s}: unreachable: {inv.error}"), file=sys.stderr)
    return 0


def history(
    config: Config, name: str | None = None, *, as_json: bool = False, limit: int = 50
) -> int:
    from imagesync.state import State

    rows = State(config.state_dir).history(name, limit)
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no transfers recorded")
    for r in rows:
        when = datetime.fromtimestamp(r["started"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        size = f"{r['bytes']} B in {r['seconds']}s" if r.get("bytes") is not None else ""
        err = f" — {r['error']}" if r.get("error") else ""
        line = f"{when}  {r['name']}  {r['source']} → {r['target']}  {r['result']}  {size}{err}"
        print(printable(line))
    return 0
