"""The lab VOSpace service's pre-authorized URLs (lab/vospace/preauth.py), CADC's style: a
pull is offered an endpoint with a grant in its path and is read without credentials; a grant
works for its own node only, for reading only, and not after it expires."""

from __future__ import annotations

import re
from pathlib import Path

from imagesync.lab.vospace import Fault, preauth, set_faults
from imagesync.lab.vospace.xmldoc import VOS_NS
from imagesync.sites.vospace_share import mask
from tests.unit.test_vospace_app import AUTH, Client


def _pull_endpoints(svc: Client, path: str) -> list[str]:
    doc = (
        f'<vos:transfer xmlns:vos="{VOS_NS}" version="2.1"><vos:target>vos://{AUTH}/{path}'
        "</vos:target><vos:direction>pullFromVoSpace</vos:direction>"
        '<vos:protocol uri="ivo://ivoa.net/vospace/core#httpget"/></vos:transfer>'
    ).encode()
    job = svc("POST", "/sync", doc).headers["Location"].removeprefix("http://svc")
    return re.findall(r"<vos:endpoint>([^<]+)</vos:endpoint>", svc("GET", job).text)


def test_a_pull_offers_a_pre_authorized_url_that_needs_no_credentials(tmp_path: Path) -> None:
    svc = Client(tmp_path)
    assert svc("PUT", "/data/f", b"0123456789").status == 201
    assert svc("PUT", "/data/g", b"other").status == 201
    plain, granted = _pull_endpoints(svc, "f")
    assert plain == "http://svc/data/f" and "/data/preauth:" in granted
    path = granted.removeprefix("http://svc")
    assert svc("GET", path, token=None).body == b"0123456789"
    assert svc("HEAD", path, token=None).headers["Content-Length"] == "10"
    assert svc("GET", "/data/f", token=None).status == 401  # the plain one still needs them
    # the grant is for f alone, for reading alone
    assert svc("GET", path.replace("/f", "/g"), token=None).status == 403
    assert svc("PUT", path, b"x", token=None).status == 405
    grant = path.split("/")[2]
    forged = grant[:-1] + ("1" if grant.endswith("0") else "0")  # one hex digit of the MAC changed
    assert svc("GET", path.replace(grant, forged), token=None).status == 403
    # the corrupt fault serves other bytes of the same length
    set_faults(tmp_path, [Fault("corrupt", method="GET", path="preauth:")])
    bad = svc("GET", path, token=None).body
    assert len(bad) == 10 and bad != b"0123456789"
    assert svc("GET", "/data/f").body == b"0123456789"


def test_a_grant_expires(tmp_path: Path) -> None:
    grant = preauth.issue(tmp_path, "f", now=1000.0, ttl=60)
    assert preauth.valid(tmp_path, grant, "f", now=1059.0)
    assert not preauth.valid(tmp_path, grant, "f", now=1061.0)
    assert not preauth.valid(tmp_path, grant, "g", now=1001.0)
    assert not preauth.valid(tmp_path, "preauth:xyz", "f", now=1001.0)


def test_the_grant_is_masked_wherever_the_url_is_shown() -> None:
    url = mask("http://h:1/data/preauth:123.abcdef/c/img.qcow2")
    assert url.shown == "http://h:1/data/preauth:…/c/img.qcow2" and url.secret == "123.abcdef"
    signed = mask("https://h/f?sig=XYZ")
    assert signed.shown == "https://h/f?…" and "XYZ" not in repr(signed)


def test_a_grant_in_any_log_line_or_error_is_masked() -> None:
    """Defence in depth: a traceback or a library's message that quotes the URL whole."""
    from imagesync.logs import redact

    line = "GET http://h:1/data/preauth:1764460800.9f3a2b/c/img.qcow2 failed: 'preauth:abc'"
    out = redact(line)
    assert "9f3a2b" not in out and "abc'" not in out and "/c/img.qcow2" in out
    assert redact("http://h/data/preauth:…/c") == "http://h/data/preauth:…/c"  # shown form kept
