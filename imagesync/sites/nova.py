"""A cloud's Nova, for snapshots: find a server, stop it, ``createImage``, watch the image.

It shares the cloud's keystoneauth session (``sites.openstack.make_session``): one token per
cloud. Errors are classified at this boundary like Glance's (``sites.openstack.classify``). What
the answers mean, as seen on a real Nova 34 (../shared/reference/nova-recipe.md):

- ``createImage`` at microversion ≥ 2.45 answers 202 with ``{"image_id": …}``; a second one
  while the first runs answers 409 (task_state ``image_uploading``).
- The image goes queued → saving → active while the server's task_state goes
  ``image_snapshot`` → ``image_pending_upload`` → ``image_uploading`` → None.
- A failed snapshot leaves almost no trace: Nova deletes the image (GET → 404, briefly
  ``deleted``) and the server's task_state returns to None, without a fault. The instance
  action of the request may carry a message; ``failure_detail`` reports what there is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from keystoneauth1 import exceptions as ksexc
from keystoneauth1 import session as ks_session

from imagesync.config.types import CloudConfig
from imagesync.errors import NotFound, SiteError, UsageError
from imagesync.sites.openstack import classify, make_adapter, make_session

log = structlog.get_logger("imagesync.nova")

#: instance actions after which a server has run (again): a save on shutdown is due once it
#: is off again
BOOTING_ACTIONS = frozenset(
    {
        "create",
        "start",
        "reboot",
        "rebuild",
        "unshelve",
        "resume",
        "unpause",
        "evacuate",
        "unrescue",
        "restore",
        "confirmResize",
        "revertResize",
    }
)
#: 2.45: createImage answers with the image id in its body
MICROVERSION = "2.45"


@dataclass(frozen=True)
class Server:
    """What snapshotting needs to know of a server."""

    id: str
    name: str
    status: str  # ACTIVE, SHUTOFF, ERROR, ...
    task_state: str | None
    image_id: str | None  # the image it was booted from ("" for a volume-booted server)
    metadata: Mapping[str, str] = field(default_factory=dict)
    fault: str | None = None


@dataclass(frozen=True)
class SnapshotImage:
    """The snapshot's image as Glance reports it; ``status`` "gone" when Glance has none."""

    id: str
    status: str
    size: int | None = None
    sha512: str | None = None
    name: str | None = None


def _server(raw: Mapping[str, Any]) -> Server:
    image = raw.get("image")
    fault = raw.get("fault")
    return Server(
        id=str(raw["id"]),
        name=str(raw.get("name") or ""),
        status=str(raw.get("status") or "UNKNOWN"),
        task_state=raw.get("OS-EXT-STS:task_state") or None,
        image_id=str(image["id"]) if isinstance(image, dict) and image.get("id") else None,
        metadata={str(k): str(v) for k, v in (raw.get("metadata") or {}).items()},
        fault=str(fault.get("message")) if isinstance(fault, dict) and fault else None,
    )


