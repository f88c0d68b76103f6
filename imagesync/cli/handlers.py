"""What each command does with its parsed arguments: load the configuration, set up
logging, call the command (imported here, when it runs, so that ``check`` starts fast)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def _config(args: argparse.Namespace) -> Any:
    """Load the configuration and set up logging from it (and the command line)."""
    from imagesync.config.load import load_config

    config = load_config(args.config)
    _setup_logging(args, config)
    return config


def _setup_logging(args: argparse.Namespace, config: Any = None) -> None:
    from imagesync.logs import setup_logging

    fmt = args.log_format or (config.log_format if config is not None else "auto")
    level = "debug" if args.verbose else (config.log_level if config is not None else "info")
    daemon = args.command == "daemon"
    # The daemon's log is its output (journald); other commands keep stdout for results. A
    # person at a terminal reads the command's own output: only warnings and errors around
    # it, unless -v.
    setup_logging(
        fmt=fmt,
        level=level,
        stream=sys.stdout if daemon else sys.stderr,
        terminal_level=None if daemon or args.verbose else "warning",
    )


def cmd_config_check(args: argparse.Namespace) -> int:
    from imagesync.sites.probe import check_connections, check_state_dir

    config = _config(args)
    print(
        f"{config.path}: ok ({len(config.clouds)} clouds, {len(config.stores)} stores, "
        f"{len(config.images)} image rules)"
    )
    if not args.connect:
        return 0
    ok, detail = check_state_dir(config.state_dir)  # as the user running this command
    print(f"  state_dir: {'ok' if ok else 'FAILED'} - {detail}")
    failed = 0 if ok else 1
    for name, ok, detail in check_connections(config):
        print(f"  {name}: {'ok' if ok else 'FAILED'}{' - ' + detail if detail else ''}")
        failed += not ok
    return 1 if failed else 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from imagesync.config.render import render_config

    print(render_config(_config(args)), end="")
    return 0


def cmd_config_example(args: argparse.Namespace) -> int:
    from imagesync import data

    print(data.read(data.CLOUDS_EXAMPLE if args.clouds_yaml else data.CONFIG_EXAMPLE), end="")
    return 0


def cmd_config_unit(args: argparse.Namespace) -> int:
    from imagesync import data

    print(data.read(data.SYSTEMD_UNIT), end="")
    return 0


def cmd_lab_up(args: argparse.Namespace) -> int:
    from imagesync import lab
    from imagesync.sites import store_kinds

    info = lab.up(
        clouds=args.clouds,
        directory=args.dir,
        token_expiration=args.token_expiration,
        # the lab's VOSpace service becomes the central store once imagesync can build the site
        vospace_store="vospace" in store_kinds(),
        nova_clouds=args.nova,
        with_etcd=args.etcd,
    )
    print(lab.describe(info))
    return 0


def cmd_lab_status(args: argparse.Namespace) -> int:
    from imagesync import lab

    text, running = lab.status(directory=args.dir)
    print(text)
    return 0 if running else 1


def cmd_lab_down(args: argparse.Namespace) -> int:
    from imagesync import lab

    print(lab.down(directory=args.dir))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from imagesync.demo import run_demo

    return run_demo(directory=args.dir, keep=args.keep)


def cmd_push(args: argparse.Namespace) -> int:
    from imagesync.commands import push

    config = _config(args)
    return push(
        config,
        args.name,
        targets=args.to,
        source=args.source,
        dry_run=args.dry_run,
        as_json=args.json,
    )


def cmd_snapshot(args: argparse.Namespace) -> int:
    from imagesync.commands.snapshot import snapshot
    from imagesync.snapshot import SnapshotRequest

    request = SnapshotRequest(
        args.server, name=args.as_name, stop=args.stop, wait=args.wait, timeout=args.timeout
    )
    return snapshot(
        _config(args), request, cloud=args.cloud, push_after=args.push, as_json=args.json
    )


def cmd_status(args: argparse.Namespace) -> int:
    from imagesync.commands import status

    config = _config(args)
    return status(config, args.name, as_json=args.json)


def cmd_check(args: argparse.Namespace) -> int:
    # Called before every boot: answer from recorded state without importing OpenStack
    # clients or setting up logging when that is enough. clouds.yaml (the secrets) is read
    # only to confirm the recorded id or to ask the sites: a scheduler account that may not
    # read it still gets the recorded answer.
    from imagesync.check import check, check_recorded
    from imagesync.config.load import load_config

    light = load_config(args.config, resolve_clouds=False)
    if not (args.fresh or args.ensure):
        code = check_recorded(light, args.name, args.cloud, as_json=args.json)
        if code is not None:
            return code
    config = _config(args)
    return check(
        config,
        args.name,
        args.cloud,
        as_json=args.json,
        ensure=args.ensure,
        timeout=args.timeout,
        fresh=True,
    )


def cmd_sync(args: argparse.Namespace) -> int:
    from imagesync.commands import sync

    config = _config(args)
    return sync(config, dry_run=args.dry_run, as_json=args.json)


def cmd_daemon(args: argparse.Namespace) -> int:
    from imagesync.daemon import run_daemon

    config = _config(args)
    code: int = run_daemon(config, config_path=args.config)
    return code


def cmd_history(args: argparse.Namespace) -> int:
    from imagesync.commands import history

    config = _config(args)
    return history(config, args.name, as_json=args.json, limit=args.limit)
