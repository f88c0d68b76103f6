"""``imagesync check``: a batch scheduler's pre-flight question, answered fast.

"Is the newest version of NAME on CLOUD, and which image id do I boot?" Exit codes:
0 yes (stdout: the image id), 1 missing or stale (stderr says which), 2 usage or config
error, 3 cannot tell (the cloud is unreachable, or anything unexpected: a scheduler must
never read a crash as "missing"). Answers recorded by the last push/sync younger than
``check_max_age`` are served from the state database, opened read-only
(``state.read_cell``); ``--fresh`` always asks the sites. ``--ensure`` pushes the image
there first and waits (``--timeout``, by default ``DEFAULT_ENSURE_TIMEOUT``).

A recorded id is confirmed before it is handed out when that is cheap: one GET by id on the
site, if this account can read the credentials (``answered_from: confirmed``). An id the site
no longer has is never handed out: the sites are asked instead. An account that cannot read
the credentials (a scheduler group that may read ``state_dir`` and the config, not
clouds.yaml) gets the recorded answer as it is (``answered_from: recorded``), without reading
any secret.

Every inventory imagesync takes (``status``, ``push``, ``sync``, ``check --fresh``, each daemon
pass) records what it found, so a cell any of them saw stale is not answered from afterwards.
``--json`` says when the answer was taken (``as_of``, ISO 8601 UTC): the recorded time, or now
when the sites were asked.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from imagesync.config.types import Config
from imagesync.errors import ConfigError, NotFound, SiteError, UsageError
from imagesync.model import format_time, printable
from imagesync.state import RecordedCell, read_cell

OK, MISSING, USAGE, UNKNOWN = 0, 1, 2, 3
#: ``--ensure`` without ``--timeout`` gives up after this long (seconds): a scheduler's
#: pre-flight must not hang for ever on a copy that cannot finish
DEFAULT_ENSURE_TIMEOUT = 1800.0
#: seconds per request when confirming a recorded id: a pre-flight check must not wait a
#: cloud's whole request timeout for a confirmation it can do without
CONFIRM_TIMEOUT = 5.0
#: how a cloud's auth_type reads when ``load_config(resolve_clouds=False)`` left it unread
_UNRESOLVED = "unresolved"


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
    """Answer from recorded state (exit 0), or None when the sites must be asked.

    ``config`` may be a light one (clouds.yaml unread): the credentials are read only to
    confirm the recorded id, and an account that cannot read them still gets its answer.
    """
    _validate(config, cloud, False, None)
    recorded = _recorded(config, name, cloud)
    if recorded is None:
        return None
    cell, payload = recorded
    confirmed, note = _confirm(config, name, cloud, cell)
    if confirmed is False:
        return None  # the site no longer holds it as recorded: never hand it out
    if confirmed:
        payload["answered_from"] = "confirmed"
    else:
        payload["unconfirmed"] = note
    return _emit(as_json, {"name": name, "cloud": cloud, **payload}, OK)


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
    """The answer and exit code (see the module docstring). ``config`` may be light (see
    ``load_config(resolve_clouds=False)``): the credentials are read only when needed."""
    _validate(config, cloud, ensure, timeout)
    base: dict[str, Any] = {"name": name, "cloud": cloud}
    if not fresh and not ensure:
        code = check_recorded(config, name, cloud, as_json=as_json)
        if code is not None:
            return code
    if ensure and timeout is None:
        timeout = DEFAULT_ENSURE_TIMEOUT
    deadline = time.monotonic() + timeout if timeout is not None else None
    return _ask(_resolved(config), name, cloud, base, as_json, ensure, deadline)


def _is_light(config: Config) -> bool:
    return any(c.auth_type == _UNRESOLVED for c in config.clouds.values())


def _resolved(config: Config) -> Config:
    """``config`` with its credentials read (clouds.yaml), loading the file again if needed."""
    if not _is_light(config):
        return config
    from imagesync.config.load import load_config

    return load_config(config.path)


def _confirm(config: Config, name: str, cloud: str, cell: RecordedCell) -> tuple[bool | None, str]:
    """Does ``cloud`` still hold the recorded image, as recorded? One GET by id.

    (True, _): yes. (False, why): no (gone, not active, hidden, renamed, other bytes): do not
    hand it out. (None, why): cannot say (no credentials for this account, or the site did
    not answer): the recorded answer stands, labelled as such. Logs nothing: on this path
    logging is not set up (its import alone would double the time of a recorded answer).
    """
    assert cell.image_id is not None
    try:
        # a store's configuration is complete without clouds.yaml
        full = config if cloud in config.stores else _resolved(config)
    except (ConfigError, OSError):
        # the scheduler account may not read the secrets: a supported deployment
        return None, "no credentials readable by this account"
    from imagesync.sites import open_site

    if cloud in full.clouds:
        limit = min(full.clouds[cloud].timeout, CONFIRM_TIMEOUT)
        fast = dataclasses.replace(full.clouds[cloud], timeout=limit)
        full = dataclasses.replace(full, clouds={**full.clouds, cloud: fast})

    try:
        site = open_site(full, cloud)
        try:
            rec = site.get_image(cell.image_id)
        finally:
            site.close()
    except NotFound:
        return False, f"recorded image {cell.image_id} is gone"
    except (SiteError, OSError) as exc:
        return None, f"could not confirm: {type(exc).__name__}"
    digest = rec.hashes.get("sha512")
    if rec.status != "active" or rec.hidden:
        return False, f"recorded image {cell.image_id} is {'hidden' if rec.hidden else rec.status}"
    if rec.name != name or (digest and cell.sha512 and digest != cell.sha512):
        return False, f"recorded image {cell.image_id} changed"
    return True, "confirmed by the site"


def _recorded(config: Config, name: str, cloud: str) -> tuple[RecordedCell, dict[str, Any]] | None:
    """A young enough 'current' answer from the last push/sync, or None. Reads the state
    database read-only: a scheduler account that may not write ``state_dir`` can call it."""
    cell = read_cell(config.state_dir, name, cloud)
    if cell is None or cell.state != "current" or not cell.image_id:
        return None
    age = time.time() - cell.recorded
    if age > config.check_max_age:
        return None
    return cell, {
        "state": "current",
        "image_id": cell.image_id,
        "version": cell.newest,
        "sha512": cell.sha512,
        "answered_from": "recorded",
        "as_of": _iso(cell.recorded),
        "age_seconds": round(age, 1),
    }


def _iso(when: float) -> str:
    """``as_of``: ISO 8601 UTC, to the second."""
    return format_time(datetime.fromtimestamp(int(when), UTC))


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
                "as_of": _iso(time.time()),
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
