"""Secrets: recognise credential keys, remember secret values, and mask them in any text.

Kept apart from :mod:`imagesync.logs` (and free of heavy imports) because configuration
loading registers every secret it reads, and ``imagesync check`` must start fast.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

MASK = "********"

# Shorter values would mask ordinary words all over the output; such values are still masked
# wherever they appear under a secret-named key.
_MIN_SECRET_LENGTH = 4
_secrets: set[str] = set()
_secrets_sorted: tuple[str, ...] = ()
_secrets_lock = threading.Lock()

# A key is secret when its name contains one of these words ...
_SECRET_KEY_WORDS = (
    "password",
    "passwd",
    "passphrase",
    "passcode",  # keystoneauth's TOTP plugin
    "secret",
    "token",
    "authorization",
    "cookie",
    "privatekey",
    "private_key",
)
# ... or is one of these names ...
_SECRET_KEY_NAMES = frozenset({"pw", "pwd", "pin", "otp", "totp", "apikey", "x_auth_key"})
# ... or ends in credential(s), or names key material (``application_credential_id`` and a
# plain ``key``, as in our own log events, are not secret).
_SECRET_KEY_SHAPES = re.compile(
    r"(?:^|_)credentials?$"
    r"|(?:^|_)(?:api|access|secret|private|auth|session|ssh|signing|encryption|fernet|master"
    r"|shared|client|cert|tls|ssl)_?key$"
)

# One quoted string: "…" or '…' with backslash escapes, as JSON and Python's repr() write them.
_QUOTED = r"""[bu]?(?:"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')"""
# A quoted key and its value, as in a JSON body or a repr()'d dict inside a library's message:
# {'password': 'x'}, "passcode": 123456. A nested mapping or list is left to the inner keys.
_QUOTED_KEY_VALUE = re.compile(
    r"""(?P<head>(?P<q>['"])(?P<key>[A-Za-z0-9_.-]{1,64})(?P=q)\s*:\s*)"""
    rf"""(?P<value>{_QUOTED}|[^\s,}}\]{{\[][^\s,}}\]]*)"""
)
# key=value, as in a query string or a repr()'d object: token=abc, Creds(password='p w d').
_KEY_EQUALS_VALUE = re.compile(
    r"(?P<head>\b(?P<key>[A-Za-z0-9_-]{1,64})=)"
    rf"""(?P<value>{_QUOTED}|[^\s&'",)}}\]]+)"""
)
_ABSENT = frozenset({"None", "null", "''", '""'})

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # HTTP headers, as keystoneauth and requests print them
    (
        re.compile(r"(?i)(x-(?:auth|subject|service)-token['\"]?\s*[:=]\s*['\"]?)[^\s'\",]+"),
        r"\g<1>" + MASK,
    ),
    (
        re.compile(
            r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?(?:bearer|basic|token)\s+)[^\s'\",}]+"
        ),
        r"\g<1>" + MASK,
    ),
    # Credentials in URLs: the userinfo runs to the LAST '@' before the path, so a password
    # holding an unescaped '@' (https://user:p@ss@host/) is masked whole; so is a user name
    # holding one (https://alice@example.org:pw@host/).
    (re.compile(r"""(://[^/\s:'"]+:)[^/?#\s'"]*(@)"""), r"\g<1>" + MASK + r"\g<2>"),
    # A grant in a URL's path, as CADC's pre-authorized endpoints carry one (…/preauth:TOKEN/…):
    # anyone holding it may read the file (sites/vospace_share.py)
    (re.compile(r"""(preauth:)[^/?#\s'"…]+"""), r"\g<1>" + MASK),
)


def _mask_value(match: re.Match[str]) -> str:
    value = match["value"]
    if not is_secret_key(match["key"]) or value in _ABSENT:
        return match[0]
    if value[:1] in "bu" and value[1:2] in "'\"":  # bytes or unicode literal: keep the prefix
        return match["head"] + value[:2] + MASK + value[-1]
    if value[:1] in "'\"":  # keep the quotes, so the text stays valid JSON or repr
        return match["head"] + value[0] + MASK + value[-1]
    return match["head"] + MASK


def is_secret_key(key: object) -> bool:
    """Whether a mapping key or header name names a credential (its value must never be shown).

    ``application_credential_id`` and ``…_name`` are not secret; ``…_secret`` is.
    """
    if not isinstance(key, str):
        return False
    k = key.lower().replace("-", "_")
    return (
        k in _SECRET_KEY_NAMES
        or any(word in k for word in _SECRET_KEY_WORDS)
        or _SECRET_KEY_SHAPES.search(k) is not None
    )


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
    text = _QUOTED_KEY_VALUE.sub(_mask_value, text)
    return _KEY_EQUALS_VALUE.sub(_mask_value, text)


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
