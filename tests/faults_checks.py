"""What the fault suite (``tests/faults.py``) holds true after every round, and how it looks.

The suite's eyes are independent of imagesync: Glance is read with the lab's admin client
(hidden and unfinished images included), the directory store by its files, the state database
by SQL, and what reached Glance through the fault proxies from their audit. The invariants:

1. **Every visible image verifies**: its bytes hash (sha512) to what the site says it stores,
   to imagesync's ``imagesync.sha512`` mark when it has one, and to one of the versions the
   suite uploaded (a flipped byte published anywhere breaks this).
2. **Nothing half-made survives a restart**: after a fresh ``imagesync sync`` with every other
   process dead (all leases expired as far as locks go), no image is marked uploading or
   unfinished, no store upload file is left, the state database holds no lease.
3. **No published copy is deleted while it is newest**: copies of each name's newest version
   seen on a site (and every original a person uploaded) still exist, published and visible;
   on Glance (no Nova in the lab, so ``retire: delete`` hides) no image is ever deleted after
   its publish succeeded, newest or not.
4. **Every site converges**: ``imagesync status --json`` shows each name's newest version as
   the one last uploaded, and every required cell ``current``.
5. **Retention keeps up** (once, after the run's final clean sync): no copy imagesync made is
   left visible beyond the rule's ``keep`` newest versions (a copy whose making was not
   recorded, say, is never retired).

Glance image data cannot change once the image is active, so each Glance image is downloaded
and hashed once; the directory store's files are hashed every round.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from imagesync.lab import LabInfo, glance_client
from imagesync.model import PROP_ORIGIN, PROP_SHA512, PROP_STATE, STATE_UPLOADING

STORE = "archive"  # the directory store's site name in the suite's configuration
T = TypeVar("T")


def patiently(call: Callable[[], T], tries: int = 6) -> T:
    """``call()``, again after a 5xx or a connection error: the lab's Glance answers 500 when
    its sqlite is locked under load, and the suite's own eyes must not fail the run for it."""
    from glanceclient import exc as gexc
    from keystoneauth1 import exceptions as kexc

    for attempt in range(tries):
        try:
            return call()
        except (gexc.HTTPInternalServerError, gexc.HTTPServiceUnavailable, kexc.ConnectFailure):
            if attempt == tries - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Seen:
    """One image on one site, as the suite sees it."""

    site: str
    id: str
    name: str
    status: str  # Glance's status; the store: "active" (published) or "upload"
    hidden: bool
    uploading: bool  # marked imagesync.state=uploading, or a store upload
    sha512: str | None  # what the site says it stores
    claimed: str | None  # imagesync.sha512
    origin: str | None  # imagesync.origin: a copy imagesync made (None: an original)
    size: int | None

    @property
    def published(self) -> bool:
        return self.status == "active" and not self.uploading

    @property
    def visible(self) -> bool:
        return self.published and not self.hidden


@dataclass
class Survey:
    """Every image of the suite's names on every site, and the store's stray files."""

    images: dict[str, list[Seen]] = field(default_factory=dict)  # site -> images
    store_leftovers: list[str] = field(default_factory=list)  # upload/temp files, relative
    store_quarantined: list[str] = field(default_factory=list)

    def find(self, site: str, image_id: str) -> Seen | None:
        for s in self.images.get(site, []):
            if s.id == image_id:
                return s
        return None


