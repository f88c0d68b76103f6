"""One HTTP status table for every HTTP site (sites/httpstatus.py): Glance's classification
(keystoneauth errors) and VOSpace's (requests responses) agree on what a status means."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import requests
from keystoneauth1 import exceptions as ksexc

from imagesync.errors import AuthError, Conflict, NotFound, SiteError, TransientError
from imagesync.sites.openstack import classify
from imagesync.sites.vosproto import classify_status


def response(status: int, headers: dict[str, str] | None = None) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp.headers.update(headers or {})
    resp._content = b""
    return resp


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (401, AuthError),
        (403, AuthError),
        (404, NotFound),
        (409, Conflict),
        (408, TransientError),
        (429, TransientError),
        (503, TransientError),
        (400, SiteError),
    ],
)
def test_glance_and_vospace_classify_a_status_alike(status: int, kind: type[SiteError]) -> None:
    resp = response(status)
    glance = classify(ksexc.HttpError(http_status=status, response=resp), "c1", "list")
    vospace = classify_status(resp, "store", "list")
    assert type(glance) is kind and type(vospace) is kind


def test_a_retry_after_date_is_honoured_by_glance_too() -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    resp = response(503, {"Retry-After": later})
    err = classify(ksexc.HttpError(http_status=503, response=resp), "c1", "list")
    assert isinstance(err, TransientError)
    assert err.retry_after is not None and 60 < err.retry_after <= 90
