"""Running the lab VOSpace service: its files, its TLS material, uwsgi, readiness.

The service runs like the lab's Keystone and Glance: uwsgi in its own process group, with a
``--pidfile`` inside its directory (how ``lab down`` finds it). Plain http with a bearer token
is the default; ``tls=True`` serves https with a server certificate from a CA generated here,
and accepts client certificates signed by that CA (``tls/client.pem``: certificate and key in
one PEM, like CADC's ``~/.ssl/cadcproxy.pem``) as an alternative to the token.

Layout of DIRECTORY (the service's directory, ``LAB/vospace`` in a lab)::

    service.json   how the app runs (base URL, authority, token: mode 0600)
    data/          nodes.sqlite and blobs/ (the nodes and their bytes)
    faults.json    fault rules, re-read on every request (see faults.py)
    tls/           ca.pem, server.pem, server-key.pem, client.pem (only with tls=True)
    vospace.log, run/vospace.pid
"""

from __future__ import annotations

import contextlib
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imagesync.errors import LabError
from imagesync.lab import procs
from imagesync.lab.vospace.app import CONFIG_ENV, ServiceConfig
from imagesync.lab.vospace.storage import Exists, Store

WSGI_FILE = Path(__file__).with_name("wsgi.py")
AUTHORITY = "imagesync.lab~store"
CONTAINER = "images"  # the container the lab's imagesync store keeps its images in


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_pem: Path  # client certificate and key in one file


def log_file(directory: Path) -> Path:
    return directory / "vospace.log"


def pid_file(directory: Path) -> Path:
    return directory / "run" / "vospace.pid"


def tls_files(directory: Path) -> TLSFiles:
    t = directory / "tls"
    return TLSFiles(t / "ca.pem", t / "server.pem", t / "server-key.pem", t / "client.pem")


def prepare(
    directory: Path,
    port: int,
    token: str | None,
    *,
    tls: bool = False,
    auth_required: bool = True,
    container: str | None = CONTAINER,
) -> ServiceConfig:
    """Write the service's configuration (and TLS material), create its root container."""
    (directory / "run").mkdir(parents=True, exist_ok=True)
    scheme = "https" if tls else "http"
    config = ServiceConfig(
        directory=directory,
        base_url=f"{scheme}://{procs.LOOPBACK}:{port}",
        authority=AUTHORITY,
        token=token,
        auth_required=auth_required,
        client_certs=tls,
    )
    config.save()
    if tls and not tls_files(directory).client_pem.is_file():
        make_tls(directory)
    if container:
        store = Store(directory / "data")
        if store.get(container) is None:
            with contextlib.suppress(Exists):  # another process just made it
                store.create(container, "ContainerNode", {})
    return config


def start(config: ServiceConfig, port: int) -> int:
    """Start uwsgi serving the app on loopback ``port``; returns its pid (= its pgid)."""
    uwsgi = procs.find_executable("uwsgi")
    if uwsgi is None:
        raise LabError(f"{procs.EXTRA_MISSING} (not found: uwsgi)")
    d = config.directory
    if config.base_url.startswith("https:"):
        t = tls_files(d)
        # uwsgi's https router (not --https-socket: only the router exports HTTPS_DN, the
        # verified subject). No "!" before the CA: a client certificate is verified when
        # presented, not required (token clients use the same port).
        socket = [
            "--https",
            f"{procs.LOOPBACK}:{port},{t.server_cert},{t.server_key},HIGH,{t.ca}",
            # keep-alive as on plain http: without it the router closes each connection after
            # its answer, and a client reusing the pooled connection at that moment gets
            # "Remote end closed connection without response" (seen on a loaded machine)
            "--http-keepalive",
        ]
    else:
        # keep-alive, as CADC's client and requests expect; chunked uploads readable in raw mode
        socket = [
            "--http11-socket",
            f"{procs.LOOPBACK}:{port}",
            "--http-chunked-input",
        ]
    argv = procs.uwsgi_argv(
        uwsgi,
        Path(sys.prefix),
        socket,
        WSGI_FILE,
        pid_file(d),
        threads=8,
        extra=["--http-timeout", "600"],
    )
    return procs.start_service(argv, log_file(d), {CONFIG_ENV: str(d / "service.json")})


def wait_ready(
    config: ServiceConfig,
    pid: int,
    timeout: float = 60.0,
    abort: Callable[[], None] | None = None,
) -> None:
    url = f"{config.base_url}/availability"
    https = url.startswith("https:")
    d = config.directory
    service = procs.Starting(pid, str(pid_file(d)), log_file(d), "vospace", timeout, abort)
    # verified against the lab's own CA
    context = ssl.create_default_context(cafile=str(tls_files(d).ca)) if https else None
    procs.wait_http(url, service, context)


def registry_line(config: ServiceConfig) -> str:
    """The line for CADC's ``~/.config/cadc-registry/resource-caps``."""
    return f"{config.resource_id} = {config.base_url}/capabilities"


# --------------------------------------------------------------------------- TLS


def make_tls(directory: Path) -> TLSFiles:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    from imagesync.lab.vospace.tls import CertificateAuthority

    files = tls_files(directory)
    files.ca.parent.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority()
    server_cert, server_key = ca.issue("127.0.0.1", server=True)
    client_cert, client_key = ca.issue("imagesync-lab-user", server=False)
    files.ca.write_bytes(ca.pem)
    files.server_cert.write_bytes(server_cert)
    _write_private(files.server_key, server_key)
    _write_private(files.client_pem, client_cert + client_key)
    return files


def _write_private(path: Path, data: bytes) -> None:
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
