"""Logging: JSON lines or console text, library loggers routed through, every secret masked."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from imagesync import logs
from imagesync.logs import (
    MASK,
    get_logger,
    is_secret_key,
    redact,
    register_secret,
    setup_logging,
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Leave logging and the secret registry as they were, for the other test modules."""
    saved_config = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_levels = {n: logging.getLogger(n).level for n in logs.LIBRARY_LOGGERS}
    logs.forget_secrets()
    yield
    logs.forget_secrets()
    structlog.configure(**saved_config)
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(False)
    logs._handler = None


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


def test_json_lines_have_timestamp_level_event() -> None:
    out = io.StringIO()
    setup_logging("json", "info", stream=out)
    get_logger("imagesync.test").info("copied", image="canfar-batch-1", bytes=42)
    [entry] = json_lines(out)
    assert list(entry)[:3] == ["timestamp", "level", "event"]
    assert entry["event"] == "copied" and entry["level"] == "info"
    assert entry["logger"] == "imagesync.test"
    assert entry["timestamp"].endswith("Z") and "T" in entry["timestamp"]
    assert entry["image"] == "canfar-batch-1" and entry["bytes"] == 42


def test_auto_is_json_off_a_terminal_and_console_on_one() -> None:
    out = io.StringIO()
    setup_logging("auto", "info", stream=out)
    get_logger("t").info("hello", n=1)
    assert json_lines(out)[0]["event"] == "hello"

    tty = _Tty()
    setup_logging("auto", "info", stream=tty)
    get_logger("t").info("hello", n=1)
    text = tty.getvalue()
    assert "hello" in text and "\x1b[" in text  # colours on a terminal
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_console_on_a_pipe_has_no_colours() -> None:
    out = io.StringIO()
    setup_logging("console", "info", stream=out)
    get_logger("t").warning("careful", site="uvic")
    text = out.getvalue()
    assert "careful" in text and "site=uvic" in text and "\x1b[" not in text


def test_level_filters() -> None:
    out = io.StringIO()
    setup_logging("json", "warning", stream=out)
    log = get_logger("t")
    log.info("quiet")
    log.debug("quieter")
    log.warning("loud")
    assert [e["event"] for e in json_lines(out)] == ["loud"]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="use one of"):
        setup_logging("yaml")
    with pytest.raises(ValueError, match="use one of"):
        setup_logging("json", "loud")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_secret_keys_are_masked(fmt: str) -> None:
    out = io.StringIO()
    setup_logging(fmt, "debug", stream=out)
    get_logger("t").info(
        "login",
        password="hunter2-pw",
        application_credential_secret="ac-secret-1",
        auth_token="tok-123456",
        headers={"X-Auth-Token": "hdr-token-9", "Accept": "json"},
        auth={"username": "alice", "password": "nested-pw-1"},
        username="alice",
    )
    text = out.getvalue()
    for secret in ("hunter2-pw", "ac-secret-1", "tok-123456", "hdr-token-9", "nested-pw-1"):
        assert secret not in text
    assert "alice" in text and "json" in text
    if fmt == "json":
        [entry] = json_lines(out)
        assert entry["password"] == MASK
        assert entry["headers"] == {"X-Auth-Token": MASK, "Accept": "json"}
        assert entry["auth"] == {"username": "alice", "password": MASK}


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_registered_secret_inside_messages_is_masked(fmt: str) -> None:
    register_secret("S3cr3t-Value!")
    out = io.StringIO()
    setup_logging(fmt, "info", stream=out)
    log = get_logger("t")
    log.warning("keystone said: bad password S3cr3t-Value! for alice")
    log.info("retry", reason="url http://x/?p=S3cr3t-Value%21 failed", items=["S3cr3t-Value!"])
    try:
        raise RuntimeError("boom S3cr3t-Value!")
    except RuntimeError:
        log.exception("failed")
    text = out.getvalue()
    assert "S3cr3t-Value" not in text
    assert text.count(MASK) >= 4
    assert "RuntimeError" in text  # the traceback is kept, masked


def test_standard_logging_is_routed_masked_and_kept_at_warning() -> None:
    register_secret("lib-Secret-77")
    out = io.StringIO()
    setup_logging("json", "debug", stream=out)
    ks = logging.getLogger("keystoneauth.session")
    ks.debug("REQ: curl -H 'X-Auth-Token: abc' with lib-Secret-77")  # below WARNING: dropped
    ks.warning("Failure: password lib-Secret-77 rejected, token=deadbeef")
    logging.getLogger("urllib3.connectionpool").info("dropped too")
    logging.getLogger("imagesync.engine").debug("our own debug passes")
    entries = json_lines(out)
    assert [e["logger"] for e in entries] == ["keystoneauth.session", "imagesync.engine"]
    assert entries[0]["level"] == "warning"
    assert entries[0]["event"] == f"Failure: password {MASK} rejected, token={MASK}"


def test_python_warnings_are_routed() -> None:
    out = io.StringIO()
    setup_logging("json", "info", stream=out)
    warnings.warn("deprecated thing", UserWarning, stacklevel=1)
    assert any("deprecated thing" in e["event"] for e in json_lines(out))


