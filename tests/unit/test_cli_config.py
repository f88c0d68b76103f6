"""`imagesync config check|show` through the real CLI entry: bad configurations, masked secrets.

Every bad configuration must end with exit code 2 and ONE line on stderr that names the file,
the key path and the fix, with no traceback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagesync.cli import main
from tests.unit.memconfig import cybera_clouds_yaml

GOOD_CLOUD = (
    "{auth: {auth_url: 'https://k.example.org:5000/v3', username: u, password: pw-1234, "
    "project_name: p}}"
)
CLOUDS_YAML = cybera_clouds_yaml("clouds-yaml-Secret-42")
# starts of configurations for the sections added later (disk formats, coordination, VOSpace)
CEPH = "clouds:\n  ceph:\n    auth: " + GOOD_CLOUD.removeprefix("{auth: ")[:-1] + "\n"
COORDINATED = f"clouds: {{a: {GOOD_CLOUD}}}\ncoordination:\n"
VAULT = "stores:\n  vault:\n    type: vospace\n"

# (id, config text, key path the message must name, a fragment of the fix)
# {clouds_yaml} is replaced by the path of a valid clouds.yaml defining the entry `cybera`.
BAD = [
    (
        "unknown-top-key",
        f"poll_intervall: 5m\nclouds: {{a: {GOOD_CLOUD}}}\n",
        "poll_intervall",
        "did you mean 'poll_interval'",
    ),
    (
        "duration-words",
        f"poll_interval: 5 minutes\nclouds: {{a: {GOOD_CLOUD}}}\n",
        "poll_interval",
        "write a duration like 30s, 5m, 1h",
    ),
    (
        "duration-negative",
        f"poll_interval: -5m\nclouds: {{a: {GOOD_CLOUD}}}\n",
        "poll_interval",
        "negative",
    ),
    ("duration-zero", f"poll_interval: 0\nclouds: {{a: {GOOD_CLOUD}}}\n", "poll_interval", "zero"),
    (
        "check-max-age-type",
        f"check_max_age: [1]\nclouds: {{a: {GOOD_CLOUD}}}\n",
        "check_max_age",
        "write a duration",
    ),
    ("top-level-list", "- clouds\n- stores\n", "", "must be a mapping"),
    ("no-sites", "clouds: {}\nstores: {}\n", "clouds", "add at least one cloud"),
    ("clouds-a-list", "clouds: [cybera, uvic]\n", "clouds", "must be a mapping"),
    (
        "auth-no-auth-url",
        "clouds:\n  uvic:\n    auth: {username: u, password: p, project_name: p}\n",
        "clouds.uvic.auth.auth_url",
        "add it",
    ),
    (
        "auth-no-credentials",
        "clouds:\n  uvic:\n    auth: {auth_url: 'https://k/v3'}\n",
        "clouds.uvic.auth",
        "application_credential_secret",
    ),
    (
        "auth-no-password",
        "clouds:\n  uvic:\n    auth: {auth_url: 'https://k/v3', username: u, project_name: p}\n",
        "clouds.uvic.auth.password",
        "add it",
    ),
    (
        "appcred-no-secret",
        "clouds:\n  uvic:\n    auth: {auth_url: 'https://k/v3', application_credential_id: abc}\n",
        "clouds.uvic.auth.application_credential_secret",
        "add it",
    ),
    (
        "auth-unknown-option",
        "clouds:\n  uvic:\n    auth: {auth_url: 'https://k/v3', username: u,"
        " password: p, project_nme: p}\n",
        "clouds.uvic.auth.project_nme",
        "did you mean 'project_name'",
    ),
    (
        "auth-type-unknown",
        "clouds:\n  uvic:\n    auth_type: passwrd\n    auth: {auth_url: "
        "'https://k/v3', username: u, password: p, project_name: p}\n",
        "clouds.uvic.auth_type",
        "did you mean 'password'",
    ),
    (
        "auth-number",
        "clouds:\n  uvic:\n    auth: {auth_url: 'https://k/v3', username: u, "
        "password: 0123, project_name: p}\n",
        "clouds.uvic.auth.password",
        "quotes",
    ),
    (
        "auth-url-not-url",
        "clouds:\n  uvic:\n    auth: {auth_url: 'keystone:5000', username: u, "
        "password: p, project_name: p}\n",
        "clouds.uvic.auth.auth_url",
        "https://",
    ),
    (
        "endpoint-override-not-url",
        "clouds:\n  uvic: {cloud: cybera, endpoint_override: glance}\n",
        "clouds.uvic.endpoint_override",
        "not an http(s) URL",
    ),
    (
        "cloud-neither",
        "clouds:\n  uvic:\n    region_name: RegionOne\n",
        "clouds.uvic",
        "neither `cloud:` nor `auth:`",
    ),
    (
        "cloud-both",
        "clouds:\n  uvic:\n    cloud: uvic\n    auth: {auth_url: 'https://k/v3'}\n",
        "clouds.uvic",
        "keep one",
    ),
    (
        "cloud-unknown-key",
        "clouds:\n  uvic:\n    cloud: uvic\n    regoin_name: x\n",
        "clouds.uvic.regoin_name",
        "did you mean 'region_name'",
    ),
    (
        "cloud-interface",
        "clouds:\n  uvic: {cloud: cybera, interface: private}\n",
        "clouds.uvic.interface",
        "use one of: public, internal, admin",
    ),
    (
        "clouds-yaml-entry-missing",
        "clouds_yaml: {clouds_yaml}\nclouds:\n  cy: {cloud: cybra}\n",
        "clouds.cy.cloud",
        "entries there: cybera",
    ),
    (
        "clouds-yaml-file-missing",
        "clouds_yaml: /nonexistent/clouds.yaml\nclouds:\n  cy: {cloud: cybera}\n",
        "clouds_yaml",
        "fix the path",
    ),
    (
        "store-unknown-type",
        "stores:\n  archive: {type: s3, path: /srv}\n",
        "stores.archive.type",
        "use one of: directory",
    ),
    ("store-no-type", "stores:\n  archive: {path: /srv}\n", "stores.archive.type", "add it"),
    (
        "directory-no-path",
        "stores:\n  archive: {type: directory}\n",
        "stores.archive.path",
        "add it",
    ),
    (
        "directory-relative",
        "stores:\n  archive: {type: directory, path: srv/images}\n",
        "stores.archive.path",
        "absolute path",
    ),
    # a vospace store names its container; a token is never written in the file
    (
        "vospace-no-container",
        "stores:\n  vault: {type: vospace, url: 'https://v.example/v'}\n",
        "stores.vault.container",
        "missing: add it",
    ),
    (
        "vospace-inline-token",
        "stores:\n  vault: {type: vospace, container: 'vos://a~b/c', token: abc}\n",
        "stores.vault.token",
        "token_file",
    ),
    (
        "duplicate-site-name",
        f"clouds:\n  archive: {GOOD_CLOUD}\nstores:\n  archive: {{type: directory, path: /srv}}\n",
        "stores.archive",
        "unique",
    ),
    ("site-name-all", f"clouds:\n  all: {GOOD_CLOUD}\n", "clouds.all", "reserved"),
    (
        "duplicate-yaml-key",
        "stores:\n  archive: {type: directory, path: /a}\n  archive: {type: directory, path: /b}\n",
        "stores.archive",
        "duplicate key",
    ),
    (
        "rule-undefined-cloud",
        f"clouds:\n  uvic: {GOOD_CLOUD}\n  cybera: {GOOD_CLOUD}\n"
        "images:\n  - name: x\n    clouds: [cybera, uvc]\n",
        "images[0].clouds[1]",
        "did you mean 'uvic'",
    ),
    (
        "rule-store-as-cloud",
        f"clouds:\n  uvic: {GOOD_CLOUD}\nstores:\n"
        "  archive: {type: directory, path: /srv}\nimages:\n  - name: x\n"
        "    clouds: [uvic, archive]\n",
        "images[0].clouds[1]",
        "'archive' is not a cloud but a store: use store: or stores:",
    ),
    (
        "rule-undefined-store",
        f"clouds:\n  uvic: {GOOD_CLOUD}\nimages:\n  - name: x\n    store: archiv\n",
        "images[0].store",
        "no store named 'archiv'",
    ),
    (
        "rule-no-name",
        "stores:\n  archive: {type: directory, path: /srv}\nimages:\n  - store: archive\n",
        "images[0].name",
        "add it",
    ),
    (
        "rule-empty-name",
        "stores:\n  archive: {type: directory, path: /srv}\nimages:\n"
        "  - name: ''\n    store: archive\n",
        "images[0].name",
        "empty",
    ),
    (
        "rule-bad-glob",
        "stores:\n  archive: {type: directory, path: /srv}\nimages:\n"
        "  - name: 'canfar-[abc'\n    store: archive\n",
        "images[0].name",
        "never closed",
    ),
    (
        "rule-duplicate-pattern",
        "stores:\n  archive: {type: directory, path: /srv}\nimages:\n"
        "  - {name: x, store: archive}\n  - {name: x, store: archive}\n",
        "images[1].name",
        "merge the two rules",
    ),
    (
        "min-copies-text",
        "stores:\n  archive: {type: directory, path: /srv}\nimages:\n"
        "  - {name: x, store: archive, min_copies: two}\n",
        "images[0].min_copies",
        "whole number",
    ),
    (
        "min-copies-too-many",
        "stores:\n  archive: {type: directory, path: /srv}\nimages:\n"
        "  - {name: x, store: archive, min_copies: 3}\n",
        "images[0].min_copies",
        "lower it",
    ),
    (
        "keep-zero",
        "stores:\n  archive: {type: directory, path: /srv}\nimages:\n"
        "  - {name: x, store: archive, keep: 0}\n",
        "images[0].keep",
        "positive",
    ),
    (
        "keep-float",
        "stores:\n  archive: {type: directory, path: /srv}\nimages:\n"
        "  - {name: x, store: archive, keep: 1.5}\n",
        "images[0].keep",
        "positive whole number",
    ),
    (
        "visibility",
        "stores:\n  archive: {type: directory, path: /srv}\nimages:\n"
        "  - {name: x, store: archive, visibility: secret}\n",
        "images[0].visibility",
        "use one of: private, shared, community, public",
    ),
    (
        "retire",
        "stores:\n  archive: {type: directory, path: /srv}\nimages:\n"
        "  - {name: x, store: archive, retire: purge}\n",
        "images[0].retire",
        "use one of: hide, delete",
    ),
    (
        "on-mismatch",
        "stores:\n  archive: {type: directory, path: /srv}\nimages:\n"
        "  - {name: x, store: archive, on_mismatch: ignore}\n",
        "images[0].on_mismatch",
        "use one of: report, replace",
    ),
    (
        "rule-unknown-key",
        "stores:\n  archive: {type: directory, path: /srv}\nimages:\n"
        "  - {name: x, store: archive, keep_versions: 2}\n",
        "images[0].keep_versions",
        "unknown key",
    ),
    (
        "rule-store-and-stores",
        "stores:\n  archive: {type: directory, path: /srv}\nimages:\n"
        "  - {name: x, store: archive, stores: [archive]}\n",
        "images[0].stores",
        "keep one",
    ),
    (
        "images-not-list",
        "stores:\n  archive: {type: directory, path: /srv}\nimages:\n  name: x\n",
        "images",
        "list of rules",
    ),
    (
        "metrics-listen",
        "stores:\n  archive: {type: directory, path: /srv}\nmetrics_listen: 9780\n",
        "metrics_listen",
        "host:port",
    ),
    (
        "metrics-port-range",
        "stores:\n  archive: {type: directory, path: /srv}\nmetrics_listen: 'localhost:99999'\n",
        "metrics_listen",
        "1-65535",
    ),
    (
        "max-transfers-text",
        "stores:\n  archive: {type: directory, path: /srv}\nmax_transfers: four\n",
        "max_transfers",
        "whole number",
    ),
    (
        "log-format",
        "stores:\n  archive: {type: directory, path: /srv}\nlog_format: yaml\n",
        "log_format",
        "use one of: auto, json, console",
    ),
    (
        "poll-interval-too-short",
        "stores:\n  archive: {type: directory, path: /srv}\npoll_interval: 0.001\n",
        "poll_interval",
        "is 0.001s; the allowed range is 1s to 1d",
    ),
    (
        "poll-interval-too-long",
        "stores:\n  archive: {type: directory, path: /srv}\npoll_interval: 30d\n",
        "poll_interval",
        "the allowed range is 1s to 1d",
    ),
    (
        "check-max-age-too-long",
        "stores:\n  archive: {type: directory, path: /srv}\ncheck_max_age: 2d\n",
        "check_max_age",
        "the allowed range is 0s to 1d",
    ),
    (
        "cloud-timeout-too-short",
        f"clouds:\n  a: {GOOD_CLOUD[:-1]}, timeout: 0.01}}\n",
        "clouds.a.timeout",
        "the allowed range is 1s to 1h",
    ),
    (
        "max-transfers-too-many",
        "stores:\n  archive: {type: directory, path: /srv}\nmax_transfers: 100000\n",
        "max_transfers",
        "the allowed range is 1 to 64",
    ),
    (
        "store-max-transfers-too-many",
        "stores:\n  archive: {type: directory, path: /srv, max_transfers: 1000}\n",
        "stores.archive.max_transfers",
        "the allowed range is 1 to 64",
    ),
    (
        "transfer-retries-too-many",
        "stores:\n  archive: {type: directory, path: /srv}\ntransfer_retries: 1000\n",
        "transfer_retries",
        "the allowed range is 0 to 20",
    ),
    (
        "metrics-listen-everywhere",
        "stores:\n  archive: {type: directory, path: /srv}\nmetrics_listen: '0.0.0.0:9780'\n",
        "metrics_listen",
        "add `metrics_listen_public: true` if that is meant",
    ),
    (
        "metrics-listen-v6-everywhere",
        "stores:\n  archive: {type: directory, path: /srv}\nmetrics_listen: '[::]:9780'\n",
        "metrics_listen",
        "listen on 127.0.0.1 or [::1]",
    ),
    (
        "metrics-listen-host-name",
        "stores:\n  archive: {type: directory, path: /srv}\nmetrics_listen: 'h.example:9780'\n",
        "metrics_listen",
        "reachable from other hosts",
    ),
    (
        "metrics-listen-public-text",
        "stores:\n  archive: {type: directory, path: /srv}\nmetrics_listen_public: 'yes'\n",
        "metrics_listen_public",
        "write true or false",
    ),
    (
        "misplaced-rule-key",
        "stores:\n  archive: {type: directory, path: /srv}\nvisibility: public\n",
        "visibility",
        "move it under images:",
    ),
    # the sections issues 9, 12 and 13 added, through the same `config check`
    (
        "disk-formats-misspelt",
        CEPH + "    disk_formats: [qcow]\n",
        "clouds.ceph.disk_formats[0]",
        "did you mean 'qcow2'",
    ),
    (
        "disk-formats-twice",
        CEPH + "    disk_formats: [raw, raw]\n",
        "clouds.ceph.disk_formats[1]",
        "remove one",
    ),
    (
        "disk-formats-empty",
        CEPH + "    disk_formats: []\n",
        "clouds.ceph.disk_formats",
        "write a list like [raw]",
    ),
    (
        "disk-formats-mapping",
        CEPH + "    disk_formats: {raw: 1}\n",
        "clouds.ceph.disk_formats",
        "write a list like [raw]",
    ),
    (
        "scratch-size-words",
        CEPH + "conversion: {scratch_max_size: lots}\n",
        "conversion.scratch_max_size",
        "20G",
    ),
    (
        "scratch-size-tiny",
        CEPH + "conversion: {scratch_max_size: 10}\n",
        "conversion.scratch_max_size",
        "at least 1M",
    ),
    (
        "scratch-misspelt",
        CEPH + "conversion: {scratch: /x}\n",
        "conversion.scratch",
        "did you mean 'scratch_dir'",
    ),
    ("coordination-no-url", COORDINATED + "  lease_timeout: 5s\n", "coordination", "has no url"),
    (
        "coordination-url-scheme",
        COORDINATED + "  url: etcd://x:1\n",
        "coordination.url",
        "etcd3+http",
    ),
    (
        "coordination-lease-short",
        COORDINATED + "  url: etcd3+http://h:1\n  lease_timeout: 1s\n",
        "coordination.lease_timeout",
        "range",
    ),
    (
        "coordination-member-id",
        COORDINATED + "  url: etcd3+http://h:1\n  member_id: 'a b'\n",
        "coordination.member_id",
        "member id",
    ),
    (
        "coordination-unknown-key",
        COORDINATED + "  url: etcd3+http://h:1\n  ttl: 3\n",
        "coordination.ttl",
        "unknown key",
    ),
    (
        "vospace-container-path",
        VAULT + "    container: /canfar/images\n",
        "stores.vault.container",
        "vos://AUTHORITY~SERVICE",
    ),
    (
        "vospace-container-bare",
        VAULT + "    container: vos://a~b\n",
        "stores.vault.container",
        "a path under",
    ),
    (
        "vospace-token-missing",
        VAULT + "    container: vos://a~b/c\n    token_file: /nonexistent/t\n",
        "stores.vault.token_file",
        "is not a file",
    ),
    (
        "vospace-resource-id",
        VAULT + "    container: vos://a~b/c\n    resource_id: cadc/vault\n",
        "stores.vault.resource_id",
        "ivo://AUTHORITY/SERVICE",
    ),
    (
        "vospace-url-and-id",
        VAULT + "    container: vos://a~b/c\n    url: https://x/v\n    resource_id: ivo://a/b\n",
        "stores.vault.resource_id",
        "not both",
    ),
]


@pytest.fixture
def clouds_yaml(tmp_path: Path) -> Path:
    p = tmp_path / "clouds.yaml"
    p.write_text(CLOUDS_YAML)
    return p


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("IMAGESYNC_CONFIG", "OS_CLIENT_CONFIG_FILE", "OS_CLIENT_SECURE_FILE", "OS_CLOUD"):
        monkeypatch.delenv(var, raising=False)


def _write(tmp_path: Path, text: str, clouds_yaml: Path) -> Path:
    path = tmp_path / "imagesync.yaml"
    path.write_text(text.replace("{clouds_yaml}", str(clouds_yaml)))
    return path


def _assert_one_error(err: str, path: Path, key: str, fix: str) -> None:
    assert "Traceback" not in err
    assert err.startswith("imagesync: error: "), err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert str(path) in err, err
    if key:
        assert f": {key}: " in err, err
    assert fix in err, err


def _config_check_fails(path: Path, capsys: pytest.CaptureFixture[str], key: str, fix: str) -> None:
    """``config check`` of ``path`` exits 2 with one clear error line and prints nothing else."""
    assert main(["-c", str(path), "config", "check"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    _assert_one_error(err, path, key, fix)


@pytest.mark.parametrize(("text", "key", "fix"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_config_is_one_clear_error(
    tmp_path: Path,
    clouds_yaml: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    key: str,
    fix: str,
) -> None:
    path = _write(tmp_path, text, clouds_yaml)
    _config_check_fails(path, capsys, key, fix)


def test_there_are_enough_distinct_bad_configurations() -> None:
    assert len({c[0] for c in BAD}) == len(BAD) >= 18


@pytest.mark.parametrize(
    ("setup", "fix"),
    [
        ("missing", "file not found"),
        ("directory", "is a directory"),
        ("empty", "the file is empty"),
        ("not-utf8", "UTF-8"),
        ("bad-yaml", "invalid YAML at line 3, column"),
    ],
)
def test_unusable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, fix: str
) -> None:
    path = tmp_path / "imagesync.yaml"
    if setup == "directory":
        path.mkdir()
    elif setup == "empty":
        path.write_text("")
    elif setup == "not-utf8":
        path.write_bytes(b"clouds: {}\nstores: {a: {type: directory, path: /\xff}}\n")
    elif setup == "bad-yaml":
        path.write_text("clouds:\n  a:\n    auth: x: y\n")
    _config_check_fails(path, capsys, "", fix)


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode"
)
def test_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "imagesync.yaml"
    path.write_text("stores: {}\n")
    path.chmod(0)
    _config_check_fails(path, capsys, "", "permission denied")


def test_error_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "imagesync.yaml"
    path.write_text(
        "stores:\n  archive: {type: directory, path: /srv}\nimages:\n"
        "  - name: a\n    store: archive\n  - name: b\n    retire: purge\n"
        "    store: archive\n"
    )
    assert main(["-c", str(path), "config", "check"]) == 2
    assert f"{path}:7: images[1].retire: " in capsys.readouterr().err


def _run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("IMAGESYNC_CONFIG", "OS_CLIENT_CONFIG_FILE", "OS_CLOUD")
    }
    return subprocess.run(
        [sys.executable, "-m", "imagesync.cli", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    "case",
    [
        "duration-words",
        "auth-no-auth-url",
        "rule-undefined-cloud",
        "clouds-yaml-entry-missing",
        "directory-relative",
    ],
)
def test_bad_config_in_a_real_process(tmp_path: Path, clouds_yaml: Path, case: str) -> None:
    _, text, key, fix = next(c for c in BAD if c[0] == case)
    path = _write(tmp_path, text, clouds_yaml)
    proc = _run("-c", str(path), "config", "check")
    assert proc.returncode == 2
    assert proc.stdout == ""
    _assert_one_error(proc.stderr, path, key, fix)


STORE = "stores: {x: {type: directory, path: /srv}}\n"
# "billion laughs": 9 lines whose aliases expand to 9**9 (387 million) strings; before the
# bound, 7 levels (4.8 million) took 19 s and each level multiplies that by 9
ALIAS_BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(
        f"{b}: &{b} [{','.join([f'*{a}'] * 9)}]\n"
        for a, b in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + STORE
)
# the same through merge keys: PyYAML's constructor concatenates the merged pairs
MERGE_BOMB = (
    "x-a: &a {"
    + ", ".join(f"k{i}: {i}" for i in range(9))
    + "}\n"
    + "".join(
        f"x-{b}: &{b} {{<<: [{', '.join([f'*{a}'] * 9)}]}}\n"
        for a, b in zip("abcdef", "bcdefg", strict=True)
    )
    + STORE
)
# (id, file text, key path named (a prefix), a fragment of the fix)
HOSTILE = [
    ("alias-bomb", ALIAS_BOMB, "f[", "expands to more than 100000 values"),
    ("merge-bomb", MERGE_BOMB, "x-", "expands to more than 100000 values"),
    ("recursive-alias", "x-loop: &loop [1, *loop]\n" + STORE, "x-loop", "recursive"),
    ("deep-flow-list", "x-deep: " + "[" * 3000 + "]" * 3000 + "\n" + STORE, "x-deep[0][0]…", "64"),
    (
        "deep-flow-map",
        "x-deep: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n" + STORE,
        "x-deep.a.a…",
        "64",
    ),
    ("deep-block-list", "x-deep:\n  " + "- " * 3000 + "1\n" + STORE, "x-deep[0][0]…", "64"),
    ("huge-file", STORE + "# padding\n" * 30000, "", "larger than 256 KiB"),
    ("poll-interval-tiny", "poll_interval: 0.001\n" + STORE, "poll_interval", "1s to 1d"),
    ("metrics-public", "metrics_listen: 0.0.0.0:9780\n" + STORE, "metrics_listen", "public: true"),
]


@pytest.mark.parametrize(
    ("text", "key", "fix"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE]
)
def test_hostile_config_fails_fast_in_a_real_process(
    tmp_path: Path, text: str, key: str, fix: str
) -> None:
    """Exit 2 with one line, not a hang (the alias bombs took minutes) or a RecursionError.

    The subprocess timeout is the bound: far above a healthy run (well under a second of
    work) and far below the minutes a hang takes, so it cannot flake on a loaded machine.
    """
    path = tmp_path / "imagesync.yaml"
    path.write_text(text)
    proc = _run("-c", str(path), "config", "check", timeout=30)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout == ""
    _assert_one_error(proc.stderr, path, "", fix)
    if key:
        assert re.search(rf"{re.escape(str(path))}:\d+: {re.escape(key)}", proc.stderr), proc.stderr


def test_config_path_from_environment_in_a_real_process(tmp_path: Path) -> None:
    path = tmp_path / "from-env.yaml"
    path.write_text("stores:\n  archive: {type: directory, path: /srv}\n")
    proc = _run("config", "check", env={"IMAGESYNC_CONFIG": str(path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{path}: ok (0 clouds, 1 stores, 0 image rules)")
    assert proc.stderr == ""


SECRETS = ("inline-Password-9876", "AppCred-Secret-5432", "clouds-yaml-Secret-42")


def _secret_config(tmp_path: Path, clouds_yaml: Path, auth_url: str) -> Path:
    path = tmp_path / "imagesync.yaml"
    path.write_text(f"""\
