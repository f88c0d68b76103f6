"""Logging: structlog key-value events as JSON lines or console text, with every secret masked.

Secrets are masked in two ways, both in the one processor every log line passes through:

* by key: an event key named like a secret (``password``, ``application_credential_secret``,
  ``token``, ``X-Auth-Token``, ``api_key`` …) has its value replaced by ``********``;
* by value: every string (the event, other values, formatted tracebacks) has each *registered*
  secret value replaced. Configuration loading calls :func:`register_secret` for every password,
  application-credential secret and token it reads, so a secret that leaks into an exception
  message or a URL is still masked.

:func:`redact` applies the same masking to any text; error messages printed outside logging
(the CLI's ``imagesync: error: …``) go through it.

The standard ``logging`` module (keystoneauth, glanceclient, urllib3, openstacksdk) is routed
through the same formatter by :func:`setup_logging`, at WARNING level, so library output is also
masked and in the same format. Until :func:`setup_logging` is called, structlog is given a safe
default (masked, WARNING and above, to stderr) so that nothing unmasked reaches stdout.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Hashable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any, TextIO

import structlog

#: the loggers of the libraries imagesync drives; kept at WARNING even when imagesync debugs,
#: because their debug output carries request bodies and headers
LIBRARY_LOGGERS = (
    "keystoneauth",
    "keystoneauth1",
    "glanceclient",
    "openstack",
    "urllib3",
    "requests",
    "stevedore",
    "apscheduler",
)

LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
FORMATS = ("auto", "json", "console")

from imagesync.secrets import (  # noqa: E402 - re-exported: logs is where callers look
    MASK,
    _masked_secret,
    forget_secrets,
    is_secret_key,
    mask,
    redact,
    register_secret,
)

__all__ = [
    "MASK",
    "OncePerState",
    "captured_library_logs",
    "forget_secrets",
    "get_logger",
    "is_secret_key",
    "mask",
    "mask_secrets",
    "redact",
    "register_secret",
    "setup_logging",
]


def mask_secrets(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask secret-named keys and registered secret values in every entry."""
    for key in list(event_dict):
        value = event_dict[key]
        if key == "exc_info":
            continue  # rendered to text by format_exc_info before this processor runs
        event_dict[key] = _masked_secret(value) if is_secret_key(key) else mask(value)
    return event_dict


_FIRST_KEYS = ("timestamp", "level", "event", "logger")
_json = structlog.processors.JSONRenderer()


def _json_renderer(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
    # timestamp, level, event first: what a reader of the raw lines looks for
    ordered = {k: event_dict[k] for k in _FIRST_KEYS if k in event_dict}
    ordered.update((k, v) for k, v in event_dict.items() if k not in ordered)
    return str(_json(logger, method_name, ordered))


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


_handler: logging.Handler | None = None


def setup_logging(
    fmt: str = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    *,
    terminal_level: str | None = None,
) -> None:
    """Configure structlog and the standard ``logging`` module; safe to call more than once.

    ``fmt``: ``json`` (one JSON object a line: timestamp, level, logger, event, …), ``console``
    (human text), or ``auto`` (console on a terminal, JSON otherwise). ``stream`` defaults to
    stderr. Library loggers stay at WARNING (or ``level``, if higher).

    ``terminal_level``: when ``stream`` is a terminal, log at least this level. A person
    running ``push`` reads its progress bar and summary; info events around them (``copy.done``
    and its nine keys) only repeat the summary. The CLI passes ``warning`` unless ``-v``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of: {', '.join(FORMATS)}")
    lvl = _level(level)
    out = stream if stream is not None else sys.stderr
    if terminal_level is not None and _isatty(out):
        lvl = max(lvl, _level(terminal_level))
    use_json = fmt == "json" or (fmt == "auto" and not _isatty(out))

    pre_chain: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = logging.StreamHandler(out)
    handler.setFormatter(_formatter(pre_chain, use_json=use_json, colors=_isatty(out)))
    _install(handler, lvl)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *pre_chain,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def _formatter(
    pre_chain: list[Any], *, use_json: bool, colors: bool
) -> structlog.stdlib.ProcessorFormatter:
    """The one formatter of both structlog's events and the standard library's records."""
    renderer: Any
    if use_json:
        renderer = _json_renderer
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=structlog.dev.plain_traceback
        )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Tracebacks become text here so that mask_secrets sees them (never rich's
            # show_locals, which would print local variables such as passwords).
            structlog.processors.format_exc_info,
            mask_secrets,
            renderer,
        ],
    )


def _install(handler: logging.Handler, lvl: int) -> None:
    """``handler`` replaces the one an earlier call installed on the root logger."""
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(lvl)
    _handler = handler
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, lvl))
    logging.captureWarnings(True)


def _level(name: str) -> int:
    try:
        return LEVELS[name.lower()]
    except KeyError:
        raise ValueError(f"log level {name!r}: use one of: {', '.join(LEVELS)}") from None


class OncePerState:
    """Say which events are worth logging again: one per key until its state changes.

    The daemon meets the same facts every pass (an old version kept because imagesync did not
    make it, a retirement the site cannot carry out); logging each on every pass buries what
    changed. ``changed(key, state)`` is true the first time a key is seen and whenever its state
    differs from the last one; :meth:`keep_only` forgets keys no longer seen, so a fact that
    goes away and comes back is logged again. Callers log the repeats at debug level (``-v``).
    Not thread-safe: one caller, one thread (the executor reports after its copies).
    """

    def __init__(self) -> None:
        self._last: dict[Hashable, Hashable] = {}

    def changed(self, key: Hashable, state: Hashable) -> bool:
        if key in self._last and self._last[key] == state:
            return False
        self._last[key] = state
        return True

    def keep_only(self, keys: Iterable[Hashable]) -> None:
        keep = set(keys)
        for key in [k for k in self._last if k not in keep]:
            del self._last[key]


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger named ``name`` (use the module's ``__name__``)."""
    return structlog.stdlib.get_logger(name)


@contextlib.contextmanager
def captured_library_logs(
    names: tuple[str, ...] = LIBRARY_LOGGERS,
) -> Iterator[list[logging.LogRecord]]:
    """Keep library log records out of the output for a while; yield the list they go to.

    Used around calls whose failures imagesync reports itself (openstacksdk's config loader,
    the connection check), so that the same failure is not also printed by the library.
    """
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = _Keep()
    saved: list[tuple[logging.Logger, bool]] = []
    for name in names:
        lg = logging.getLogger(name)
        saved.append((lg, lg.propagate))
        lg.addHandler(keep)
        lg.propagate = False
    try:
        yield records
    finally:
        for lg, propagate in saved:
            lg.removeHandler(keep)
            lg.propagate = propagate


def _configure_default() -> None:
    # Until setup_logging runs: masked, WARNING and above, to stderr (never stdout, where
    # commands like `check --json` print their answers).
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            mask_secrets,
            structlog.dev.ConsoleRenderer(
                colors=False, exception_formatter=structlog.dev.plain_traceback
            ),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def reset_logging() -> None:
    """Undo setup_logging: back to the quiet, masked stderr default (between tests)."""
    global _handler
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
        _handler = None
    structlog.reset_defaults()
    _configure_default()


def _stderr_logger(*args: Any) -> structlog.PrintLogger:
    # sys.stderr looked up on each use: it may have been replaced since import (tests, daemons)
    return structlog.PrintLogger(sys.stderr)


if not structlog.is_configured():
    _configure_default()
