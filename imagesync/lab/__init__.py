"""The lab: N separate, real OpenStack clouds on loopback, for tests, the demo and trying out.

Each cloud (lab1, lab2, ...) is a real Keystone 30 and a real Glance 33 (authenticating through
keystonemiddleware) under uwsgi, with sqlite and a file store, all in DIRECTORY/<cloud>::

    info = up(clouds=2, directory=path)   # idempotent: running / warm restart / cold build
    print(describe(info))                 # endpoints and how to use them
    text, running = status(path)
    down(path)                            # stops every process; data stays for a warm start

DIRECTORY also gets ``clouds.yaml`` (labN: imagesync's member user, labN-admin: admin),
``imagesync.yaml`` (a ready configuration), ``store/`` and ``lab.json`` (ports, passwords,
pids). Beside the clouds runs one VOSpace 2.1 service (``vospace/``, see
``imagesync.lab.vospace``), described by ``LabInfo.vospace``. Needs the ``lab`` extra
(glance, keystone, uwsgi); without it ``up`` raises LabError.
``up(..., nova_clouds=N)`` also runs Placement and Nova (fake virt driver) in the first N clouds
(≈320 MB each): see ``nova``.

Modules: ``control`` (up/status/down), ``start`` (bringing the clouds up), ``state`` (lab.json,
the client files), ``keystone`` and ``glance`` (one service each), ``nova`` and ``nova_service``
(compute), ``procs`` (processes), ``clients`` (sessions, a Glance and a small Nova client for
tests).
"""

from __future__ import annotations

from imagesync.lab.clients import LabCompute, compute_client, glance_client, session
from imagesync.lab.control import default_dir, describe, down, info, status, up
from imagesync.lab.state import LabCloud, LabInfo, LabVOSpace

__all__ = [
    "LabCloud",
    "LabCompute",
    "LabInfo",
    "LabVOSpace",
    "compute_client",
    "default_dir",
    "describe",
    "down",
    "glance_client",
    "info",
    "session",
    "status",
    "up",
]