class NovaSnapshots:
    """One cloud's compute API, as far as taking snapshots goes."""

    def __init__(self, cfg: CloudConfig, session: ks_session.Session | None = None) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.session = session or make_session(cfg)
        self.compute = make_adapter(self.session, cfg, "compute", default_microversion=MICROVERSION)
        self.image = make_adapter(
            self.session, cfg, "image", endpoint_override=cfg.endpoint_override
        )

    def _call(self, what: str, method: str, url: str, adapter: Any = None, **kw: Any) -> Any:
        try:
            resp = (adapter or self.compute).request(url, method, raise_exc=True, **kw)
        except ksexc.EndpointNotFound:
            raise SiteError(
                f"{what}: no compute (Nova) endpoint in the catalog for region "
                f"{self.cfg.region_name or '(any)'}",
                site=self.name,
            ) from None
        except Exception as exc:
            raise classify(exc, self.name, what) from None
        return resp

    def find_server(self, ref: str) -> Server:
        """A server of the project by id, else by exact name (which must be unique)."""
        try:
            return self.get_server(ref)
        except NotFound:
            pass
        page = self._call(
            f"find server {ref!r}", "GET", "/servers/detail", params={"name": f"^{ref}$"}
        ).json()
        found = [s for s in page.get("servers", []) if s.get("name") == ref]
        if not found:
            raise NotFound(f"no server {ref!r} on {self.name}", site=self.name)
        if len(found) > 1:
            ids = ", ".join(str(s["id"]) for s in found)
            raise UsageError(f"{len(found)} servers are called {ref!r} on {self.name}: {ids}")
        return _server(found[0])

    def get_server(self, server_id: str) -> Server:
        raw = self._call(f"get server {server_id}", "GET", f"/servers/{server_id}").json()
        return _server(raw["server"])

    def stop(self, server_id: str) -> None:
        """Ask Nova to stop the server (it answers at once; the caller waits for SHUTOFF)."""
        self._call(
            f"stop server {server_id}",
            "POST",
            f"/servers/{server_id}/action",
            json={"os-stop": None},
        )

    def create_image(self, server_id: str, name: str, metadata: Mapping[str, str]) -> str:
        """``createImage``: the new image's id. Nova copies ``metadata`` into its properties."""
        body = {"createImage": {"name": name, "metadata": dict(metadata)}}
        resp = self._call(
            f"snapshot server {server_id}", "POST", f"/servers/{server_id}/action", json=body
        )
        image_id = (resp.json() or {}).get("image_id")
        if not image_id:
            raise SiteError(
                f"snapshot server {server_id}: Nova answered without an image id", site=self.name
            )
        return str(image_id)

    def get_image(self, image_id: str) -> SnapshotImage:
        """The snapshot's image; status "gone" when Glance has none (Nova deleted it)."""
        try:
            raw = self._call(f"get image {image_id}", "GET", f"/v2/images/{image_id}", self.image)
        except NotFound:
            return SnapshotImage(id=image_id, status="gone")
        data = raw.json()
        algo, value = data.get("os_hash_algo"), data.get("os_hash_value")
        return SnapshotImage(
            id=image_id,
            status=str(data.get("status")),
            size=data.get("size"),
            sha512=str(value) if algo == "sha512" and value else None,
            name=data.get("name"),
        )

    def image_name(self, image_id: str) -> str | None:
        """The name of an image (a server's base image), or None if it is gone."""
        img = self.get_image(image_id)
        return img.name if img.status != "gone" else None

    def delete_image(self, image_id: str) -> bool:
        """Remove a failed snapshot's image; True if it is gone now."""
        try:
            self._call(f"delete image {image_id}", "DELETE", f"/v2/images/{image_id}", self.image)
        except NotFound:
            return True
        except SiteError as exc:
            log.warning(
                "snapshot.cleanup_failed", site=self.name, image_id=image_id, error=str(exc)
            )
            return False
        return True

    def failure_detail(self, server_id: str) -> str | None:
        """What Nova says went wrong with the server's last createImage: the server's fault,
        or an error of the instance action's events; None when Nova says nothing."""
        try:
            server = self.get_server(server_id)
            if server.fault:
                return server.fault
            actions = self._call(
                f"actions of {server_id}", "GET", f"/servers/{server_id}/os-instance-actions"
            ).json()
            for action in actions.get("instanceActions", []):
                if action.get("action") != "createImage":
                    continue
                if action.get("message"):
                    return str(action["message"])
                detail = self._call(
                    f"action of {server_id}",
                    "GET",
                    f"/servers/{server_id}/os-instance-actions/{action['request_id']}",
                ).json()
                for event in detail.get("instanceAction", {}).get("events", []):
                    if event.get("result") == "Error":
                        return f"{event.get('event')}: {event.get('result')}"
                return None
        except SiteError as exc:
            log.info("snapshot.no_detail", site=self.name, server=server_id, error=str(exc))
        return None

    def has_compute(self) -> bool:
        """Whether the catalog has a compute endpoint (from the token: no call to Nova)."""
        try:
            return bool(
                self.session.get_endpoint(
                    service_type="compute",
                    interface=self.cfg.interface,
                    region_name=self.cfg.region_name,
                )
            )
        except ksexc.EndpointNotFound:
            return False
        except Exception as exc:
            raise classify(exc, self.name, "look for a compute endpoint") from None

    def servers(self) -> list[Server]:
        """Every server of the project (the scope of the cloud's credentials), with metadata."""
        out: list[Server] = []
        params: dict[str, str] = {}
        while True:
            page = self._call("list servers", "GET", "/servers/detail", params=params).json()
            batch = page.get("servers", [])
            out.extend(_server(s) for s in batch)
            if not page.get("servers_links") or not batch:
                return out
            params = {"marker": str(batch[-1]["id"])}

    def set_metadata(self, server_id: str, metadata: Mapping[str, str]) -> None:
        """Add or replace these keys of the server's metadata (the others stay)."""
        self._call(
            f"set metadata of server {server_id}",
            "POST",
            f"/servers/{server_id}/metadata",
            json={"metadata": dict(metadata)},
        )

    def delete_metadata(self, server_id: str, key: str) -> None:
        """Remove one key of the server's metadata (absent already: fine)."""
        with contextlib.suppress(NotFound):
            self._call(
                f"delete metadata {key} of server {server_id}",
                "DELETE",
                f"/servers/{server_id}/metadata/{key}",
            )

    def last_booted(self, server_id: str) -> str | None:
        """When the server was last started (the newest instance action that boots it:
        create, start, reboot, rebuild, unshelve, ...: its start time, ISO 8601 UTC as Nova
        writes it), or None when Nova lists none."""
        actions = self._call(
            f"actions of {server_id}", "GET", f"/servers/{server_id}/os-instance-actions"
        ).json()
        times = [
            str(a["start_time"])
            for a in actions.get("instanceActions", [])
            if a.get("action") in BOOTING_ACTIONS and a.get("start_time")
        ]
        return max(times) if times else None

    # -- the boot test (a rule's boot_test) ----------------------------------------------------
    def flavor_id(self, flavor: str) -> str:
        """A flavor's id, from its name or id."""
        flavors = self._call("list flavors", "GET", "/flavors").json().get("flavors", [])
        for f in flavors:
            if flavor in (f.get("id"), f.get("name")):
                return str(f["id"])
        known = ", ".join(sorted(str(f.get("name")) for f in flavors)) or "none"
        raise NotFound(f"no flavor {flavor!r} on {self.name} (known: {known})", site=self.name)

    def boot(self, name: str, image_id: str, flavor_id: str) -> str:
        """Create a server from the image, with no network: its id (Nova answers at once)."""
        body = {
            "server": {
                "name": name,
                "imageRef": image_id,
                "flavorRef": flavor_id,
                "networks": "none",
                "metadata": {"imagesync.boot-test": image_id},
            }
        }
        raw = self._call(f"boot image {image_id}", "POST", "/servers", json=body).json()
        return str(raw["server"]["id"])

    def delete_server(self, server_id: str) -> None:
        with contextlib.suppress(NotFound):
            self._call(f"delete server {server_id}", "DELETE", f"/servers/{server_id}")

    def set_image_properties(self, image_id: str, props: Mapping[str, str]) -> None:
        """Add or replace properties of an image (a JSON patch)."""
        patch = [{"op": "add", "path": f"/{k}", "value": v} for k, v in props.items()]
        self._patch_image(image_id, f"set properties of image {image_id}", patch)

    def hide_image(self, image_id: str) -> None:
        """Hide an image (``os_hidden``): listed by nobody, booted by id only."""
        patch = [{"op": "replace", "path": "/os_hidden", "value": True}]
        self._patch_image(image_id, f"hide image {image_id}", patch)

    def show_image(self, image_id: str) -> None:
        """Un-hide an image: a boot test's copy that passed becomes the version on its cloud."""
        patch = [{"op": "replace", "path": "/os_hidden", "value": False}]
        self._patch_image(image_id, f"show image {image_id}", patch)

    def _patch_image(self, image_id: str, what: str, patch: list[dict[str, Any]]) -> None:
        """One JSON patch of an image's record, through Glance (on this cloud's session)."""
        self._call(
            what,
            "PATCH",
            f"/v2/images/{image_id}",
            self.image,
            json=patch,
            headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
        )

    def close(self) -> None:
        pass
