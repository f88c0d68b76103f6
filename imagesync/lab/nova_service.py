"""The lab's all-in-one Nova: api, conductor, scheduler and compute in one Python process.

Run by ``imagesync lab up --nova`` as ``python -m imagesync.lab.nova_service --config-dir ETC
--ready-file F --fail-file F --pidfile P`` with ``OS_NOVA_DISABLE_EVENTLET_PATCHING=1``. It is
how Nova's own functional tests run Nova: in-memory messaging (``fake:/``) works only within
one process. Never imported by imagesync itself (importing Nova has side effects: patching,
global configuration); ``imagesync.lab.nova`` starts it.

What this adds to stock Nova, and why:
- an uploading fake driver (``nova.virt.fake.ImagesyncLabDriver``: Nova loads drivers only
  from ``nova.virt``): the stock one uploads nothing, so a snapshot would stay ``queued``;
- Nova's in-process Neutron double (``nova.tests.fixtures.neutron.NeutronFixture``);
- sqlite that waits instead of failing with "database is locked" (busy_timeout, and
  ``BEGIN IMMEDIATE`` so two writers never both hold a read lock they want to upgrade).
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socketserver
import sys
import threading
from pathlib import Path
from typing import Any
from wsgiref import simple_server

from imagesync.lab.nova import FAIL_KEY, READY_MARKER, snapshot_data


def _sqlite_waits() -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        if type(dbapi_conn).__module__.startswith("sqlite3"):
            dbapi_conn.isolation_level = None  # SQLAlchemy's begin event issues BEGIN
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout = 30000")
            cur.close()

    @event.listens_for(Engine, "begin")
    def _begin(conn: Any) -> None:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            conn.info["in_transaction"] = True  # oslo.db must not emit a BEGIN of its own


def _failing(fail_file: Path, instance: Any, step: str) -> bool:
    """Was ``step`` ("boot", "snapshot") asked to fail: server metadata or the lab's file."""
    meta = getattr(instance, "metadata", None) or {}
    if step in str(meta.get(FAIL_KEY, "")).split(","):
        return True
    try:
        return step in fail_file.read_text().split()
    except OSError:
        return False


def _install_driver(fail_file: Path) -> None:
    from nova import exception
    from nova.compute import task_states
    from nova.image import glance
    from nova.virt import fake

    class ImagesyncLabDriver(fake.FakeDriver):  # type: ignore[misc]
        """The fake driver, with snapshots that upload bytes and failures on request."""

        def spawn(self, context: Any, instance: Any, *args: Any, **kwargs: Any) -> None:
            if _failing(fail_file, instance, "boot"):
                raise exception.BuildAbortException(
                    instance_uuid=instance.uuid, reason="lab: boot failure asked for"
                )
            super().spawn(context, instance, *args, **kwargs)

        def snapshot(
            self, context: Any, instance: Any, image_id: str, update_task_state: Any
        ) -> None:
            if instance.uuid not in self.instances:
                raise exception.InstanceNotRunning(instance_id=instance.uuid)
            update_task_state(task_state=task_states.IMAGE_PENDING_UPLOAD)
            if _failing(fail_file, instance, "snapshot"):
                # As a real driver failing: Nova deletes the image and resets the task state.
                raise exception.NovaException("lab: snapshot failure asked for")
            update_task_state(
                task_state=task_states.IMAGE_UPLOADING,
                expected_state=task_states.IMAGE_PENDING_UPLOAD,
            )
            meta = {"disk_format": "raw", "container_format": "bare", "properties": {}}
            glance.API().update(
                context, image_id, meta, io.BytesIO(snapshot_data(instance.uuid)), purge_props=False
            )

    fake.ImagesyncLabDriver = ImagesyncLabDriver


class _Test:
    """What NeutronFixture expects of its test case: ``flags`` and ``stub_out``."""

    def __init__(self) -> None:
        self.patches: list[Any] = []

    def flags(self, **kw: Any) -> None:
        from nova.conf import CONF

        for k, v in kw.items():
            CONF.set_override(k, v)

    def stub_out(self, old: str, new: Any) -> None:
        import fixtures

        patch = fixtures.MonkeyPatch(old, new)
        patch.setUp()
        self.patches.append(patch)


class _Server(socketserver.ThreadingMixIn, simple_server.WSGIServer):
    daemon_threads = True


class _Quiet(simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # Nova logs every request itself


def _wait_http(url: str, timeout: float = 120.0) -> None:
    """Until ``url`` answers 200 or 300 (Keystone and Placement start alongside this)."""
    import time
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with opener.open(url, timeout=2.0) as resp:
                if resp.status in (200, 300):
                    return
        except urllib.error.HTTPError as exc:
            if exc.code in (200, 300):
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"CRITICAL imagesync-lab: {url} did not answer in {timeout:.0f} s")
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="imagesync-lab-nova")
    ap.add_argument("--config-dir", type=Path, required=True)
    ap.add_argument("--ready-file", type=Path, required=True)
    ap.add_argument("--fail-file", type=Path, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--wait-for", action="append", default=[], metavar="URL")
    ap.add_argument("--pidfile", type=Path, required=True)
    args = ap.parse_args(argv)
    args.pidfile.write_text(f"{os.getpid()}\n")
    os.environ["OS_NOVA_DISABLE_EVENTLET_PATCHING"] = "1"
    os.environ["OS_NOVA_CONFIG_DIR"] = str(args.config_dir)

    from nova import monkey_patch

    monkey_patch.patch(backend="threading")
    _sqlite_waits()
    _install_driver(args.fail_file)
    sys.argv = ["nova-lab"]  # init_application parses sys.argv as Nova's command line

    from nova import context, objects, service
    from nova.api.openstack import wsgi_app
    from nova.conf import CONF

    app = wsgi_app.init_application("osapi_compute", "nova-api-os-compute")

    from nova.tests.fixtures.neutron import NeutronFixture

    NeutronFixture(_Test()).setUp()
    for url in args.wait_for:
        _wait_http(url)

    for binary, topic in (
        ("nova-conductor", "conductor"),
        ("nova-compute", "compute"),
        ("nova-scheduler", "scheduler"),
    ):
        service.Service.create(binary=binary, topic=topic).start()
        if binary == "nova-compute":
            # the scheduler reads the host mappings at its start: map the compute host first
            objects.host_mapping.discover_hosts(context.get_admin_context())

    server = simple_server.make_server(CONF.my_ip, args.port, app, _Server, _Quiet)
    stop = threading.Event()
    # Exit on SIGTERM without Service.kill(): that would delete the service records.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, daemon=True, name="nova-api").start()
    args.ready_file.write_text(f"{os.getpid()}\n")
    print(READY_MARKER, flush=True)
    stop.wait()
    server.shutdown()
    os._exit(0)  # the services' threads are not daemons; nothing of theirs needs to finish


if __name__ == "__main__":
    sys.exit(main())
