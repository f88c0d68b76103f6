"""What ``push``, ``status``, ``sync`` and ``history`` do, in terms of the engine and the planner
(``snapshot``: :mod:`imagesync.commands.snapshot`).

Each function returns the process exit code and prints its result (a table, or JSON with
``--json``); it holds no logic of its own beyond choosing what to plan and how to show it.
Names, ids and reasons come from the sites, where anyone may have set them: text output shows
them through ``model.printable`` (no terminal escape sequences); JSON escapes them itself.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog

from imagesync.config.types import Config
from imagesync.coordination import Coordinator
from imagesync.engine import ActionResult, Engine, Outcome, summarize
from imagesync.engine.report import action_dict, quarantine_rows, result_dict, status_document
from imagesync.errors import ImageSyncError, UsageError
from imagesync.model import SiteInventory, choose_format, format_time, printable
from imagesync.plan import (
    Action,
    Assessment,
    Copy,
    Ignored,
    Plan,
    Retire,
    Rule,
    TargetRule,
    plan,
    plan_name,
    rule_for,
)
from imagesync.progress import (
    ProgressBar,
    human_bytes,
    human_rate,
    human_seconds,
    wants_progress,
)

log = structlog.get_logger("imagesync.commands")


class NoSuchImage(ImageSyncError):
    """No reachable site has any image with the name asked for (a typo, most often): exit 1,
    said in one line naming the sites asked and the closest names they hold."""


def _no_such_image(
    engine: Engine, name: str, inventories: Mapping[str, SiteInventory]
) -> NoSuchImage | None:
    """The error for a name no reachable site holds any image of (whoever owns it, whatever
    its state), or None. Only then are the sites listed in full, for a suggestion."""
    reachable = [s for s, inv in inventories.items() if inv.ok]
    if any(r.name == name for s in reachable for r in inventories[s].images):
        return None
    if engine.state.cells(name):  # deleted everywhere since: check must stop answering it
        from imagesync.plan import assess

        engine.record([assess(name, inventories, engine.site_names)])
    import difflib

    known = {r.name for inv in engine.inventory_room.all(reachable).values() for r in inv.images}
    known |= {r.pattern for r in engine.rules if not any(c in r.pattern for c in "*?[")}
    close = difflib.get_close_matches(name, sorted(known - {name}), n=1)
    text = f"no image named '{name}' on {', '.join(reachable) or 'any reachable site'}"
    if close:
        text += f" (did you mean '{close[0]}'?)"
    unreachable = [s for s, inv in inventories.items() if not inv.ok]
    if unreachable:
        text += f"; not asked, unreachable: {', '.join(unreachable)}"
    return NoSuchImage(printable(text))


def _check_sites(config: Config, names: Sequence[str], what: str) -> None:
    for n in names:
        if n not in config.site_names:
            known = ", ".join(config.site_names) or "none"
            raise UsageError(f"{what}: no cloud or store called {n!r} (known: {known})")


def _progress_factory() -> Callable[[str, int | None], Callable[[int], None] | None] | None:
    if not wants_progress():
        return None
    return lambda label, total: ProgressBar(label, total)


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


def _print_results(results: Sequence[ActionResult]) -> None:
    for r in results:
        if isinstance(r.action, Copy):
            if not r.targets:
                print(printable(f"ok     {r.action.name}: {r.detail}"))
            for t in r.targets:
                if t.ok and t.image is not None:
                    # the progress bar's units: sizes in KiB/MiB/GiB, the same rate
                    secs = r.copy.seconds if r.copy else 0.0
                    size = r.copy.bytes_read if r.copy else 0
                    print(
                        printable(
                            f"copied {r.action.name} to {t.site}: {t.image.id} "
                            f"({human_bytes(size)} in {human_seconds(secs)}, "
                            f"{human_rate(size, secs)})"
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

    wanted = list(targets) if targets else list(rule.sites)
    done = _plan_and_run(
        config, make_plan, name=name, dry_run=dry_run, as_json=as_json, wanted=wanted
    )
    if done is None:
        return 0
    p, results = done
    if not as_json:
        current = [s for s, what in site_outcomes(p, results, wanted).items() if what == CURRENT]
        if current:
            print(f"{printable(name)}: already current on {', '.join(current)}")
    _, failed = summarize(results)
    blocking = [s for s in p.skips if s.site == "*" or s.why.blocks]
    return 1 if failed or blocking else 0


CURRENT = "already current"


def site_outcomes(
    p: Plan, results: Sequence[ActionResult], wanted: Sequence[str]
) -> dict[str, str]:
    """What became of each wanted site: ``already current``, ``copied``, why it failed, or
    why it was skipped (one name's push)."""
    out: dict[str, str] = {}
    for a in p.assessments:
        for site, cell in a.cells.items():
            if site in wanted and cell.state == "current":
                out[site] = CURRENT
    for r in results:
        if not isinstance(r.action, Copy):
            continue
        if r.outcome is Outcome.NOTHING_TO_DO:  # another run copied it after we planned
            out.update(dict.fromkeys(r.action.targets, CURRENT))
        for t in r.targets:
            out[t.site] = "copied" if t.ok else (t.error_kind.value if t.error_kind else "failed")
    for s in p.skips:
        if s.site in wanted:
            out.setdefault(s.site, f"skipped: {s.reason}")
    return {s: out[s] for s in wanted if s in out}


def _coordinate(engine: Engine) -> Coordinator | None:
    """``push``/``sync`` on a coordinated deployment take the daemons' locks in the service
    (without joining the group: they drive no names of their own)."""
    cfg = engine.config.coordination
    if cfg is None:
        return None
    from imagesync.coordination import default_member_id

    member = f"{cfg.member_id or default_member_id(engine.state.instance_id)}-cli-{os.getpid()}"
    coordinator = Coordinator(cfg, member, instance_id=engine.state.instance_id)
    coordinator.start(join=False)
    engine.coordinate(coordinator)
    return coordinator


def _plan_and_run(
    config: Config,
    make_plan: Callable[[Mapping[str, SiteInventory]], Plan],
    *,
    name: str | None,
    dry_run: bool,
    as_json: bool,
    wanted: Sequence[str] | None = None,
) -> tuple[Plan, list[ActionResult]] | None:
    """Inventory, plan, and either print the plan (dry run: returns None) or run and report it.

    A dry run changes nothing: not even crash leftovers are removed. ``wanted``: the sites
    one name's push is for; its JSON then says what became of each (``sites``).
    """
    engine = Engine(config)
    coordinator = None if dry_run else _coordinate(engine)
    try:
        inventories = engine.inventories(name=name)
        if name is not None and (missing := _no_such_image(engine, name, inventories)):
            raise missing
        # a dry run changes nothing: not even crash leftovers are removed
        p = make_plan(inventories if dry_run else engine.recover(inventories))
        log.debug(
            "plan",
            copies=len(p.copies),
            retires=len(p.retires),
            skips=len(p.skips),
            unreachable=sorted(s for s, inv in inventories.items() if not inv.ok),
        )
        if dry_run:
            engine.record(p.assessments)  # changes no site; what it found, check answers from
            _emit_plan(p, as_json, config)
            return None
        results = engine.execute(p, progress=None if as_json else _progress_factory())
    finally:
        engine.close()
        if coordinator is not None:
            coordinator.stop()
    if as_json:
        print(
            json.dumps(
                {
                    **({"name": name} if name else {}),
                    **({"sites": site_outcomes(p, results, wanted)} if wanted is not None else {}),
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


def _emit_plan(p: Plan, as_json: bool, config: Config) -> None:
    formats = _conversions(p, config)
    if as_json:
        actions = [action_dict(a) for a in p.actions]
        for a, d in zip(p.actions, actions, strict=True):
            if isinstance(a, Copy) and formats.get(a.name):
                d["formats"] = formats[a.name]
        print(json.dumps({"actions": actions}, indent=2))
        return
    if not p.actions:
        print("nothing to do")
    for a in p.actions:
        notes = formats.get(a.name, {}) if isinstance(a, Copy) else {}
        print(action_line(a) + "".join(printable(f"; {t}: {n}") for t, n in notes.items()))


def _conversions(p: Plan, config: Config) -> dict[str, dict[str, str]]:
    """name → {target: what happens to its format}, for the copies whose target cloud wants
    another disk format (``disk_formats:``): a dry run says so before anything is copied."""
    sources = {a.name: a.source for a in p.assessments if a.source is not None}
    out: dict[str, dict[str, str]] = {}
    for c in p.copies:
        src = sources.get(c.name)
        fmt = src.disk_format if src is not None else None
        for t in c.targets:
            cloud = config.clouds.get(t)
            choice = choose_format(fmt, cloud.disk_formats if cloud is not None else ())
            if choice.convert_to is not None:
                out.setdefault(c.name, {})[t] = f"converted from {fmt} to {choice.convert_to}"
            elif choice.refused is not None:
                out.setdefault(c.name, {})[t] = f"will fail: {choice.refused}"
    return out


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
    p, results = done
    if not as_json and all(r.outcome is Outcome.NOTHING_TO_DO for r in results):
        print(
            "nothing to do: every image is current where its rule wants it"
            if not p.skips
            else "nothing to do (the skips above say what stays as it is)"
        )
    _, failed = summarize(results)
    return 1 if failed else 0


def _cell_text(a: Assessment, site: str) -> str:
    c = a.cells[site]
    if c.state == "current" and c.image is not None:
        dup = f" (+{len(c.duplicates)} dup)" if c.duplicates else ""
        conv = f" ({c.image.disk_format}, converted)" if c.image.converted else ""
        return printable(f"current {c.image.short_id}{conv}{dup}")
    if c.state in ("stale", "mismatch") and c.have is not None:
        return f"{c.state} {format_time(c.have.time)}"
    if c.state == "missing" and not c.required:
        return "not required"  # no rule wants it there: nothing is wrong
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
        assessments = _assessments(engine, config, name, inventories)
        # what status saw is what check answers from: a cell found stale here is never
        # handed out as current afterwards (issue 11)
        engine.record(assessments)
        managed = [a.name for a in assessments]
        if name is not None and config.coordination is not None:
            # who drives a name depends on every managed name (coordination.assign): list all
            everything = engine.inventories()
            managed = [
                a.name for a in plan(engine.rules, everything, config.site_names).assessments
            ]
    finally:
        engine.close()
    from imagesync.saving import save_rows  # imports Nova's client: only here

    saves, save_errors = save_rows(config, name, inventories)
    group = _group(config, managed)
    if as_json:
        doc = status_document(assessments, inventories)
        extra = {"coordination": group} if group is not None else {}
        print(json.dumps({**doc, "saves": saves, "save_errors": save_errors, **extra}, indent=2))
        return 0
    _print_table(list(config.site_names), name, assessments)
    for s, inv in inventories.items():
        if not inv.ok:
            print(printable(f"  {s}: unreachable: {inv.error}"), file=sys.stderr)
    quarantined = [
        f"  {q['name']}: QUARANTINED on {q['site']} ({q['image_id']}): {q['reason']}"
        for q in quarantine_rows(inventories)
    ]
    saved = [
        f"  save on shutdown: {r['cloud']} server {r['server_name']} ({r['server']}) "
        f"as {r['save_as']} [{r['status']}]: {r['state']}"
        for r in saves
    ]
    for line in [
        *quarantined,
        *saved,
        *save_errors,
        *(_group_lines(group, name) if group is not None else []),
    ]:
        print(printable(line))
    return 0


def _assessments(
    engine: Engine, config: Config, name: str | None, inventories: Mapping[str, SiteInventory]
) -> list[Assessment]:
    """Every managed name's assessment, or only ``name``'s (NoSuchImage when nothing has it)."""
    if name is None:
        return plan(engine.rules, inventories, config.site_names).assessments
    if missing := _no_such_image(engine, name, inventories):
        raise missing
    from imagesync.plan import assess

    rule = rule_for(engine.rules, name)
    required = rule.sites if rule else ()
    return [assess(name, inventories, config.site_names, required=required)]


def _print_table(sites: list[str], name: str | None, assessments: Sequence[Assessment]) -> None:
    """status's table: names x sites, then each name's newest version and what is ignored."""
    if not assessments:
        print("no managed images found" + (f" named {name!r}" if name else ""))
        return
    rows = [[printable(a.name)] + [_cell_text(a, s) for s in sites] for a in assessments]
    for line in _aligned([["NAME", *sites], *rows]):
        print(line)
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


def _group(config: Config, names: list[str]) -> dict[str, Any] | None:
    """Several daemons (``coordination:``): who drives which name; None for one host."""
    if config.coordination is None:
        return None
    from imagesync.coordination import describe_group

    return describe_group(config.coordination, names)


def _group_lines(group: Mapping[str, Any], name: str | None = None) -> list[str]:
    """The coordination lines of ``status``: health, members and how many names each drives
    (and which drives ``name``), the uploads in flight."""
    lines = [f"coordination: {group['url']} group {group['group']}: {group['health']}"]
    owners = list(group["owners"].values())
    for m in group["members"]:
        lines.append(f"  member {m}: drives {owners.count(m)} of {len(owners)} names")
    if name is not None and group["owners"].get(name):
        lines.append(printable(f"  {name} is driven by {group['owners'][name]}"))
    if not group["members"]:
        lines.append("  no live member: no daemon is driving any name")
    for u in group["uploads"]:
        lines.append(
            f"  uploading {u.get('name')} to {u['site']} ({u['image_id']}) by {u.get('member')}"
        )
    return lines


#: history's columns: (header, key in the JSON row); the table and --json show the same fields
HISTORY_FIELDS = (
    ("STARTED", "started"),
    ("NAME", "name"),
    ("SOURCE", "source"),
    ("TARGET", "target"),
    ("RESULT", "result"),
    ("SIZE", "bytes"),
    ("TIME", "seconds"),
    ("IMAGE ID", "image_id"),
    ("ERROR", "error"),
)


def history_row(r: Mapping[str, Any]) -> dict[str, Any]:
    """One recorded transfer or retirement as --json shows it: ISO times (UTC, Z), not epochs."""

    def iso(when: float | None) -> str | None:
        return None if when is None else format_time(datetime.fromtimestamp(when, UTC))

    return {
        "started": iso(r["started"]),
        "finished": iso(r.get("finished")),
        "name": r["name"],
        "source": r["source"],
        "target": r["target"],
        "version": r.get("version"),
        "result": r["result"],
        "bytes": r.get("bytes"),
        "seconds": r.get("seconds"),
        "image_id": r.get("image_id"),
        "sha512": r.get("sha512"),
        "error": r.get("error"),
    }


def _history_cells(row: Mapping[str, Any]) -> list[str]:
    source = str(row["source"])
    site, _, image_id = source.partition(":")
    cells = {
        "started": str(row["started"])[:19] + "Z",  # to the second: YYYY-MM-DDTHH:MM:SSZ
        "name": row["name"],
        # ids are 36 characters: the first 8 tell them apart (status does the same)
        "source": f"{site}:{image_id[:8]}" if image_id else site,
        "target": row["target"],
        "result": row["result"],
        "bytes": human_bytes(row["bytes"]) if row["bytes"] is not None else "",
        "seconds": human_seconds(row["seconds"]) if row["seconds"] is not None else "",
        "image_id": (row["image_id"] or "")[:8],
        "error": row["error"] or "",
    }
    return [printable(cells[key]) for _, key in HISTORY_FIELDS]


def history(
    config: Config, name: str | None = None, *, as_json: bool = False, limit: int = 50
) -> int:
    """The newest ``limit`` transfers and retirements (of ``name``), newest first: a table
    (header, aligned columns, human sizes, ISO times), or the same fields as JSON."""
    from imagesync.state import State

    rows = [history_row(r) for r in State(config.state_dir).history(name, limit)]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no transfers recorded" + (f" for {printable(name)}" if name else ""))
        return 0
    table = [[h for h, _ in HISTORY_FIELDS], *(_history_cells(r) for r in rows)]
    numbers = {i for i, (h, _) in enumerate(HISTORY_FIELDS) if h in ("SIZE", "TIME")}
    for line in _aligned(table, right=numbers):
        print(line.rstrip())
    return 0


def _aligned(table: Sequence[Sequence[str]], right: Collection[int] = ()) -> list[str]:
    """A table's rows (the header first) as lines, its columns two spaces apart and as wide as
    their widest cell; the columns numbered in ``right`` (numbers) line up on the right."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in table
    ]
