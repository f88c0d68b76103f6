"""Can imagesync reach every site? ``imagesync config check --connect``.

Builds every configured site as a pass would (``open_site``) and calls its
``check_connection``: a cloud authenticates, finds its Glance endpoint and lists one image; a
directory store is checked to exist and be writable. Each site explains its own failure in one
secret-free sentence (``SiteError``); this module only runs the checks side by side and reports.

It also checks what the current user must be able to write on this host (``check_local``):
``state_dir`` (its database and lock files), and in each directory store the per-name
folders, which a ``push`` run as root leaves root-owned. The service user meets those as
permission errors only later, in a pass.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from imagesync.config.types import Config
from imagesync.errors import ImageSyncError, SiteError
from imagesync.logs import captured_library_logs, redact
from imagesync.sites import open_site


def _sentence(exc: BaseException) -> str:
    """The error's message without the "<site>: " prefix (the report names the site)."""
    text = str(exc)
    if isinstance(exc, SiteError) and exc.site:
        text = text.removeprefix(f"{exc.site}: ")
    return text


def _check(config: Config, name: str) -> tuple[str, bool, str]:
    try:
        site = open_site(config, name)
    except ImageSyncError as exc:  # credentials that cannot even load, a kind not built
        return name, False, _sentence(exc)
    try:
        detail = site.check_connection()
        store = config.stores.get(name)
        if store is not None and store.type == "directory" and store.path is not None:
            problem = _unwritable_inside(Path(store.path))
            if problem is not None:
                return name, False, problem
        return name, True, detail
    except ImageSyncError as exc:
        return name, False, _sentence(exc)
    except Exception as exc:  # a bug in a site's check must not hide the other sites' answers
        return name, False, f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
    finally:
        site.close()


def check_connections(config: Config) -> list[tuple[str, bool, str]]:
    """(site, ok, detail) for every cloud and store, in config order (clouds first), checked
    side by side. Details never contain a secret."""
    names = [*config.clouds, *config.stores]
    if not names:
        return []
    with warnings.catch_warnings(), captured_library_logs():
        warnings.simplefilter("ignore")
        with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
            results = list(pool.map(lambda n: _check(config, n), names))
    return [(name, ok, redact(detail)) for name, ok, detail in results]


def _me() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _owner_name(path: Path) -> str:
    import pwd

    try:
        uid = path.stat().st_uid
        return pwd.getpwuid(uid).pw_name
    except (OSError, KeyError):
        return "another user"


def _unwritable_inside(root: Path, *, files: bool = False) -> str | None:
    """The first folder (one level down) or file under ``root`` the current user cannot use,
    as a sentence with the fix; None when all can be. Files need only be readable (a lock
    file read-only still locks; a store's images are replaced by rename, not rewritten)."""
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        return f"{root}: cannot list it: {exc.strerror or exc}"
    bad: list[Path] = []
    for entry in entries:
        try:
            if entry.is_dir():
                if not os.access(entry, os.R_OK | os.W_OK | os.X_OK):
                    bad.append(entry)
            elif files and not os.access(entry, os.R_OK):
                bad.append(entry)
        except OSError:
            bad.append(entry)
    if not bad:
        return None
    me, owner = _me(), _owner_name(bad[0])
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return (
        f"{bad[0]}{more} is not writable by {me} (owner {owner}; a command run as another "
        f"user made it?): chown -R to the service user, and run commands as that user "
        f"(sudo -u <service user> imagesync …)"
    )


def check_state_dir(state_dir: Path) -> tuple[bool, str]:
    """Can the current user use ``state_dir`` (create it, write its database and take its
    locks)? (ok, detail). Changes nothing."""
    me = _me()
    path = Path(state_dir)
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), Path("/"))
        if os.access(parent, os.W_OK | os.X_OK):
            return True, f"{path} will be created by {me}"
        return False, (
            f"{path} does not exist and {me} cannot create it in {parent}: create it for the "
            f"service user (install -d -m 0750 -o imagesync {path})"
        )
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        owner = _owner_name(path)
        return False, (
            f"{path} is not writable by {me} (owner {owner}): run imagesync as {owner} "
            f"(sudo -u {owner} imagesync …) or chown -R {me}: {path}"
        )
    db = path / "imagesync.sqlite"
    if db.exists() and not os.access(db, os.R_OK | os.W_OK):
        return False, (
            f"{db} is not writable by {me} (owner {_owner_name(db)}): chown it to the service "
            "user and run commands as that user"
        )
    locks = path / "locks"
    if locks.exists():
        if not os.access(locks, os.R_OK | os.W_OK | os.X_OK):
            owner = _owner_name(locks)
            return False, (
                f"{locks} is not writable by {me} (owner {owner}; a command run as another "
                f"user made it?): chown -R {me}: {path}, and run commands as {me}"
            )
        problem = _unwritable_inside(locks, files=True)
        if problem is not None:
            return False, problem
    return True, f"writable by {me}: {path}"
