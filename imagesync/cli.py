"""Command line: parses arguments, calls the engine, prints. No logic of its own.

Exit codes: 0 ok; 1 something failed (or, for ``check``, missing/stale); 2 usage or
configuration error; 3 ``check`` cannot tell (site unreachable, or any unexpected error:
one line on stderr, the details in the debug log); 130 interrupted.
Heavy modules are imported inside the commands so that ``check`` starts fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from imagesync.errors import ConfigError, ImageSyncError, UsageError

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # epilogs hold exit codes and examples, laid out by hand
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"imagesync: error: {message}\n")


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (argparse turns the error into exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


class _Version(argparse.Action):
    """``--version``: the version, the Python and where it is installed (which venv an
    operator's ``imagesync`` is, after an upgrade). Computed only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        import platform

        from imagesync import __version__

        print(f"imagesync {__version__} (Python {platform.python_version()}, {sys.prefix})")
        parser.exit(0)


DESCRIPTION = """\
Keep the newest version of every named VM image on every OpenStack cloud and central store
that needs it: verified byte for byte, never half-made, ready before the batch job boots.
A batch scheduler asks `imagesync check NAME --cloud CLOUD` which image id to boot."""

EPILOG = """\
exit codes:
  0    done (check: the image is there; its id is on stdout)
  1    something failed (check: missing or stale)
  2    usage or configuration error (one line on stderr: the file, the key, the fix)
  3    check cannot tell (a site unreachable, or anything unexpected)
  130  interrupted (Ctrl-C, SIGTERM): the uploads it had started were removed

files:
  /etc/imagesync/imagesync.yaml   the configuration (or -c FILE, or $IMAGESYNC_CONFIG);
                                  `imagesync config example` prints an annotated one
  /etc/imagesync/clouds.yaml      the clouds' credentials (`config example --clouds-yaml`)
  /var/lib/imagesync              state_dir: history, locks, recorded answers

examples:
  imagesync config check --connect
  imagesync push canfar-batch-el9 --dry-run
  imagesync status
  imagesync check canfar-batch-el9 --cloud uvic
  imagesync history --limit 20

Run `imagesync COMMAND --help` for a command's options, exit codes and an example."""


def _epilog(exits: str, *examples: str) -> str:
    """``exits`` is "CODE meaning; CODE meaning; …"."""
    lines = ["exit codes:"]
    for item in exits.split("; "):
        code, _, meaning = item.partition(" ")
        lines.append(f"  {code:<4} {meaning}")
    return "\n".join([*lines, "", "example:", *(f"  {e}" for e in examples)])


def _command(
    sub: Any, name: str, summary: str, exits: str, *examples: str, description: str = ""
) -> argparse.ArgumentParser:
    """A subcommand whose help says what it does, its exit codes and an example."""
    import textwrap

    text = description or summary[0].upper() + summary[1:] + "."
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=textwrap.fill(text, width=88),
        epilog=_epilog(exits, *examples),
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="imagesync", description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--version", action=_Version, help="print the version and exit")
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        help="config file (else $IMAGESYNC_CONFIG, else /etc/imagesync/imagesync.yaml)",
    )
    p.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default=None,
        help="log format (default: console on a terminal, JSON otherwise)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging (on a terminal, only warnings and errors are logged without it)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    cfg = _command(
        sub,
        "config",
        "validate or show the configuration; print the example, clouds.yaml or unit",
        "0 ok; 1 a site failed (check --connect); 2 invalid configuration",
        "imagesync config example > /etc/imagesync/imagesync.yaml",
    )
    cfgsub = cfg.add_subparsers(dest="config_command", metavar="ACTION", parser_class=_Parser)
    cfgsub.required = True
    chk = _command(
        cfgsub,
        "check",
        "validate the configuration (and with --connect, log in to every site)",
        "0 valid (and every site answered); 1 a site failed; 2 invalid",
        "imagesync -c /etc/imagesync/imagesync.yaml config check --connect",
    )
    chk.add_argument("--connect", action="store_true", help="also authenticate to every cloud")
    chk.set_defaults(func=cmd_config_check)
    show = _command(
        cfgsub,
        "show",
        "print the effective configuration (secrets masked)",
        "0 printed; 2 invalid",
        "imagesync config show",
    )
    show.set_defaults(func=cmd_config_show)
    example = _command(
        cfgsub,
        "example",
        "print the annotated example configuration (every key, its default and range)",
        "0 printed",
        "imagesync config example > /etc/imagesync/imagesync.yaml",
        "imagesync config example --clouds-yaml > /etc/imagesync/clouds.yaml",
    )
    example.add_argument(
        "--clouds-yaml",
        action="store_true",
        help="print the example clouds.yaml it names instead (the secrets)",
    )
    example.set_defaults(func=cmd_config_example)
    unit = _command(
        cfgsub,
        "unit",
        "print the hardened systemd unit for `imagesync daemon`",
        "0 printed",
        "imagesync config unit > /etc/systemd/system/imagesync.service",
    )
    unit.set_defaults(func=cmd_config_unit)

    lab = _command(
        sub,
        "lab",
        "run real Keystone + Glance clouds on loopback (development and tests)",
        "0 ok; 1 lab status: not running",
        "imagesync lab up --clouds 3 --dir /tmp/lab",
    )
    labsub = lab.add_subparsers(dest="lab_command", metavar="ACTION", parser_class=_Parser)
    labsub.required = True
    up = _command(
        labsub,
        "up",
        "start the lab (idempotent)",
        "0 running; 1 it could not start",
        "imagesync lab up --clouds 3 --dir /tmp/lab",
    )
    up.add_argument("--clouds", type=_positive_int, default=2, help="number of clouds (default 2)")
    up.add_argument("--dir", type=Path, default=None, help="lab directory")
    up.add_argument(
        "--token-expiration",
        type=int,
        default=None,
        metavar="SECONDS",
        help="Keystone token lifetime (to test re-authentication)",
    )
    up.add_argument(
        "--nova",
        type=_positive_int,
        nargs="?",
        const=1,
        default=0,
        metavar="N",
        help="also run Placement + Nova (fake virt driver) in the first N clouds (N=1 if "
        "omitted); costs about 320 MB of memory a cloud and 15 s on the first start",
    )
    up.add_argument(
        "--etcd",
        action="store_true",
        help="also run a real etcd (Debian's etcd-server) and name it as the generated "
        "config's coordination URL, for several daemons to share the work",
    )
    up.set_defaults(func=cmd_lab_up)
    st = _command(
        labsub,
        "status",
        "show the lab's services",
        "0 running; 1 not running",
        "imagesync lab status --dir /tmp/lab",
    )
    st.add_argument("--dir", type=Path, default=None, help="lab directory")
    st.set_defaults(func=cmd_lab_status)
    down = _command(
        labsub, "down", "stop every lab process", "0 stopped", "imagesync lab down --dir /tmp/lab"
    )
    down.add_argument("--dir", type=Path, default=None, help="lab directory")
    down.set_defaults(func=cmd_lab_down)

    demo = _command(
        sub,
        "demo",
        "start a 2-cloud lab and show one sync pass end to end",
        "0 the demo ran; 1 a step failed",
        "imagesync demo --keep",
    )
    demo.add_argument("--keep", action="store_true", help="leave the lab running afterwards")
    demo.add_argument("--dir", type=Path, default=None, help="lab directory")
    demo.set_defaults(func=cmd_demo)

    push = _command(
        sub,
        "push",
        "copy the newest version of NAME where it is needed",
        "0 copied, or already current everywhere; 1 a target failed, or NAME could not be "
        "brought where its rule wants it; 2 usage or configuration error; 130 interrupted "
        "(its uploads removed)",
        "imagesync push canfar-batch-el9 --to uvic --dry-run",
        description="Copy the newest version of NAME to every site its rule names (or the "
        "--to sites): read once, fanned out to every target, verified, then published. "
        "Idempotent: a second push copies nothing.",
    )
    push.add_argument("name", metavar="NAME", help="the image name (exact)")
    push.add_argument(
        "--to",
        action="append",
        default=[],
        metavar="SITE",
        help="target site (repeatable; default: the sites its rule names)",
    )
    push.add_argument("--from", dest="source", metavar="SITE", help="read from this site")
    push.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    push.add_argument("--json", action="store_true", help="machine-readable output")
    push.set_defaults(func=cmd_push)

    status = _command(
        sub,
        "status",
        "image names x sites: current, stale, missing, ...",
        "0 shown; 2 usage or configuration error",
        "imagesync status canfar-batch-el9 --json",
    )
    status.add_argument(
        "name",
        nargs="?",
        metavar="NAME",
        help="one image name (default: every name a rule manages)",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    check = _command(
        sub,
        "check",
        "pre-flight: is the newest NAME on CLOUD? prints its id",
        "0 there (stdout: the image id to boot); 1 missing or stale; 2 usage or "
        "configuration error; 3 cannot tell (a site unreachable, anything unexpected)",
        "id=$(imagesync check canfar-batch-el9 --cloud uvic) && openstack server create "
        '--image "$id" ...',
        description="A batch scheduler's pre-flight: is the newest version of NAME on CLOUD? "
        "Prints the image id to boot (boot by id: Glance allows duplicate names). Answers "
        "from recorded state when it is fresh enough.",
    )
    check.add_argument("name", metavar="NAME", help="the image name (exact)")
    check.add_argument("--cloud", required=True, metavar="SITE", help="the cloud to boot on")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument("--ensure", action="store_true", help="push it there first and wait")
    check.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --ensure: give up after this long (exit 1); default 1800 (30 minutes)",
    )
    check.add_argument(
        "--fresh",
        action="store_true",
        help="always ask the sites; never answer from recorded state",
    )
    check.set_defaults(func=cmd_check)

    snap = _command(
        sub,
        "snapshot",
        "snapshot a server (Nova) as the newest version of an image name",
        "0 the snapshot is active (and pushed, with --push); 1 the snapshot failed (nothing "
        "left behind) or the push failed; 2 usage or configuration error; 3 unexpected error",
        "imagesync snapshot my-vm --cloud uvic --stop --push",
    )
    snap.add_argument("server", help="server id or unique name")
    snap.add_argument("--cloud", required=True, metavar="CLOUD", help="the server's cloud")
    snap.add_argument(
        "--as",
        dest="as_name",
        metavar="NAME",
        help="image name it is a version of (default: the server's base image's name)",
    )
    snap.add_argument(
        "--stop", action="store_true", help="stop a running server first (left stopped)"
    )
    snap.add_argument("--wait", action="store_true", help="wait until the image is active")
    snap.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="give up waiting after this long (default 600); the snapshot is removed",
    )
    snap.add_argument(
        "--push", action="store_true", help="then propagate it as `push` does (implies --wait)"
    )
    snap.add_argument("--json", action="store_true", help="machine-readable output")
    snap.set_defaults(func=cmd_snapshot)

    sync = _command(
        sub,
        "sync",
        "one reconcile pass over every rule",
        "0 done (or nothing to do); 1 an action failed; 2 usage or configuration error; "
        "130 interrupted",
        "imagesync sync --dry-run",
    )
    sync.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    sync.add_argument("--json", action="store_true", help="machine-readable output")
    sync.set_defaults(func=cmd_sync)

    daemon = _command(
        sub,
        "daemon",
        "run the reconcile loop until stopped (systemd: `imagesync config unit`)",
        "0 stopped (SIGTERM/SIGINT); 1 could not start (metrics listener); 2 invalid configuration",
        "imagesync -c /etc/imagesync/imagesync.yaml daemon",
        description="Run the reconcile loop every poll_interval until stopped. Logs JSON "
        "lines on stdout (journald); SIGHUP re-reads the configuration, SIGTERM cancels "
        "the running transfers and removes their uploads.",
    )
    daemon.set_defaults(func=cmd_daemon)

    hist = _command(
        sub,
        "history",
        "transfers and retirements imagesync made (failed and interrupted ones too)",
        "0 shown; 2 usage or configuration error",
        "imagesync history canfar-batch-el9 --limit 10",
    )
    hist.add_argument(
        "name", nargs="?", metavar="NAME", help="one image name (default: every name)"
    )
    hist.add_argument("--json", action="store_true", help="machine-readable output")
    hist.add_argument(
        "--limit",
        type=_positive_int,
        default=50,
        metavar="N",
        help="show the newest N rows (default 50)",
    )
    hist.set_defaults(func=cmd_history)
    return p


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
    from imagesync.commands import snapshot

    config = _config(args)
    return snapshot(
        config,
        args.server,
        cloud=args.cloud,
        name=args.as_name,
        stop=args.stop,
        wait=args.wait,
        timeout=args.timeout,
        push_after=args.push,
        as_json=args.json,
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


def _sigterm_as_interrupt() -> None:
    """Let SIGTERM unwind like Ctrl-C, so `finally:` blocks clean up (the daemon has its own)."""
    import signal

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler = args.func
    from imagesync.secrets import redact

    if args.command != "daemon" and argv is None:
        _sigterm_as_interrupt()
    try:
        return func(args)
    except BrokenPipeError:
        # the reader went away (`imagesync lab up | head -1`): not an error worth a traceback
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (ConfigError, UsageError) as exc:
        print(f"imagesync: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imagesync: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.command != "check":
            if isinstance(exc, ImageSyncError):
                print(f"imagesync: error: {redact(str(exc))}", file=sys.stderr)
                return 1
            raise
        return _check_failed(args, exc)


def _check_failed(args: argparse.Namespace, exc: Exception) -> int:
    """``check`` met something unexpected: exit 3 ("cannot tell"), never 1, which a scheduler
    reads as "missing" (and may act on); one line on stderr, the traceback in the debug log."""
    import structlog

    from imagesync.secrets import redact

    _setup_logging(args)
    structlog.get_logger("imagesync.check").debug("check.failed", exc_info=exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    print(f"imagesync check: cannot tell: {redact(detail)[:300]}", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