class Eyes:
    """Reads the lab's clouds (admin) and the store; one Glance client per cloud and thread."""

    def __init__(self, lab: LabInfo, store_root: Path, names: Iterable[str]) -> None:
        self.lab = lab
        self.store_root = store_root
        self.names = tuple(names)
        self._local = threading.local()

    def client(self, cloud: str) -> Any:
        clients: dict[str, Any] = self._local.__dict__.setdefault("clients", {})
        if cloud not in clients:
            clients[cloud] = glance_client(self.lab, cloud, admin=True)
        return clients[cloud]

    # -- Glance ------------------------------------------------------------------------------
    def glance_image(self, cloud: str, image_id: str) -> Seen | None:
        """One image by id (None: gone)."""
        from glanceclient import exc as gexc

        try:
            raw = patiently(lambda: dict(self.client(cloud).images.get(image_id)))
        except gexc.HTTPNotFound:
            return None
        return _glance_seen(cloud, raw)

    def glance_images(self, cloud: str) -> list[Seen]:
        out: list[Seen] = []
        gc = self.client(cloud)
        for name in self.names:
            for hidden in ("false", "true"):
                filters = {"name": name, "visibility": "all", "os_hidden": hidden}

                def listing(f: dict[str, str] = filters) -> list[dict[str, Any]]:
                    return [dict(i) for i in gc.images.list(filters=f)]

                out.extend(_glance_seen(cloud, i) for i in patiently(listing))
        return out

    def glance_sha512(self, cloud: str, image_id: str) -> tuple[str, int]:
        """Download and hash (sha512, bytes)."""

        def read() -> tuple[str, int]:
            h = hashlib.sha512()
            n = 0
            for chunk in self.client(cloud).images.data(image_id):
                h.update(chunk)
                n += len(chunk)
            return h.hexdigest(), n

        return patiently(read)

    # -- the directory store -----------------------------------------------------------------
    def store_published(self, name: str, image_id: str) -> bool:
        folder = self.store_root / name
        return (folder / f"{image_id}.json").exists() and (folder / f"{image_id}.img").exists()

    def store_flowing(self, name: str, image_id: str) -> bool:
        """Has data reached the store's upload of ``image_id`` (or is it finished)?"""
        folder = self.store_root / name
        try:
            return (folder / f".{image_id}.img.partial").stat().st_size > 0
        except FileNotFoundError:
            return (folder / f"{image_id}.img").exists()

    def store_images(self, survey: Survey) -> list[Seen]:
        out: list[Seen] = []
        for name in self.names:
            folder = self.store_root / name
            try:
                files = sorted(p.name for p in folder.iterdir())
            except FileNotFoundError:
                continue
            for f in files:
                rel = f"{name}/{f}"
                if ".bad-" in f:
                    survey.store_quarantined.append(rel)
                elif f.startswith(".") or f.endswith(".tmp"):
                    survey.store_leftovers.append(rel)
                    if f.endswith(".json") and not (folder / f[1:]).exists():
                        out.append(_store_seen(folder / f, upload=True))
                elif f.endswith(".json"):
                    if (folder / (f[: -len(".json")] + ".img")).exists():
                        out.append(_store_seen(folder / f, upload=False))
                    else:
                        survey.store_leftovers.append(rel + " (metadata without data)")
                elif f.endswith(".img") and not (folder / (f[: -len(".img")] + ".json")).exists():
                    survey.store_leftovers.append(rel + " (data without metadata)")
        return out

    def survey(self) -> Survey:
        s = Survey()
        for c in self.lab.names:
            s.images[c] = self.glance_images(c)
        s.images[STORE] = self.store_images(s)
        return s


def _glance_seen(cloud: str, raw: Mapping[str, Any]) -> Seen:
    algo = raw.get("os_hash_algo")
    return Seen(
        site=cloud,
        id=str(raw["id"]),
        name=str(raw.get("name")),
        status=str(raw.get("status")),
        hidden=bool(raw.get("os_hidden")),
        uploading=raw.get(PROP_STATE) == STATE_UPLOADING,
        sha512=raw.get("os_hash_value") if algo == "sha512" else None,
        claimed=raw.get(PROP_SHA512),
        origin=raw.get(PROP_ORIGIN),
        size=raw.get("size"),
    )


def _store_seen(meta_path: Path, *, upload: bool) -> Seen:
    try:
        meta = json.loads(meta_path.read_bytes())
    except (OSError, ValueError):
        meta = {}
    props = meta.get("properties") or {}
    image_id = meta_path.name.lstrip(".")[: -len(".json")]
    return Seen(
        site=STORE,
        id=image_id,
        name=meta_path.parent.name,
        status="upload" if upload else str(meta.get("status") or "active"),
        hidden=upload or bool(meta.get("hidden")),
        uploading=upload or props.get(PROP_STATE) == STATE_UPLOADING,
        sha512=(meta.get("hashes") or {}).get("sha512"),
        claimed=props.get(PROP_SHA512),
        origin=props.get(PROP_ORIGIN),
        size=meta.get("size"),
    )


