"""The exception hierarchy of imagesync, and what each error asks the caller to do.

    ImageSyncError                 base; str(e) is a message fit for a human, never a secret
    ├── ConfigError                the configuration is wrong: fix it as the message says (exit 2)
    │   └── StateDirError          state_dir cannot be used by this user (permissions): the
    │                              message names the path, its owner and the fix (exit 2)
    ├── UsageError                 the command line is wrong (exit 2)
    ├── LabError                   the local lab could not be started or is not installed
    ├── SiteError                  a site (cloud or store) failed; carries the site name
    │   ├── TransientError         worth retrying: connection reset, timeout, 5xx, 503 Retry-After
    │   ├── AuthError              credentials refused: fix the credentials, retrying will not help
    │   ├── NotFound               the image or node is not there
    │   └── Conflict               the site refused because of its state (e.g. image not queued)
    ├── IntegrityError             bytes did not match their hashes; the bad copy was removed
    ├── LockBusy                   another imagesync holds the lock for this image and site
    │   └── LockDenied             the lock file cannot be opened (made by another user, e.g.
    │                              a push run as root): fix its owner; only that image and
    │                              site wait, like a busy lock, but it counts as a failure
    └── Cancelled                  cancelled (shutdown); what it had started was removed

Sites map their client library's exceptions to these at the boundary (``sites/*``); the engine
only looks at these classes. One shared retry policy (``retry.py``) decides what to retry.
"""

from __future__ import annotations


class ImageSyncError(Exception):
    """Base class of every error imagesync raises on purpose."""


class ConfigError(ImageSyncError):
    """The configuration is invalid. The message names the file, the key path and the fix."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        parts = []
        if file:
            parts.append(str(file))
        if key:
            parts.append(key)
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class StateDirError(ConfigError):
    """``state_dir`` (or its database) cannot be read or written by the user running
    imagesync: a deployment mistake, fixed by running as the service user or by ``chown``."""

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        super().__init__(message)


class UsageError(ImageSyncError):
    """The command line is invalid."""


class LabError(ImageSyncError):
    """The local lab (real Keystone and Glance on loopback) could not be run."""


class SiteError(ImageSyncError):
    """A site failed. ``site`` names it."""

    def __init__(self, message: str, *, site: str = "") -> None:
        self.site = site
        super().__init__(f"{site}: {message}" if site else message)


class TransientError(SiteError):
    """A failure worth retrying (network, timeout, 5xx). ``retry_after`` is the server's hint."""

    def __init__(self, message: str, *, site: str = "", retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message, site=site)


class AuthError(SiteError):
    """Credentials were refused or are missing."""


class NotFound(SiteError):
    """The image, node or server does not exist."""


class Conflict(SiteError):
    """The site refused the request because of the object's state."""


class IntegrityError(ImageSyncError):
    """Bytes did not match their expected hash; what was made was removed."""


class LockBusy(ImageSyncError):
    """Another imagesync process holds the lock for this image and site."""


class LockDenied(LockBusy):
    """The lock file for an image and site cannot be opened (permissions, a read-only or full
    state directory). A kind of LockBusy so that every handler of "cannot take the lock now"
    keeps the rest of the work going; the message names the path and the fix."""

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        super().__init__(message)


class Cancelled(ImageSyncError):
    """The work was cancelled (the daemon is stopping); every upload it had started was removed."""
