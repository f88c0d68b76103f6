"""What an HTTP answer's status means in imagesync's error hierarchy, for every site that
speaks HTTP (Glance through keystoneauth and glanceclient, VOSpace through requests): one
table, so that a 409 or a 503 means the same whichever site answered it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from imagesync.errors import AuthError, Conflict, NotFound, SiteError, TransientError


def retry_after(response: Any) -> float | None:
    """A response's ``Retry-After`` in seconds (a number or an HTTP date), or None: also for
    a missing response (keystoneauth's errors may carry none)."""
    try:
        value = response.headers.get("Retry-After")
    except AttributeError:
        return None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        pass
    try:  # an HTTP date
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def status_error(
    status: int, site: str, what: str, *, refused: str, detail: str = "", response: Any = None
) -> SiteError | None:
    """The error HTTP ``status`` means, or None where it means no more than a SiteError (the
    caller words that one). ``refused``: what to check on a 401/403; ``detail``: the service's
    own words, ``": …"`` or empty; ``response``: where a 5xx's ``Retry-After`` is read."""
    if status in (401, 403):
        return AuthError(f"{what}: refused ({status}): {refused}{detail}", site=site)
    if status == 404:
        return NotFound(f"{what}: not found{detail}", site=site)
    if status == 409:
        return Conflict(f"{what}: conflict (409){detail}", site=site)
    if status == 412:
        # the service found the bytes it received did not match the digest: nothing stored,
        # worth sending again
        return TransientError(f"{what}: the service rejected the data's digest (412)", site=site)
    if status == 413:
        return SiteError(f"{what}: too large for the site's quota (413)", site=site)
    if status >= 500 or status in (408, 429):
        return TransientError(
            f"{what}: server error {status}{detail}", site=site, retry_after=retry_after(response)
        )
    return None
