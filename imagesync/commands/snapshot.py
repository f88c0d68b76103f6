"""What ``snapshot`` does: take a Nova snapshot of a server as the newest version of an image
name, recorded as made by imagesync, and with ``--push`` spread it as ``push`` does."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import sys
from typing import TYPE_CHECKING

from imagesync.commands import push
from imagesync.config.types import CloudConfig, Config
from imagesync.errors import UsageError
from imagesync.model import printable
from imagesync.plan import rule_for

if TYPE_CHECKING:
    from imagesync.snapshot import SnapshotRequest, SnapshotResult


def snapshot(
    config: Config,
    request: SnapshotRequest,
    *,
    cloud: str,
    push_after: bool = False,
    as_json: bool = False,
) -> int:
    """Snapshot a server as the newest version of ``request.name`` (default: its base
    image's name), recorded as made by imagesync; with ``push_after``, propagate it as
    ``push`` does (waiting for the snapshot to be active first, whatever ``request.wait``)."""
    from imagesync.snapshot import SnapshotFailed

    cfg = config.clouds.get(cloud)
    if cfg is None:
        known = ", ".join(config.clouds) or "none"
        raise UsageError(f"--cloud: no cloud called {cloud!r} (known: {known})")
    name = request.name
    if name is not None and push_after and rule_for(config.images, name) is None:
        raise UsageError(f"--push: no image rule in {config.path} matches {name!r}")
    if push_after:
        request = dataclasses.replace(request, wait=True)
    try:
        result = _take_snapshot(config, cfg, request)
    except SnapshotFailed as exc:
        if as_json:
            print(json.dumps({"ok": False, "error": str(exc)}, indent=2))
        else:
            print(printable(f"FAILED snapshot: {exc}"), file=sys.stderr)
        return 1
    for w in result.warnings:
        print(printable(f"warning: {w}"), file=sys.stderr)
    out = result.as_dict()
    code = 0
    if push_after:
        # the same path as `push`; its JSON becomes part of this command's one JSON answer
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf) if as_json else contextlib.nullcontext():
            code = push(config, result.name, as_json=as_json)
        if as_json:
            out["push"] = json.loads(buf.getvalue())
            out["push"]["exit"] = code
    if as_json:
        print(json.dumps(out, indent=2))
    else:
        print(
            printable(
                f"snapshot {result.image_id} of server {result.server_name or result.server_id} "
                f"on {result.cloud}: {result.name}, {result.status} "
                f"({result.seconds:.1f} s)"
            ),
            file=sys.stderr if push_after else sys.stdout,
        )
    return code


def _take_snapshot(config: Config, cfg: CloudConfig, request: SnapshotRequest) -> SnapshotResult:
    """Take the snapshot on cloud ``cfg``, recorded in the state as made by imagesync."""
    from imagesync.sites.nova import NovaSnapshots
    from imagesync.sites.openstack import make_session
    from imagesync.snapshot import take
    from imagesync.state import State

    state = State(config.state_dir)
    try:
        nova = NovaSnapshots(cfg, make_session(cfg))

        def record(image_id: str, image_name: str) -> None:
            state.record_made(cfg.name, image_id, image_name)

        return take(nova, request, record=record)
    finally:
        state.close()
