"""Clients for a lab cloud, for tests and the demo: a keystoneauth1 session, a Glance v2 client.

imagesync's own code reaches clouds through ``imagesync.sites``; these helpers are the
independent way in that tests use to set up and check what imagesync did.
"""

from __future__ import annotations

import time
from typing import Any

from imagesync.lab.state import ADMIN, LabInfo


def session(info: LabInfo, cloud: str, *, admin: bool = False) -> Any:
    """A keystoneauth1 Session on ``cloud`` as the imagesync member user (or as admin)."""
    from keystoneauth1 import session as ksa_session
    from keystoneauth1.identity import v3

    c = info.cloud(cloud)
    auth = v3.Password(
        auth_url=c.keystone_url,
        username=ADMIN if admin else c.username,
        password=c.admin_password if admin else c.password,
        project_name=ADMIN if admin else c.project,
        user_domain_name="Default",
        project_domain_name="Default",
    )
    return ksa_session.Session(auth=auth)


def glance_client(info: LabInfo, cloud: str, *, admin: bool = False) -> Any:
    """A python-glanceclient v2 Client on ``cloud`` (endpoint from the cloud's catalog)."""
    from glanceclient.v2 import client

    c = info.cloud(cloud)
    return client.Client(
        session=session(info, cloud, admin=admin), interface="public", region_name=c.region
    )


class LabCompute:
    """A small Nova client for tests: boot, stop, metadata, delete, wait (independent of
    imagesync.sites.nova, which is what the tests check)."""

    #: 2.37: boot with "networks": "none" (the lab has no Neutron)
    MICROVERSION = "2.37"

    def __init__(self, info: LabInfo, cloud: str, *, admin: bool = False) -> None:
        c = info.cloud(cloud)
        if c.compute_url is None:
            raise ValueError(f"{cloud} has no Nova: start the lab with `lab up --nova`")
        self.url = c.compute_url
        self.session = session(info, cloud, admin=admin)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        resp = self.session.request(
            f"{self.url}{path}",
            method,
            headers={"X-OpenStack-Nova-API-Version": self.MICROVERSION},
            raise_exc=True,
            **kw,
        )
        return resp.json() if resp.content else None

    def boot(
        self,
        name: str,
        image_id: str,
        *,
        flavor: str = "1",
        metadata: dict[str, str] | None = None,
        wait: bool = True,
    ) -> dict[str, Any]:
        body = {
            "server": {
                "name": name,
                "imageRef": image_id,
                "flavorRef": flavor,
                "networks": "none",
                "metadata": metadata or {},
            }
        }
        server = self._call("POST", "/servers", json=body)["server"]
        return self.wait(server["id"], "ACTIVE") if wait else self.get(server["id"])

    def get(self, server_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/servers/{server_id}")["server"])

    def wait(self, server_id: str, status: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            server = self.get(server_id)
            if server["status"] == status and not server.get("OS-EXT-STS:task_state"):
                return server
            if server["status"] == "ERROR" and status != "ERROR":
                raise RuntimeError(f"server {server_id} went ERROR: {server.get('fault')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server {server_id} is {server['status']}, not {status}")
            time.sleep(0.2)

    def stop(self, server_id: str) -> dict[str, Any]:
        self._call("POST", f"/servers/{server_id}/action", json={"os-stop": None})
        return self.wait(server_id, "SHUTOFF")

    def set_metadata(self, server_id: str, metadata: dict[str, str]) -> None:
        self._call("POST", f"/servers/{server_id}/metadata", json={"metadata": metadata})

    def delete(self, server_id: str) -> None:
        self.session.delete(f"{self.url}/servers/{server_id}", raise_exc=False)


def compute_client(info: LabInfo, cloud: str, *, admin: bool = False) -> LabCompute:
    """A LabCompute on ``cloud`` (which needs Nova: ``lab up --nova``)."""
    return LabCompute(info, cloud, admin=admin)
