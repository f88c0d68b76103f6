"""The command line's grammar: every command, its arguments and its --help (what it does,
its exit codes, an example) declared once in a table, and the argparse parser built from it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagesync.cli.handlers import (
    Handler,
    cmd_check,
    cmd_config_check,
    cmd_config_example,
    cmd_config_show,
    cmd_config_unit,
    cmd_daemon,
    cmd_demo,
    cmd_history,
    cmd_lab_down,
    cmd_lab_status,
    cmd_lab_up,
    cmd_push,
    cmd_snapshot,
    cmd_status,
    cmd_sync,
)


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


@dataclass(frozen=True)
class Arg:
    """One ``add_argument`` call: the flags (or a positional's name) and its keywords."""

    flags: tuple[str, ...]
    options: Mapping[str, Any]


def _arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


@dataclass(frozen=True)
class Command:
    """One command (or a group of actions): what its --help says, its arguments, its handler."""

    name: str
    summary: str
    exits: str
    examples: tuple[str, ...]
    args: tuple[Arg, ...] = ()
    run: Handler | None = None
    description: str = ""
    actions: tuple[Command, ...] = ()  # a group: `imagesync config ACTION`


# Arguments that several commands share, declared once so that they read the same everywhere.
JSON = _arg("--json", action="store_true", help="machine-readable output")
DRY_RUN = _arg("--dry-run", action="store_true", help="print the plan, change nothing")
LAB_DIR = _arg("--dir", type=Path, default=None, help="lab directory")
NAME = _arg("name", metavar="NAME", help="the image name (exact)")

GLOBAL_ARGS = (
    _arg("--version", action=_Version, help="print the version and exit"),
    _arg(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        help="config file (else $IMAGESYNC_CONFIG, else /etc/imagesync/imagesync.yaml)",
    ),
    _arg(
        "--log-format",
        choices=["auto", "json", "console"],
        default=None,
        help="log format (default: console on a terminal, JSON otherwise)",
    ),
    _arg(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging (on a terminal, only warnings and errors are logged without it)",
    ),
)

CONFIG = Command(
    "config",
    "validate or show the configuration; print the example, clouds.yaml or unit",
    "0 ok; 1 a site failed (check --connect); 2 invalid configuration",
    ("imagesync config example > /etc/imagesync/imagesync.yaml",),
    actions=(
        Command(
            "check",
            "validate the configuration (and with --connect, log in to every site)",
            "0 valid (and every site answered); 1 a site failed; 2 invalid",
            ("imagesync -c /etc/imagesync/imagesync.yaml config check --connect",),
            (_arg("--connect", action="store_true", help="also authenticate to every cloud"),),
            cmd_config_check,
        ),
        Command(
            "show",
            "print the effective configuration (secrets masked)",
            "0 printed; 2 invalid",
            ("imagesync config show",),
            run=cmd_config_show,
        ),
        Command(
            "example",
            "print the annotated example configuration (every key, its default and range)",
            "0 printed",
            (
                "imagesync config example > /etc/imagesync/imagesync.yaml",
                "imagesync config example --clouds-yaml > /etc/imagesync/clouds.yaml",
            ),
            (
                _arg(
                    "--clouds-yaml",
                    action="store_true",
                    help="print the example clouds.yaml it names instead (the secrets)",
                ),
            ),
            cmd_config_example,
        ),
        Command(
            "unit",
            "print the hardened systemd unit for `imagesync daemon`",
            "0 printed",
            ("imagesync config unit > /etc/systemd/system/imagesync.service",),
            run=cmd_config_unit,
        ),
    ),
)

LAB = Command(
    "lab",
    "run real Keystone + Glance clouds on loopback (development and tests)",
    "0 ok; 1 lab status: not running",
    ("imagesync lab up --clouds 3 --dir /tmp/lab",),
    actions=(
        Command(
            "up",
            "start the lab (idempotent)",
            "0 running; 1 it could not start",
            ("imagesync lab up --clouds 3 --dir /tmp/lab",),
            (
                _arg(
                    "--clouds", type=_positive_int, default=2, help="number of clouds (default 2)"
                ),
                LAB_DIR,
                _arg(
                    "--token-expiration",
                    type=int,
                    default=None,
                    metavar="SECONDS",
                    help="Keystone token lifetime (to test re-authentication)",
                ),
                _arg(
                    "--nova",
                    type=_positive_int,
                    nargs="?",
                    const=1,
                    default=0,
                    metavar="N",
                    help="also run Placement + Nova (fake virt driver) in the first N clouds "
                    "(N=1 if omitted); costs about 320 MB of memory a cloud and 15 s on the "
                    "first start",
                ),
                _arg(
                    "--etcd",
                    action="store_true",
                    help="also run a real etcd (Debian's etcd-server) and name it as the "
                    "generated config's coordination URL, for several daemons to share the work",
                ),
            ),
            cmd_lab_up,
        ),
        Command(
            "status",
            "show the lab's services",
            "0 running; 1 not running",
            ("imagesync lab status --dir /tmp/lab",),
            (LAB_DIR,),
            cmd_lab_status,
        ),
        Command(
            "down",
            "stop every lab process",
            "0 stopped",
            ("imagesync lab down --dir /tmp/lab",),
            (LAB_DIR,),
            cmd_lab_down,
        ),
    ),
)

COMMANDS = (
    CONFIG,
    LAB,
    Command(
        "demo",
        "start a 2-cloud lab and show one sync pass end to end",
        "0 the demo ran; 1 a step failed",
        ("imagesync demo --keep",),
        (_arg("--keep", action="store_true", help="leave the lab running afterwards"), LAB_DIR),
        cmd_demo,
    ),
    Command(
        "push",
        "copy the newest version of NAME where it is needed",
        "0 copied, or already current everywhere; 1 a target failed, or NAME could not be "
        "brought where its rule wants it; 2 usage or configuration error; 130 interrupted "
        "(its uploads removed)",
        ("imagesync push canfar-batch-el9 --to uvic --dry-run",),
        (
            NAME,
            _arg(
                "--to",
                action="append",
                default=[],
                metavar="SITE",
                help="target site (repeatable; default: the sites its rule names)",
            ),
            _arg("--from", dest="source", metavar="SITE", help="read from this site"),
            DRY_RUN,
            JSON,
        ),
        cmd_push,
        description="Copy the newest version of NAME to every site its rule names (or the "
        "--to sites): read once, fanned out to every target, verified, then published. "
        "Idempotent: a second push copies nothing.",
    ),
    Command(
        "status",
        "image names x sites: current, stale, missing, ...",
        "0 shown; 2 usage or configuration error",
        ("imagesync status canfar-batch-el9 --json",),
        (
            _arg(
                "name",
                nargs="?",
                metavar="NAME",
                help="one image name (default: every name a rule manages)",
            ),
            JSON,
        ),
        cmd_status,
    ),
    Command(
        "check",
        "pre-flight: is the newest NAME on CLOUD? prints its id",
        "0 there (stdout: the image id to boot); 1 missing or stale; 2 usage or "
        "configuration error; 3 cannot tell (a site unreachable, anything unexpected)",
        (
            "id=$(imagesync check canfar-batch-el9 --cloud uvic) && openstack server create "
            '--image "$id" ...',
        ),
        (
            NAME,
            _arg("--cloud", required=True, metavar="SITE", help="the cloud to boot on"),
            JSON,
            _arg("--ensure", action="store_true", help="push it there first and wait"),
            _arg(
                "--timeout",
                type=float,
                default=None,
                metavar="SECONDS",
                help="with --ensure: give up after this long (exit 1); default 1800 (30 minutes)",
            ),
            _arg(
                "--fresh",
                action="store_true",
                help="always ask the sites; never answer from recorded state",
            ),
        ),
        cmd_check,
        description="A batch scheduler's pre-flight: is the newest version of NAME on CLOUD? "
        "Prints the image id to boot (boot by id: Glance allows duplicate names). Answers "
        "from recorded state when it is fresh enough.",
    ),
    Command(
        "snapshot",
        "snapshot a server (Nova) as the newest version of an image name",
        "0 the snapshot is active (and pushed, with --push); 1 the snapshot failed (nothing "
        "left behind) or the push failed; 2 usage or configuration error; 3 unexpected error",
        ("imagesync snapshot my-vm --cloud uvic --stop --push",),
        (
            _arg("server", help="server id or unique name"),
            _arg("--cloud", required=True, metavar="CLOUD", help="the server's cloud"),
            _arg(
                "--as",
                dest="as_name",
                metavar="NAME",
                help="image name it is a version of (default: the server's base image's name)",
            ),
            _arg("--stop", action="store_true", help="stop a running server first (left stopped)"),
            _arg("--wait", action="store_true", help="wait until the image is active"),
            _arg(
                "--timeout",
                type=float,
                default=600.0,
                metavar="SECONDS",
                help="give up waiting after this long (default 600); the snapshot is removed",
            ),
            _arg(
                "--push",
                action="store_true",
                help="then propagate it as `push` does (implies --wait)",
            ),
            JSON,
        ),
        cmd_snapshot,
    ),
    Command(
        "sync",
        "one reconcile pass over every rule",
        "0 done (or nothing to do); 1 an action failed; 2 usage or configuration error; "
        "130 interrupted",
        ("imagesync sync --dry-run",),
        (DRY_RUN, JSON),
        cmd_sync,
    ),
    Command(
        "daemon",
        "run the reconcile loop until stopped (systemd: `imagesync config unit`)",
        "0 stopped (SIGTERM/SIGINT); 1 could not start (metrics listener); 2 invalid configuration",
        ("imagesync -c /etc/imagesync/imagesync.yaml daemon",),
        run=cmd_daemon,
        description="Run the reconcile loop every poll_interval until stopped. Logs JSON "
        "lines on stdout (journald); SIGHUP re-reads the configuration, SIGTERM cancels "
        "the running transfers and removes their uploads.",
    ),
    Command(
        "history",
        "transfers and retirements imagesync made (failed and interrupted ones too)",
        "0 shown; 2 usage or configuration error",
        ("imagesync history canfar-batch-el9 --limit 10",),
        (
            _arg("name", nargs="?", metavar="NAME", help="one image name (default: every name)"),
            JSON,
            _arg(
                "--limit",
                type=_positive_int,
                default=50,
                metavar="N",
                help="show the newest N rows (default 50)",
            ),
        ),
        cmd_history,
    ),
)


def _add_commands(
    parser: argparse.ArgumentParser, dest: str, metavar: str, commands: Sequence[Command]
) -> None:
    """One subparser a command, its help saying what it does, its exit codes and an example;
    a group's actions under it."""
    import textwrap

    sub = parser.add_subparsers(dest=dest, metavar=metavar, parser_class=_Parser)
    sub.required = True
    for command in commands:
        text = command.description or command.summary[0].upper() + command.summary[1:] + "."
        p = sub.add_parser(
            command.name,
            help=command.summary,
            description=textwrap.fill(text, width=88),
            epilog=_epilog(command.exits, *command.examples),
        )
        _add_args(p, command.args)
        if command.run is not None:
            p.set_defaults(func=command.run)
        if command.actions:
            _add_commands(p, f"{command.name}_command", "ACTION", command.actions)


def _add_args(parser: argparse.ArgumentParser, args: Sequence[Arg]) -> None:
    for a in args:
        parser.add_argument(*a.flags, **a.options)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, built from COMMANDS."""
    p = _Parser(prog="imagesync", description=DESCRIPTION, epilog=EPILOG)
    _add_args(p, GLOBAL_ARGS)
    _add_commands(p, "command", "COMMAND", COMMANDS)
    return p
