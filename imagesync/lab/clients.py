"""Clients for a lab cloud, for tests and the demo: a keystoneauth1 session, a Glance v2 client.

imagesync's own code reaches clouds through ``imagesync.sites``; these helpers are the
independent way in that tests use to set up and check what imagesync did.
"""

from __future__ import annotations

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