def leases(state_db: Path) -> list[tuple[str, str, str, int]]:
    """(site, image_id, name, pid) of every lease in the state database."""
    if not state_db.exists():
        return []
    db = sqlite3.connect(state_db, timeout=5)
    try:
        return [
            (str(a), str(b), str(c), int(d))
            for a, b, c, d in db.execute("SELECT site, image_id, name, pid FROM leases")
        ]
    except sqlite3.OperationalError:
        return []  # no table yet
    finally:
        db.close()


def sha_of_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha512()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


@dataclass
class Verifier:
    """Invariant 1: every visible image's bytes are what its site and imagesync claim, and one
    of the versions uploaded."""

    eyes: Eyes
    known: set[str] = field(default_factory=set)  # sha512 of every version uploaded
    glance_done: dict[tuple[str, str], str] = field(default_factory=dict)  # (site, id) -> sha
    checked: int = 0  # visible images checked against their sha512, over all rounds
    downloads: int = 0  # of which read and hashed (Glance images once each)

    def verify(self, survey: Survey) -> list[str]:
        problems: list[str] = []
        for site, images in survey.images.items():
            for img in images:
                if not img.visible:
                    continue
                if site == STORE:
                    path = self.eyes.store_root / img.name / f"{img.id}.img"
                    try:
                        actual, size = sha_of_file(path)
                    except FileNotFoundError:
                        continue  # retired since the survey
                    self.downloads += 1
                else:
                    key = (site, img.id)
                    if key not in self.glance_done:
                        actual, size = self.eyes.glance_sha512(site, img.id)
                        self.glance_done[key] = actual
                        self.downloads += 1
                        if img.size is not None and size != img.size:
                            problems.append(f"{site}:{img.id} holds {size} bytes, says {img.size}")
                    actual = self.glance_done[key]
                self.checked += 1
                where = f"{site}:{img.id} ({img.name})"
                if img.sha512 is None:
                    problems.append(f"{where}: the site reports no sha512")
                elif actual != img.sha512:
                    problems.append(
                        f"{where}: bytes hash to {actual[:16]}…, site says {img.sha512[:16]}…"
                    )
                if img.claimed is not None and img.claimed != actual:
                    problems.append(
                        f"{where}: bytes hash to {actual[:16]}…, imagesync.sha512 "
                        f"says {img.claimed[:16]}…"
                    )
                if actual not in self.known:
                    problems.append(f"{where}: bytes {actual[:16]}… are no version ever uploaded")
        return problems


def zombies(survey: Survey) -> list[Seen]:
    """Images Glance itself left half-deleted: status ``deleted`` but still listed, their
    properties gone, and a new DELETE refused ("from deleted to deleted is not allowed"). The
    lab's Glance does this when its sqlite answers "database is locked" in the middle of a
    delete (under load). Nobody can remove them; they are neither imagesync's uploads nor
    versions, so they are counted, not held against imagesync."""
    return [
        img
        for site, images in survey.images.items()
        if site != STORE
        for img in images
        if img.status == "deleted" and not img.uploading
    ]


def half_made(survey: Survey, state_db: Path) -> list[str]:
    """Invariant 2 (asked after a restart with nothing else running)."""
    problems = []
    dead = {(z.site, z.id) for z in zombies(survey)}
    for site, images in survey.images.items():
        for img in images:
            if (site, img.id) in dead:
                continue
            # imagesync's: marked as its upload, or carrying its provenance (a person's upload
            # the lab's Glance failed is not imagesync's to clean)
            if site != STORE and (img.uploading or (img.origin and img.status != "active")):
                problems.append(
                    f"{site}:{img.id} ({img.name}) survived a restart: status {img.status}"
                    + (", marked uploading" if img.uploading else "")
                )
    problems.extend(f"{STORE}: {f} survived a restart" for f in survey.store_leftovers)
    problems.extend(f"{STORE}: metadata quarantined: {f}" for f in survey.store_quarantined)
    problems.extend(
        f"lease {site}:{iid} ({name}, pid {pid}) survived a restart"
        for site, iid, name, pid in leases(state_db)
    )
    return problems


