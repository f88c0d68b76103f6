"""The lab's VOSpace 2.1 service: a small WSGI app of the project's own, served by uwsgi.

Faithful enough to the standard, as CADC serves it, that CADC's own ``vos`` client works against
it unchanged (checked by ``tests/integration/test_vospace_service.py``). ``imagesync lab up``
starts one beside the clouds; tests can start their own::

    config = service.prepare(directory, port, token="T")     # or tls=True
    pid = service.start(config, port); service.wait_ready(config, pid)
    set_faults(directory, [Fault("unavailable", times=2, retry_after=1)])

Modules: ``app`` (the WSGI application), ``wsgiio`` (its HTTP plumbing), ``storage`` (sqlite
tree + blobs), ``xmldoc`` (the documents), ``faults`` (run-time fault hooks), ``service``
(uwsgi, its files), ``tls`` (its certificates), ``wsgi``.
"""

from __future__ import annotations

from imagesync.lab.vospace.app import ServiceConfig, VOSpaceApp, make_app
from imagesync.lab.vospace.faults import Fault, clear_faults, set_faults

__all__ = ["Fault", "ServiceConfig", "VOSpaceApp", "clear_faults", "make_app", "set_faults"]
