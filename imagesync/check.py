"""``imagesync check``: a batch scheduler's pre-flight question, answered fast.

"Is the newest version of NAME on CLOUD, and which image id do I boot?" Exit codes:
0 yes (stdout: the image id), 1 missing or stale (stderr says which), 2 usage or config
error, 3 cannot tell (the cloud is unreachable). Answers recorded by the last push/sync
younger than ``check_max_age`` are served from the state database without asking any site;
``--fresh`` always asks. ``--ensure`` pushes the image there first and waits (``--timeout``).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from imagesync.config.types import Config
from imagesync.errors import UsageError
from imagesync.model import printable

OK, MISSING, USAGE, UNKNOWN = 0, 1, 2, 3


def _emit(as_json: bool, payload: dict[str, Any], code: int) -> int:
    if as_json:
        payload["exit_code"] = code
        print(json.dumps(payload, indent=2))
    elif code == OK:
        print(printable(payload["image_id"]))
    else:  # the reason may quote what a site reported: printed safely
        print(
            printable(
                f"imagesync check: {payload['name']} on {payload['cloud']}: {payload['reason']}"
            ),
            file=sys.stderr,
        )
    return code


def _validate(config: Config, cloud: str, ensure: bool, timeout: float | None) -> None:
    if cloud not in config.site_names:
        known = ", ".join(config.site_names) or "none"
        raise UsageError(
            f"--cloud {cloud!r} is not a cloud or store in {config.path} (known: {known})"
        )
    if timeout is not None and not ensure:
        raise UsageError("--timeout goes with --ensure")


def check_recorded(config: Config, name: str, cloud: str, *, as_json: bool = False) -> int | None:
    """Answer from recorded state alone (exit 0), or None when the sites must be asked."""
    _validate(config, cloud, False, None)
    recorded = _recorded(config, name, cloud)
    if recorded is None:
        return None
    return _emit(as_json, {"name": name, "cloud": cloud, **recorded}, OK)


def check(
    config: Config,
    name: str,
    cloud: str,
    *,
    as_json: bool = False,
    ensure: bool = False,
    timeout: float | None = None,
    fresh: bool = False,
) -> int:
    _validate(config, cloud, ensure, timeout)
    base: dict[str, Any] = {"name": name, "cloud": cloud}
    if not fresh and not ensure:
        code = check_recorded(config, name, cloud, as_json=as_json)
        if code is not None:
            return code
    deadline = time.monotonic() + timeout if timeout is not None else None
    return _ask(config, name, cloud, base, as_json, ensure, deadline)


def _recorded(config: Config, name: str, cloud: str) -> dict[str, Any] | None:
    """A young enough 'current' answer from the last push/sync, or None."""
    db = config.state_dir / "imagesync.sqlite"
    if not db.exists():
        return None
    from imagesync.state import State

    cell = State(config.state_dir).cell(name, cloud)
    if cell is None or cell.state != "current" or not cell.image_id:
        return None
    age = time.time() - cell.recorded
    if age > config.check_max_age:
        return None
    return {
        "state": "current",
        "image_id": cell.image_id,
        "version": cell.newest,
        "sha512": cell.sha512,
        "answered_from": "recorded",
        "age_seconds": round(age, 1),
    }


def _ask(
    config: Config,
    name: str,
    cloud: str,
    base: dict[str, Any],
    as_json: bool,
    ensure: bool,
    deadline: float | None,
) -> int:
    from imagesync.engine import Engine
    from imagesync.model import format_time
    from imagesync.plan import Action, Copy, Plan, Rule, TargetRule, plan_name, rule_for
    from imagesync.transfer import ErrorKind

    engine = Engine(config)
    try:
        while True:
            inventories = engine.inventories(name=name)
            if ensure:  # only a check that may copy cleans up after crashed runs
                inventories = engine.recover(inventories)
            cfg_rule = rule_for(config.images, name)
            rule: Rule = cfg_rule if cfg_rule else TargetRule(pattern=name, sites=(cloud,))
            a, actions = plan_name(name, rule, inventories, config.site_names, targets=[cloud])
            engine.record([a], [])
            cell = a.cells[cloud]
            payload = {
                **base,
                "state": cell.state,
                "answered_from": "sites",
                "version": format_time(a.newest.time) if a.newest else None,
                "sha512": a.newest.sha512 if a.newest else None,
            }
            if cell.state == "current" and cell.image is not None:
                return _emit(as_json, {**payload, "image_id": cell.image.id}, OK)
            if cell.state == "unreachable":
                err = inventories[cloud].error
                return _emit(as_json, {**payload, "reason": f"cannot tell: {err}"}, UNKNOWN)
            reason = _reason(cell.state, a, cloud)
            if not ensure or (deadline is not None and time.monotonic() >= deadline):
                code = MISSING
                if ensure:
                    reason += " (gave up: --timeout reached)"
                return _emit(as_json, {**payload, "reason": reason}, code)
            copies: list[Action] = [x for x in actions if isinstance(x, Copy)]
            if not copies and cell.state not in ("in-flight",):
                return _emit(as_json, {**payload, "reason": reason}, MISSING)
            results = engine.execute(Plan(actions=copies, assessments=[a]))
            if any(t.error_kind not in (None, ErrorKind.BUSY) for r in results for t in r.targets):
                failed = "; ".join(t.error or "" for r in results for t in r.targets if t.error)
                return _emit(as_json, {**payload, "reason": f"copy failed: {failed}"}, MISSING)
            busy = any(t.error_kind is ErrorKind.BUSY for r in results for t in r.targets)
            if busy or not copies:
                time.sleep(1.0)
    finally:
        engine.close()


def _reason(state: str, a: Any, cloud: str) -> str:
    newest = a.newest.short() if a.newest else "none"
    cell = a.cells[cloud]
    if a.newest is None:
        return "no active version of this name on any reachable site"
    if state == "stale":
        return f"stale: has {cell.have.short()}, newest is {newest}"
    if state == "missing":
        return f"missing: newest is {newest}"
    if state == "not-copyable":
        return f"missing and not copyable: {a.not_copyable}"
    if state == "mismatch":
        return f"mismatch: holds different bytes with the version time of {newest}"
    if state == "in-flight":
        return f"a copy of {newest} is in flight"
    return state
