"""Pre-authorized data URLs of the lab VOSpace service, in CADC's token-in-path style.

CADC's services answer a ``pullFromVoSpace`` negotiation with endpoints whose path carries a
grant (``{base}/…/preauth:TOKEN/{path}``), so that whoever holds the URL (a batch job, another
service) may read that one file without the caller's token or certificate. The lab does the
same for its data endpoints: ``{base}/data/preauth:TOKEN/{path}`` (and ``/files/…``), for GET
and HEAD only. The token is ``EXPIRES.MAC``: an HMAC-SHA256 of the expiry and the node's path
under a key the service keeps in its directory (0600, made on first use, shared by every
uwsgi worker), so a grant can neither be moved to another node nor outlive its expiry.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

PREFIX = "preauth:"
KEY_FILE = "preauth.key"
#: how long a grant lasts: a target fetches at once, a resumed read is re-negotiated
TTL = 3600


def _key(directory: Path) -> bytes:
    path = directory / KEY_FILE
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    for _ in range(50):  # another worker may be writing it this instant
        key = path.read_text().strip()
        if key:
            return key.encode()
        time.sleep(0.01)
    raise RuntimeError(f"{path} is empty: delete it")


def _mac(directory: Path, expires: int, path: str) -> str:
    msg = f"{expires}\n{path}".encode()
    return hmac.new(_key(directory), msg, hashlib.sha256).hexdigest()


def issue(directory: Path, path: str, now: float | None = None, ttl: int = TTL) -> str:
    """The path segment granting reads of node ``path`` until ``now + ttl``."""
    expires = int((time.time() if now is None else now) + ttl)
    return f"{PREFIX}{expires}.{_mac(directory, expires, path)}"


def valid(directory: Path, segment: str, path: str, now: float | None = None) -> bool:
    """Whether ``segment`` (``preauth:EXPIRES.MAC``) grants reading node ``path`` now."""
    expires_text, _, mac = segment.removeprefix(PREFIX).partition(".")
    if not expires_text.isdigit() or not mac:
        return False
    expires = int(expires_text)
    if expires < (time.time() if now is None else now):
        return False
    return hmac.compare_digest(mac, _mac(directory, expires, path))
