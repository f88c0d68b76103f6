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
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, TextIO
from urllib.parse import quote

import structlog

MASK = "********"

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

# Shorter values would mask ordinary words all over the output; such values are still masked
# wherever they appear under a secret-named key.
_MIN_SECRET_LENGTH = 4
_secrets: set[str] = set()
_secrets_sorted: tuple[str, ...] = ()
_secrets_lock = threading.Lock()

_SECRET_KEY_WORDS = ("password", "passwd", "passphrase", "secret", "token", "authorization",
                     "cookie")
_SECRET_KEY_NAMES = frozenset({"api_key", "apikey", "private_key", "access_key", "secret_key",
                               "x_auth_key", "auth_key", "pw", "pwd"})

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # HTTP headers, as keystoneauth and requests print them
    (re.compile(r"(?i)(x-(?:auth|subject|service)-token['\"]?\s*[:=]\s*['\"]?)[^\s'\",]+"),
     r"\g<1>" + MASK),
    (re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?(?:bearer|basic|token)\s+)[^\s'\",}]+"),
     r"\g<1>" + MASK),
    # JSON bodies: "password": "…", "secret": "…", "id"s are left alone
    (re.compile(r"(?i)(\"[a-z_]*(?:password|secret|token)\"\s*:\s*\")(?:[^\"\\]|\\.)*(\")"),
     r"\g<1>" + MASK + r"\g<2>"),
    # key=value in query strings and repr()s
    (re.compile(r"(?i)\b([a-z_]*(?:password|secret|token)=['\"]?)(?!\*{8})[^\s&'\",)]+"),
     r"\g<1>" + MASK),
    # credentials in URLs
    (re.compile(r"(://[^/\s:@]+:)[^/\s@]+(@)"), r"\g<1>" + MASK + r"\g<2>"),
)


def is_secret_key(key: object) -> bool:
    """Whether a mapping key or header name names a credential (its value must never be shown).

    ``application_credential_id`` and ``…_name`` are not secret; ``…_secret`` is.
    """
    if not isinstance(key, str):
        return False
    k = key.lower().replace("-", "_")
    return k in _SECRET_KEY_NAMES or any(word in k for word in _SECRET_KEY_WORDS)


def register_secret(value: object) -> None:
    """Remember a secret value so that it is masked wherever it appears in logs and errors.

    Also registers its URL- and JSON-escaped forms. Empty and very short values are ignored
    (they would mask ordinary text); keys named like secrets are masked whatever their value.
    """
    if not isinstance(value, str) or len(value) < _MIN_SECRET_LENGTH:
        return
    forms = {value, quote(value, safe=""), json.dumps(value)[1:-1]}
    global _secrets_sorted
    with _secrets_lock:
        if forms <= _secrets:
            return
        _secrets.update(forms)
        _secrets_sorted = tuple(sorted(_secrets, key=len, reverse=True))


def forget_secrets() -> None:
    """Forget every registered secret (for tests)."""
    global _secrets_sorted
    with _secrets_lock:
        _secrets.clear()
        _secrets_sorted = ()


def redact(text: str) -> str:
    """``text`` with every registered secret and every recognisable credential masked."""
    for secret in _secrets_sorted:
        if secret in text:
            text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def mask(value: Any) -> Any:
    """A copy of ``value`` (mappings, sequences, scalars) with secrets masked.

    Values under secret-named keys become ``********``; strings are redacted; numbers, booleans
    and None pass through; other objects become their redacted ``str``.
    """
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {k: (_masked_secret(v) if is_secret_key(k) else mask(v)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [mask(v) for v in value]
    return redact(str(value))


def _masked_secret(value: Any) -> Any:
    # An absent secret stays visibly absent: "password: null" tells the reader something.
    return value if value is None or value == "" else MASK


def mask_secrets(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
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


def setup_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog and the standard ``logging`` module; safe to call more than once.

    ``fmt``: ``json`` (one JSON object a line: timestamp, level, logger, event, …), ``console``
    (human text), or ``auto`` (console on a terminal, JSON otherwise). ``stream`` defaults to
    stderr. Library loggers stay at WARNING (or ``level``, if higher).
    """
    global _handler
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of: {', '.join(FORMATS)}")
    try:
        lvl = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"log level {level!r}: use one of: {', '.join(LEVELS)}") from None
    out = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not _isatty(out))

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    pre_chain: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        timestamper,
    ]
    renderer: Any
    if use_json:
        renderer = _json_renderer
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=_isatty(out), exception_formatter=structlog.dev.plain_traceback)
    formatter = structlog.stdlib.ProcessorFormatter(
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
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(lvl)
    _handler = handler
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, lvl))
    logging.captureWarnings(True)

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


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger named ``name`` (use the module's ``__name__``)."""
    return structlog.stdlib.get_logger(name)


@contextlib.contextmanager
def captured_library_logs(names: tuple[str, ...] = LIBRARY_LOGGERS
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
            structlog.dev.ConsoleRenderer(colors=False,
                                          exception_formatter=structlog.dev.plain_traceback),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def _stderr_logger(*args: Any) -> structlog.PrintLogger:
    # sys.stderr looked up on each use: it may have been replaced since import (tests, daemons)
    return structlog.PrintLogger(sys.stderr)


if not structlog.is_configured():
    _configure_default()
