"""Can imagesync reach every site? ``imagesync config check --connect``.

Builds every configured site as a pass would (``open_site``) and calls its
``check_connection``: a cloud authenticates, finds its Glance endpoint and lists one image; a
directory store is checked to exist and be writable. Each site explains its own failure in one
secret-free sentence (``SiteError``); this module only runs the checks side by side and reports.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

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
        return name, True, site.check_connection()
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