def test_setup_twice_keeps_one_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("json", "info", stream=first)
    setup_logging("json", "info", stream=second)
    get_logger("t").info("once")
    assert first.getvalue() == ""
    assert len(json_lines(second)) == 1


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("PASSWORD", True),
        ("os_password", True),
        ("secret", True),
        ("application_credential_secret", True),
        ("token", True),
        ("auth_token", True),
        ("X-Auth-Token", True),
        ("X-Subject-Token", True),
        ("api_key", True),
        ("Authorization", True),
        ("passcode", True),  # keystoneauth's v3totp
        ("passphrase", True),
        ("client_secret", True),
        ("private_key", True),
        ("PrivateKey", True),
        ("ssh_key", True),
        ("access-key", True),
        ("credential", True),
        ("credentials", True),
        ("aws_credentials", True),
        ("application_credential_id", False),
        ("application_credential_name", False),
        ("sort_key", False),
        ("keystone_url", False),
        ("username", False),
        ("auth_url", False),
        ("key", False),
        ("keep", False),
        ("project_name", False),
        (3, False),
    ],
)
def test_is_secret_key(key: object, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_redact_patterns_without_registration() -> None:
    assert redact("X-Auth-Token: gAAAAAB123") == f"X-Auth-Token: {MASK}"
    assert redact('{"password": "p\\"w", "name": "x"}') == f'{{"password": "{MASK}", "name": "x"}}'
    assert redact("GET /v3?token=abc&x=1") == f"GET /v3?token={MASK}&x=1"
    assert redact("https://alice:pw@host/x") == f"https://alice:{MASK}@host/x"
    assert redact("Authorization: Bearer abc.def") == f"Authorization: Bearer {MASK}"
    assert redact("nothing secret here") == "nothing secret here"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        # a library's message holding a repr()'d dict: every secret value masked whole
        ("Failed with {'password': 'hunter 2-pw', 'user': 'bob'}", "hunter 2-pw"),
        ("{'passcode': '123456', 'username': 'bob'}", "123456"),
        ("{'passcode': 123456}", "123456"),
        ("{'password': \"it's-a-pw\"}", "it's-a-pw"),
        ("{'password': 'it\\'s \"both\"'}", "both"),
        ("{'token': b'gAAAAAB-bytes'}", "gAAAAAB-bytes"),
        ("{'private_key': '-----BEGIN KEY-----\\nMIIabc'}", "MIIabc"),
        ("{'auth': {'application_credential_secret': 'ac s3cret'}}", "ac s3cret"),
        ('{"passphrase": "open sesame", "n": 1}', "sesame"),
        # key=value in a repr()'d object and in a query string
        ("Creds(password='p w d', user='x')", "w d"),
        ("POST /v3/auth?passcode=654321&x=1", "654321"),
        # URL userinfo: up to the last '@' before the host
        ("https://user:p@ss@host/path", "ss@host"),
        ("https://user:p@ss:w@rd@keystone:5000/v3", "rd"),
        ("https://alice@example.org:pw-1@host/x", "pw-1"),
    ],
)
def test_redact_masks_secrets_whole(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out, out
    assert MASK in out


def test_redact_keeps_what_is_not_secret() -> None:
    for text in (
        "{'password': None, 'username': 'bob', 'application_credential_id': 'ac-id-1'}",
        "config.reload_partial key=metrics_listen reason='at the next restart'",
        "clouds.a.auth.password: is a number: put the value in quotes",
        "https://keystone.example:5000/v3 and https://alice@host:5000/x?q=a@b",
    ):
        assert redact(text) == text
    # the shape of the text is kept: quotes stay, so JSON stays JSON
    assert redact('{"password": "x\\"y", "name": "n"}') == f'{{"password": "{MASK}", "name": "n"}}'
    assert redact("https://user:p@ss@host/path") == f"https://user:{MASK}@host/path"


def test_registered_secrets() -> None:
    register_secret("a/b c+d")
    register_secret("ab")  # too short to mask everywhere; ignored
    register_secret(None)
    assert redact("x a/b c+d y") == f"x {MASK} y"
    assert redact("q=a%2Fb%20c%2Bd") == f"q={MASK}"  # URL-encoded form
    assert redact("abc") == "abc"
    logs.forget_secrets()
    assert redact("a/b c+d") == "a/b c+d"


def test_mask_leaves_structure() -> None:
    register_secret("value-Secret")
    data = {
        "auth": {"password": "p", "user": "u"},
        "list": ["value-Secret", 1, None],
        "empty_password": "",
        "n": 2.5,
    }
    assert logs.mask(data) == {
        "auth": {"password": MASK, "user": "u"},
        "list": [MASK, 1, None],
        "empty_password": "",
        "n": 2.5,
    }


def test_default_configuration_is_masked_and_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    register_secret("default-Secret-1")
    logs._configure_default()
    log = structlog.get_logger("t")
    log.info("not shown")
    log.warning("shown default-Secret-1", password="pw-default")
    out, err = capsys.readouterr()
    assert out == ""
    assert "shown" in err and "not shown" not in err
    assert "default-Secret-1" not in err and "pw-default" not in err