@dataclass
class Guard:
    """Invariant 3: copies of the newest version, and originals, are never deleted."""

    newest: dict[str, str] = field(default_factory=dict)  # name -> sha512 of its newest
    protected: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    originals: dict[tuple[str, str], str] = field(default_factory=dict)  # (cloud, id) -> name
    lock: threading.Lock = field(default_factory=threading.Lock)

    def new_version(self, name: str, sha: str, cloud: str, image_id: str) -> None:
        with self.lock:
            self.newest[name] = sha
            self.originals[(cloud, image_id)] = name
            # the older version's copies may be retired from now on
            self.protected = {k: v for k, v in self.protected.items() if v[0] != name}

    def note(self, images: Iterable[Seen]) -> None:
        """Remember the published copies of each newest version among ``images``."""
        with self.lock:
            for img in images:
                sha = img.sha512 or img.claimed
                if img.published and sha and self.newest.get(img.name) == sha:
                    self.protected.setdefault((img.site, img.id), (img.name, sha))

    def gone(self, site: str, image_id: str) -> str | None:
        """Called when ``image_id`` vanished from ``site``: why that breaks invariant 3."""
        with self.lock:
            entry = self.protected.get((site, image_id))
            if entry is not None and self.newest.get(entry[0]) == entry[1]:
                return f"{site}:{image_id} ({entry[0]}) deleted while it was newest"
            if (site, image_id) in self.originals:
                return (
                    f"{site}:{image_id} ({self.originals[(site, image_id)]}): an original deleted"
                )
        return None

    def check(self, survey: Survey) -> list[str]:
        problems = []
        with self.lock:
            protected = dict(self.protected)
            newest = dict(self.newest)
            originals = dict(self.originals)
        for (site, iid), (name, sha) in protected.items():
            if newest.get(name) != sha:
                continue
            now = survey.find(site, iid)
            if now is None or not now.published:
                problems.append(f"{site}:{iid} ({name}) deleted while it was newest")
            elif now.hidden:
                problems.append(f"{site}:{iid} ({name}) hidden while it was newest")
        for (site, iid), name in originals.items():
            now = survey.find(site, iid)
            if now is None:
                problems.append(f"{site}:{iid} ({name}): an original was deleted")
            elif now.hidden:
                problems.append(f"{site}:{iid} ({name}): an original was hidden")
        for images in survey.images.values():
            self.note(images)
        return problems


def present(survey: Survey, newest: Mapping[str, str]) -> list[str]:
    """Invariant 4 as the suite sees it: each name's newest version visible on every site."""
    problems = []
    for name, sha in newest.items():
        for site, images in survey.images.items():
            if not any(i.visible and i.name == name and i.sha512 == sha for i in images):
                problems.append(f"{name}: the newest version ({sha[:16]}…) is not on {site}")
    return problems


def retained(survey: Survey, order: Mapping[str, list[str]], keep: int) -> list[str]:
    """After the run (everything current, retention had its pass): on every site, imagesync's
    visible copies of a name belong to the ``keep`` newest versions visible there (originals
    are never retired, so they count as versions but may be older). A copy left visible
    beyond that is one retention cannot see as its own: a leak."""
    problems = []
    for site, images in survey.images.items():
        for name, shas in order.items():
            rank = {sha: i for i, sha in enumerate(shas)}
            mine = [i for i in images if i.visible and i.name == name and i.sha512 in rank]
            present = sorted({i.sha512 for i in mine if i.sha512}, key=rank.__getitem__)
            allowed = set(present[-keep:])
            for img in mine:
                if img.origin and img.sha512 not in allowed:
                    version = rank[img.sha512 or ""] + 1
                    problems.append(
                        f"{site}:{img.id} ({name}, version {version} of {len(shas)}) still "
                        f"visible beyond keep={keep}"
                    )
    return problems


def converged(status: Mapping[str, Any], newest: Mapping[str, str]) -> list[str]:
    """Invariant 4, from ``imagesync status --json``."""
    problems = []
    by_name = {a["name"]: a for a in status.get("images", [])}
    for site, error in (status.get("unreachable") or {}).items():
        problems.append(f"{site} unreachable after the faults stopped: {error}")
    for name, sha in newest.items():
        a = by_name.get(name)
        if a is None:
            problems.append(f"{name}: not in status")
            continue
        got = (a.get("newest") or {}).get("sha512")
        if got != sha:
            problems.append(f"{name}: newest is {str(got)[:16]}…, the last upload {sha[:16]}…")
        for site, cell in a["sites"].items():
            if cell["required"] and cell["state"] != "current":
                problems.append(f"{name} on {site}: {cell['state']}")
    return problems