clouds_yaml: {clouds_yaml}
clouds:
  cybera:
    cloud: cybera
  pw:
    auth:
      auth_url: {auth_url}
      username: someone
      password: {SECRETS[0]}
      project_name: proj
  appcred:
    auth:
      auth_url: {auth_url}
      application_credential_id: 0123abcd
      application_credential_secret: {SECRETS[1]}
stores:
  archive: {{type: directory, path: {tmp_path}}}
images:
  - name: canfar-batch-*
    store: archive
""")
    return path


def test_config_show_masks_every_secret(
    tmp_path: Path, clouds_yaml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _secret_config(tmp_path, clouds_yaml, "http://127.0.0.1:1/v3")
    assert main(["-c", str(path), "config", "show"]) == 0
    out, err = capsys.readouterr()
    for secret in SECRETS:
        assert secret not in out + err
    assert out.count(": '********'") == 3
    assert "application_credential_id: 0123abcd" in out  # ids are not secrets
    assert "clouds: [cybera, pw, appcred]" in out  # `clouds: all` by default, expanded


def test_config_check_connect_fails_cleanly_without_secrets(
    tmp_path: Path, clouds_yaml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clouds_yaml.write_text(
        CLOUDS_YAML.replace("https://keystone.cybera.example:5000/v3", "http://127.0.0.1:1/v3")
    )
    path = _secret_config(tmp_path, clouds_yaml, "http://127.0.0.1:1/v3")
    assert main(["-c", str(path), "config", "check", "--connect"]) == 1
    out, err = capsys.readouterr()
    for secret in SECRETS:
        assert secret not in out + err
    assert "Traceback" not in out + err
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == f"{path}: ok (3 clouds, 1 stores, 1 image rules)"
    for cloud in ("cybera", "pw", "appcred"):
        assert f"  {cloud}: FAILED - cannot connect to http://127.0.0.1:1/v3" in lines
    assert f"  archive: ok - writable directory {tmp_path}" in lines


def test_config_check_connect_in_a_real_process(tmp_path: Path, clouds_yaml: Path) -> None:
    path = _secret_config(tmp_path, clouds_yaml, "http://127.0.0.1:1/v3")
    proc = _run("-c", str(path), "config", "check", "--connect")
    assert proc.returncode == 1
    for secret in SECRETS:
        assert secret not in proc.stdout + proc.stderr
    assert "pw: FAILED - cannot connect to http://127.0.0.1:1/v3" in proc.stdout
    assert proc.stderr == ""


@pytest.mark.parametrize(
    "argv",
    [["lab", "up", "--clouds", "0"], ["lab", "up", "--clouds", "x"], ["history", "--limit", "-1"]],
)
def test_bad_counts_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("at least 1" in err or "whole number" in err)


def test_check_answers_from_recorded_state_without_openstack_libraries(
    tmp_path: Path, clouds_yaml: Path
) -> None:
    # `imagesync check` runs before every boot: answering from the state database must not
    # import keystoneauth1 or openstacksdk (0.1-0.5 s), nor read clouds.yaml, for an account
    # that cannot read the credentials (the scheduler deployment README describes; one that
    # can has the recorded id confirmed by one GET, which needs them: see test_check.py).
    from imagesync.state import RecordedCell, State

    del clouds_yaml  # the scheduler account cannot read it: here, it is not there
    clouds_yaml = tmp_path / "unreadable" / "clouds.yaml"

    state_dir = tmp_path / "state"
    State(state_dir).record_cells(
        [
            RecordedCell(
                name="canfar-batch",
                site="cy",
                state="current",
                image_id="img-123",
                version="v1",
                newest="v1",
                sha512=None,
                recorded=time.time(),
            )
        ]
    )
    path = tmp_path / "imagesync.yaml"
    path.write_text(
        f"state_dir: {state_dir}\nclouds_yaml: {clouds_yaml}\nclouds:\n  cy: {{cloud: cybera}}\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "imagesync.cli",
            "-c",
            str(path),
            "check",
            "canfar-batch",
            "--cloud",
            "cy",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (proc.returncode, proc.stdout) == (0, "img-123\n"), proc.stderr
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "imagesync" in imported  # the import log is there to be read
    assert not imported & {"keystoneauth1", "openstack", "glanceclient", "requests"}
