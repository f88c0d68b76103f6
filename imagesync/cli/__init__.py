"""Command line: parses arguments, calls a command, prints. No logic of its own.

Exit codes: 0 ok; 1 something failed (or, for ``check``, missing/stale); 2 usage or
configuration error; 3 ``check`` cannot tell (site unreachable, or any unexpected error:
one line on stderr, the details in the debug log); 130 interrupted.

The package: ``parser`` declares every command and its arguments (one table), ``handlers``
turns parsed arguments into a call of a command, and this module runs one and maps what
escapes it to an exit code. Heavy modules are imported inside the handlers so that
``check`` starts fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from imagesync.cli.handlers import Handler, _setup_logging
from imagesync.cli.parser import build_parser
from imagesync.errors import ConfigError, ImageSyncError, UsageError

__all__ = ["build_parser", "main"]


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
