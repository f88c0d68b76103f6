"""A Glance v2 cloud as a Site: a keystoneauth1 session + python-glanceclient.

Errors from keystoneauth, glanceclient and requests are classified here, at the boundary,
into imagesync's hierarchy (TransientError, AuthError, NotFound, Conflict); the engine never
sees a client library's exception. ``check_connection`` (``config check --connect``) explains a
failure to authenticate or to find Glance in one secret-free sentence saying what to fix.

The site can hide images (``os_hidden``), list the images changed since a watermark
(Glance's ``updated_at=gte:`` filter) and tell which images servers use, when the catalog has
a compute (Nova) endpoint and the credentials may list every project's servers (the
compute endpoint is looked up once, lazily; without it, or without that right, it answers
"cannot tell" and ``retire: delete`` hides instead of deleting). Its images have owners:
only those of the project imagesync authenticates as (learnt once from the session) and of
the cloud's ``trusted_owners`` count as versions (``trusted_owners``).

What goes through which client, and why (measurements: bench/README.md):
- metadata changes (create, publish, hide, delete) through python-glanceclient, imported on
  the first change only, so that ``check`` and listings do not pay its 0.4-0.7 s import;
- listing as JSON pages of up to 1000 images straight through the session (no per-image
  schema validation: an idle pass over thousands of images must be fast);
- image data through the session: downloads stream with Range support, and an upload of known
  size is sent with a Content-Length (see ``GlanceWriter``), which costs Glance under uwsgi far less
  CPU than glanceclient's always-chunked body (1 GB copy: 0.88 → 1.07 of a curl relay).

Uploads are invisible until published: the image is created with ``os_hidden=true`` and the
``imagesync.state=uploading`` mark, so a scheduler listing by name never sees a half-made image.
A keystoneauth session re-authenticates by itself when its token is about to expire (and once
on a 401), so a token expiring during a long transfer does not fail it. (An upload's body is
never sent twice: a 401 in the middle of one fails it as transient, for the engine to retry.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import requests
import structlog
from keystoneauth1 import adapter as ks_adapter
from keystoneauth1 import exceptions as ksexc
from keystoneauth1 import session as ks_session

from imagesync.config.types import CloudConfig
from imagesync.errors import AuthError, NotFound, SiteError, TransientError
from imagesync.logs import redact
from imagesync.model import (
    PROP_STATE,
    ImageRecord,
    NewImage,
    format_time,
    marked_uploading,
    parse_time,
)
from imagesync.sites.base import Capabilities, SharedURL, glance_fields
from imagesync.sites.glance_import import WebDownload
from imagesync.sites.openstack import classify, explain, make_adapter, make_session, no_endpoint
from imagesync.sites.upload import QueueBody, QueuedUpload

log = structlog.get_logger("imagesync.glance")
T = TypeVar("T")

#: Glance's own attributes: never copied as "the image's properties"
RESERVED = frozenset(
    {
        "id",
        "name",
        "status",
        "checksum",
        "os_hash_algo",
        "os_hash_value",
        "size",
        "virtual_size",
        "created_at",
        "updated_at",
        "owner",
        "visibility",
        "protected",
        "os_hidden",
        "tags",
        "file",
        "schema",
        "self",
        "locations",
        "direct_url",
        "disk_format",
        "container_format",
        "min_disk",
        "min_ram",
        "stores",
    }
)
RESERVED_PREFIXES = ("os_glance",)
#: images per listing page (Glance's default maximum), and the most pages one listing may
#: take: 10 million images, far beyond any cloud's, so more means a ``next`` link gone wrong
PAGE_SIZE = 1000
MAX_PAGES = 10_000


def is_reserved(key: str) -> bool:
    return key in RESERVED or key.startswith(RESERVED_PREFIXES)


def _server_time(resp: Any) -> datetime | None:
    """The server's clock from a response's ``Date`` header, or None."""
    try:
        value = resp.headers.get("Date")
        return parsedate_to_datetime(value).astimezone(UTC) if value else None
    except (AttributeError, TypeError, ValueError):
        return None


def _after(params: Mapping[str, str]) -> datetime:
    """The ``updated_at=gte:`` bound a listing already has (a re-list must not go below it)."""
    value = params.get("updated_at", "")
    bound = parse_time(value[4:]) if value.startswith("gte:") else None
    return bound or datetime.min.replace(tzinfo=UTC)


def _stamp(rec: ImageRecord) -> datetime:
    return rec.updated_at or rec.created_at


class GlanceWriter(QueuedUpload):
    """One upload to Glance, fed by ``write`` while a thread PUTs the image's data.

    The body is a ``QueueBody`` of known size, so requests sends a Content-Length, not a
    chunked body: Glance under uwsgi reads a chunked body through a buffer that it re-slices
    for every read (``glance.common.wsgi._UWSGIChunkFile``), which costs the server a copy of
    up to a whole chunk per 64 KiB it stores, on the one thread that also hashes and writes
    the image (measured: bench/README.md). A body half sent is never replayed."""

    def __init__(self, site: GlanceSite, image_id: str, size: int | None) -> None:
        self.site = site
        self._id = image_id
        self.body = QueueBody(size or None)
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(size,), daemon=True, name=f"upload-{site.name}-{image_id[:8]}"
        )
        self.thread.start()

    @property
    def image_id(self) -> str:
        return self._id

    def _run(self, size: int | None) -> None:
        # Through the session, not glanceclient's images.upload: glanceclient turns any
        # file-like body into a chunked one (see the class's doc).
        headers = {"Content-Type": "application/octet-stream"}
        if size is not None:
            headers["x-openstack-image-size"] = str(size)
        try:
            self.site.adapter.put(f"/v2/images/{self._id}/file", data=self.body, headers=headers)
        except BaseException as exc:
            self.error = exc

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise classify(self.error, self.site.name, f"upload {self._id}")

    def _closed(self) -> SiteError:
        return TransientError(
            f"upload {self._id}: connection closed by the server", site=self.site.name
        )

    def write(self, chunk: bytes) -> None:
        self._put(chunk)

    def finish(self) -> ImageRecord:
        self._end()
        return self.site.wait_active(self._id)

    def abort(self) -> None:
        # Wake the upload thread with an error so that its request fails, then delete.
        self._wake(timeout=max(self.site.cfg.timeout, 5.0))
        self.site.delete_quietly(self._id)


class GlanceSite:
    """A Site over one cloud's Glance v2 API."""

    kind = "glance"

    def __init__(self, cfg: CloudConfig, session: ks_session.Session | None = None) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.session = session or make_session(cfg)
        self.adapter = make_adapter(
            self.session, cfg, "image", endpoint_override=cfg.endpoint_override
        )
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._project_id: str | None = None
        self._project_lock = threading.Lock()
        # in-use reporting: Nova's adapter once found, or why it cannot tell (decided once)
        self._compute: ks_adapter.Adapter | None = None
        self._no_in_use: str | None = None
        self._in_use_lock = threading.Lock()
        self._importer = WebDownload(self)
        # Glance computes checksum (md5) and os_hash_value in one pass as it stores the data
        self.capabilities = Capabilities.fill(self, hashes={"md5", "sha512"}, joint_hashes=True)

    @property
    def client(self) -> Any:
        """python-glanceclient's v2 Client on this session, made on first use."""
        with self._client_lock:
            if self._client is None:
                from glanceclient.v2 import client as glance_v2

                self._client = glance_v2.Client(
                    session=self.session,
                    interface=self.cfg.interface,
                    region_name=self.cfg.region_name,
                    endpoint_override=self.cfg.endpoint_override,
                )
            return self._client

    # -- helpers ------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (SiteError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise classify(exc, self.name, what) from exc

    def _record(self, raw: Mapping[str, Any]) -> ImageRecord:
        hashes: dict[str, str] = {}
        if raw.get("checksum"):
            hashes["md5"] = str(raw["checksum"])
        if raw.get("os_hash_algo") and raw.get("os_hash_value"):
            hashes[str(raw["os_hash_algo"]).lower()] = str(raw["os_hash_value"])
        props = {
            k: str(v)
            for k, v in raw.items()
            if not is_reserved(k) and isinstance(v, (str, int, float, bool))
        }
        created = parse_time(raw.get("created_at")) or datetime.now(UTC)
        return ImageRecord(
            site=self.name,
            id=str(raw["id"]),
            name=str(raw.get("name") or ""),
            status=str(raw.get("status") or "unknown"),
            created_at=created,
            updated_at=parse_time(raw.get("updated_at")),
            hashes=hashes,
            properties=props,
            protected=bool(raw.get("protected")),
            hidden=bool(raw.get("os_hidden")),
            owner=str(raw["owner"]) if raw.get("owner") else None,
            **glance_fields(raw),
        )

    # -- owners ---------------------------------------------------------------------------
    def trusted_owners(self) -> frozenset[str]:
        """The project imagesync authenticates as (asked of the session once: the token's
        scope) and the configured ``trusted_owners``: only their images count here."""
        with self._project_lock:
            if self._project_id is None:
                project = self._call("learn the project id", self.session.get_project_id)
                if not project:
                    if self.cfg.trusted_owners:
                        return frozenset(self.cfg.trusted_owners)
                    raise AuthError(
                        "the credentials are not scoped to a project, so imagesync cannot tell "
                        "its own images from others': scope them to a project, or list the "
                        "owners to trust in trusted_owners:",
                        site=self.name,
                    )
                self._project_id = str(project)
            return frozenset({self._project_id, *self.cfg.trusted_owners})

    # -- Site protocol --------------------------------------------------------------------
    def check_connection(self) -> str:
        """Authenticate, find Glance (in the catalog, or the endpoint override) and list one
        image there; a failure is explained in one sentence (see :func:`explain`)."""
        cfg = self.cfg
        try:
            self.session.get_token()
            endpoint = cfg.endpoint_override or self.session.get_endpoint(
                service_type="image", interface=cfg.interface, region_name=cfg.region_name
            )
        except Exception as exc:  # every failure becomes one sentence
            raise explain(exc, cfg) from exc
        if not endpoint:
            raise SiteError(no_endpoint(cfg), site=self.name)
        try:
            self.adapter.get("/v2/images", params={"limit": 1})
        except Exception as exc:
            raise explain(exc, cfg, url=str(endpoint), what="the image endpoint") from exc
        return redact(f"authenticated at {cfg.auth.get('auth_url')}; glance at {endpoint}")

    def _list(self, params: dict[str, str]) -> list[ImageRecord]:
        return self._pages(params)[0]

    def _pages(self, params: dict[str, str]) -> tuple[list[ImageRecord], datetime | None]:
        """Every page of one listing, and a time in Glance's clock no later than the moment
        it read the first page: its ``Date`` header, else (a server that sends none, like
        uwsgi) the latest ``updated_at`` on that page; None if neither is known.

        A listing either completes or fails (SiteError): a page that is not a JSON object
        with a list of images, an image without an id, a ``next`` link seen before (a loop)
        or more than ``MAX_PAGES`` pages are failures, never a shorter inventory, which the
        planner would take as truth (re-copying, or retiring, what it did not see).
        """
        out: list[ImageRecord] = []
        url: str | None = "/v2/images"
        query: dict[str, str] | None = {"limit": str(PAGE_SIZE), **params}
        seen: set[str] = set()
        started: datetime | None = None
        while url:
            if len(seen) >= MAX_PAGES:
                raise SiteError(
                    f"list images: more than {MAX_PAGES} pages: giving up", site=self.name
                )
            seen.add(url)
            resp = self._call(
                "list images",
                lambda u=url, q=query: self.adapter.get(u, params=q),  # type: ignore[misc]
            )
            first = len(seen) == 1
            if first:
                started = _server_time(resp)
            page = self._call("list images", resp.json)
            images = page.get("images") if isinstance(page, dict) else None
            if not isinstance(images, list) or not all(
                isinstance(raw, dict) and raw.get("id") for raw in images
            ):
                raise SiteError("list images: malformed page: no list of images", site=self.name)
            records = [self._record(raw) for raw in images]
            if first and started is None and records:
                started = max(_stamp(r) for r in records)
            out.extend(records)
            nxt = page.get("next")
            if nxt is not None and (not isinstance(nxt, str) or nxt in seen):
                raise SiteError(f"list images: next link loops back: {nxt!r:.100}", site=self.name)
            url, query = nxt, None
        return out, started

    def _list_both(self, params: dict[str, str]) -> list[ImageRecord]:
        """Visible and hidden images: Glance lists hidden ones only when asked for them alone,
        so these are two listings, one after the other. (At the same time, both requests
        would have Keystone validate the new token: measured slower, 0.35 s against 0.24 s.)

        An image whose ``os_hidden`` flips between the two (an upload published, a version
        retired) would be in neither. So, after both, what changed since the first began
        (``updated_at=gte:``, in Glance's own clock, less a second for its resolution) is
        listed again in both states, and the latest record of each id wins. With a ``Date``
        header those listings are short (what changed in the last moments); without one the
        bound is the newest change on the first page, which may reach further back; with
        neither, everything is listed again.
        """
        visible, started = self._pages(params)
        hidden = self._list({**params, "os_hidden": "true"})
        records = [*visible, *hidden]
        since = dict(params)
        if started is not None:
            bound = format_time(max(started - timedelta(seconds=1), _after(params)))
            since["updated_at"] = f"gte:{bound}"
        records += self._list(since) + self._list({**since, "os_hidden": "true"})
        latest: dict[str, ImageRecord] = {}
        for rec in records:
            have = latest.get(rec.id)
            if have is None or _stamp(rec) >= _stamp(have):
                latest[rec.id] = rec
        return list(latest.values())

    def list_images(self, name: str | None = None) -> list[ImageRecord]:
        base = {"visibility": "all"}
        if name is not None:
            base["name"] = name
        return self._list_both(base)

    def list_changed(self, since: str) -> tuple[list[ImageRecord], str]:
        """Images created or updated at or after ``since``: Glance's ``updated_at=gte:``
        filter, in Glance's own clock, so the control host's clock does not matter. An idle
        pass over thousands of images then reads a few records instead of all of them."""
        base = {"visibility": "all"}
        if since:
            base["updated_at"] = f"gte:{since}"
        records = self._list_both(base)
        stamps = [format_time(r.updated_at or r.created_at) for r in records]
        return records, max([*stamps, since])

    def get_image(self, image_id: str) -> ImageRecord:
        raw = self._call(
            f"get image {image_id}", lambda: self.adapter.get(f"/v2/images/{image_id}").json()
        )
        return self._record(raw)

    def wait_active(self, image_id: str, timeout: float = 300.0) -> ImageRecord:
        deadline = time.monotonic() + timeout
        while True:
            rec = self.get_image(image_id)
            if rec.status == "active":
                return rec
            if rec.status in ("killed", "deleted", "pending_delete", "deactivated"):
                raise SiteError(f"image {image_id} became {rec.status}", site=self.name)
            if time.monotonic() > deadline:
                raise TransientError(
                    f"image {image_id} still {rec.status} after {timeout:.0f}s", site=self.name
                )
            time.sleep(0.5)

    def open(self, image: ImageRecord, offset: int = 0) -> Iterator[bytes]:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self._call(
            f"download {image.id}",
            lambda: self.adapter.get(f"/v2/images/{image.id}/file", headers=headers, stream=True),
        )
        if resp.status_code == 204:
            resp.close()
            raise NotFound(f"image {image.id} has no data", site=self.name)
        return self._iter(resp, image.id)

    def _iter(self, resp: requests.Response, image_id: str) -> Iterator[bytes]:
        try:
            yield from resp.iter_content(chunk_size=1 << 20)
        except Exception as exc:
            raise classify(exc, self.name, f"download {image_id}") from exc
        finally:
            resp.close()

    def create(self, new: NewImage) -> GlanceWriter:
        return GlanceWriter(self, self.create_for_import(new), new.size)

    def create_for_import(self, new: NewImage) -> str:
        """The invisible, marked placeholder every copy starts with (``create``'s, and a
        server-side import's: see sites/glance_import.py); its id."""
        fields: dict[str, Any] = {
            "name": new.name,
            "disk_format": new.disk_format or "raw",
            "container_format": new.container_format or "bare",
            "min_disk": new.min_disk,
            "min_ram": new.min_ram,
            "visibility": new.visibility,
            "os_hidden": True,
        }
        props = marked_uploading(
            {k: str(v) for k, v in new.properties.items() if not is_reserved(k)}
        )
        fields.update(props)
        raw = self._call(f"create image {new.name}", lambda: self.client.images.create(**fields))
        image_id = str(raw["id"])
        log.debug("image.created", site=self.name, image_id=image_id, name=new.name)
        return image_id

    # -- server-side import (web-download): sites/glance_import.py ------------------------
    def imports_urls(self) -> bool:
        return self._importer.available()

    def import_url(
        self, image_id: str, url: SharedURL, should_stop: Callable[[], bool]
    ) -> ImageRecord:
        return self._importer.run(image_id, url, should_stop)

    def publish(self, image_id: str, properties: Mapping[str, str] | None = None) -> ImageRecord:
        extra = {k: v for k, v in (properties or {}).items() if not is_reserved(k)}
        self._call(
            f"publish {image_id}",
            lambda: self.client.images.update(
                image_id, remove_props=[PROP_STATE], os_hidden=False, **extra
            ),
        )
        return self.get_image(image_id)

    def delete(self, image_id: str) -> None:
        try:
            self._call(f"delete {image_id}", lambda: self.client.images.delete(image_id))
        except NotFound:
            return

    def delete_quietly(self, image_id: str) -> None:
        """Delete during clean-up: try a few times, log and swallow failures."""
        for attempt in range(3):
            try:
                self.delete(image_id)
                return
            except SiteError as exc:
                log.warning(
                    "cleanup.delete_failed",
                    site=self.name,
                    image_id=image_id,
                    attempt=attempt + 1,
                    error=str(exc),
                )
                time.sleep(0.5 * (attempt + 1))

    def images_in_use(self) -> set[str] | None:
        """Ids of the images that servers (of every project) were booted from, from Nova's
        server list; None when this cloud cannot tell (no compute endpoint in the catalog,
        or the credentials may not list every project's servers: a server of another project
        may run a shared or public image) or Nova failed just now. Never raises: a Nova
        failure must not make the images unlistable."""
        compute = self._compute_adapter()
        if compute is None:
            return None
        ids: set[str] = set()
        url: str | None = "/servers/detail"
        query: dict[str, str] | None = {"all_tenants": "1", "limit": "1000"}
        try:
            while url:
                page = compute.get(url, params=query).json()
                for server in page.get("servers", []):
                    image = server.get("image")
                    if isinstance(image, dict) and image.get("id"):
                        ids.add(str(image["id"]))
                nxt = [
                    link.get("href")
                    for link in page.get("servers_links", [])
                    if link.get("rel") == "next"
                ]
                url, query = (nxt[0], None) if nxt and nxt[0] != url else (None, None)
        except Exception as exc:
            err = classify(exc, self.name, "list servers")
            if isinstance(exc, ksexc.Forbidden) or getattr(exc, "http_status", None) == 403:
                self._cannot_tell(
                    "the credentials may not list every project's servers (all_tenants)"
                )
            else:
                log.warning("in_use.unknown", site=self.name, reason=str(err))
            return None
        return ids

    def _compute_adapter(self) -> ks_adapter.Adapter | None:
        """Nova's adapter, found in the catalog on first use; None when it cannot tell."""
        with self._in_use_lock:
            if self._no_in_use is not None or self._compute is not None:
                return self._compute
            cfg = self.cfg
            try:
                endpoint = self.session.get_endpoint(
                    service_type="compute", interface=cfg.interface, region_name=cfg.region_name
                )
            except ksexc.EndpointNotFound:
                endpoint = None
            except Exception as exc:  # auth or network now: ask again next time
                log.warning(
                    "in_use.unknown",
                    site=self.name,
                    reason=str(classify(exc, self.name, "find compute")),
                )
                return None
            if not endpoint:
                self._cannot_tell_locked("no compute endpoint in the service catalog")
                return None
            self._compute = make_adapter(self.session, cfg, "compute")
            return self._compute

    def _cannot_tell(self, reason: str) -> None:
        with self._in_use_lock:
            self._cannot_tell_locked(reason)

    def _cannot_tell_locked(self, reason: str) -> None:
        self._no_in_use = reason
        self._compute = None
        log.info("in_use.cannot_tell", site=self.name, reason=reason)

    def hide(self, image_id: str) -> None:
        self._call(f"hide {image_id}", lambda: self.client.images.update(image_id, os_hidden=True))

    def close(self) -> None:
        pass
