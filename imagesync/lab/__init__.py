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

Modules: ``control`` (up/status/down), ``state`` (lab.json, the client files), ``keystone`` and
``glance`` (one service each), ``procs`` (processes), ``clients`` (sessions for tests).
"""

from __future__ import annotations

from imagesync.lab.clients import glance_client, session
from imagesync.lab.control import default_dir, describe, down, info, status, up
from imagesync.lab.state import LabCloud, LabInfo, LabVOSpace

__all__ = [
    "LabCloud",
    "LabInfo",
    "LabVOSpace",
    "default_dir",
    "describe",
    "down",
    "glance_client",
    "info",
    "session",
    "status",
    "up",
]
