"""Configuration loading: defaults, durations, rules, clouds.yaml resolution, rendering."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagesync import logs
from imagesync.config import document
from imagesync.config.load import load_config, resolve_config_path
from imagesync.config.render import render_config
from imagesync.config.types import (
    DEFAULT_CONFIG_PATH,
    CloudConfig,
    Config,
    ImageRule,
    StoreConfig,
    format_duration,
    parse_duration,
)
from imagesync.errors import ConfigError
from imagesync.sites.probe import check_connections
from tests.unit.memconfig import cybera_clouds_yaml

#: the example `imagesync config example` prints (etc/ holds a copy: test_cli_output)
EXAMPLE = Path(__file__).resolve().parents[2] / "imagesync" / "data" / "imagesync.yaml.example"
CLOUDS_YAML = cybera_clouds_yaml(
    "cybera-Secret-77",
    """\
      user_domain_name: Default
      project_domain_name: Default
    region_name: Calgary
    interface: internal
    api_timeout: 30
    image_endpoint_override: https://glance.cybera.example:9292
  multi:
    regions: [East, West]
    auth:
      auth_url: https://keystone.multi.example/v3
      application_credential_id: mid
      application_credential_secret: multi-Secret-88
    auth_type: v3applicationcredential
""",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("IMAGESYNC_CONFIG", "OS_CLIENT_CONFIG_FILE", "OS_CLIENT_SECURE_FILE", "OS_CLOUD"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def clouds_yaml(tmp_path: Path) -> Path:
    p = tmp_path / "os" / "clouds.yaml"
    p.parent.mkdir()
    p.write_text(CLOUDS_YAML)
    return p


def write(tmp_path: Path, text: str, name: str = "imagesync.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def inline(name: str = "u", password: str = "pw-123456") -> str:
    return (
        f"{{auth: {{auth_url: 'https://k.example/v3', username: {name}, "
        f"password: {password}, project_name: p}}}}"
    )


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (2.5, 2.5),
        ("45", 45.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("2d", 172800.0),
        ("1d2h3m4s", 93784.0),
        (" 10m ", 600.0),
        ("1h 30m", 5400.0),
        ("1.5h", 5400.0),
        ("0", 0.0),
        ("5M", 300.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        "5 minutes",
        "",
        "m",
        "5x",
        "-5m",
        -1,
        "30m1h",
        "1h1h",
        True,
        None,
        [5],
        "nan",
        float("inf"),
        "5m-",
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r"duration|negative|unit|number"):
        parse_duration(value)


@pytest.mark.parametrize("seconds", [1, 30, 60, 90, 300, 3600, 5400, 86400, 93784, 2.5, 0])
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_format_duration_is_short() -> None:
    assert format_duration(300) == "5m"
    assert format_duration(5400) == "1h30m"
    assert format_duration(600.0) == "10m"


@pytest.mark.parametrize(
    ("key", "value", "read"),
    [
        # durations
        ("poll_interval", "90s", 90.0),
        ("check_max_age", "0", 0.0),
        ("check_max_age", "2m", 120.0),
        # bounds include their ends
        ("poll_interval", "1s", 1.0),
        ("poll_interval", "1d", 86400.0),
        ("check_max_age", "1d", 86400.0),
        ("max_transfers", "64", 64),
        ("transfer_retries", "20", 20),
        ("transfer_retries", "0", 0),
    ],
)
def test_a_top_level_value_is_read(tmp_path: Path, key: str, value: str, read: float) -> None:
    path = write(tmp_path, f"{key}: {value}\nstores: {{a: {{type: directory, path: /srv}}}}\n")
    assert getattr(load_config(path), key) == read


# --------------------------------------------------------------------------- path & defaults


def test_resolve_config_path() -> None:
    assert resolve_config_path(Path("/x.yaml"), {"IMAGESYNC_CONFIG": "/y.yaml"}) == Path("/x.yaml")
    assert resolve_config_path(None, {"IMAGESYNC_CONFIG": "/y.yaml"}) == Path("/y.yaml")
    assert resolve_config_path(None, {"IMAGESYNC_CONFIG": " "}) == DEFAULT_CONFIG_PATH
    assert resolve_config_path(None, {}) == DEFAULT_CONFIG_PATH


def test_config_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "stores: {a: {type: directory, path: /srv}}\n")
    assert load_config(None, env={"IMAGESYNC_CONFIG": str(path)}).path == path
    monkeypatch.setenv("IMAGESYNC_CONFIG", str(path))
    assert load_config().path == path


def test_default_path_is_named_when_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, env={"IMAGESYNC_CONFIG": str(tmp_path / "none.yaml")})
    assert exc.value.file == str(tmp_path / "none.yaml")
    assert "file not found" in str(exc.value)


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, f"clouds:\n  a: {inline()}\n"))
    assert config.state_dir == Path("/var/lib/imagesync")
    assert config.poll_interval == 300.0
    assert config.check_max_age == 600.0
    assert (config.max_transfers, config.transfer_retries) == (4, 3)
    assert (config.log_format, config.log_level, config.metrics_listen) == ("auto", "info", None)
    assert config.stores == {} and config.images == ()
    cloud = config.clouds["a"]
    assert cloud.auth_type == "password"
    assert (cloud.interface, cloud.verify, cloud.timeout, cloud.max_transfers) == (
        "public",
        True,
        60.0,
        2,
    )
    assert cloud.region_name is None and cloud.cloud is None
    # Keystone v3 needs domains for names: Default when not given
    assert cloud.auth["user_domain_name"] == "Default"
    assert cloud.auth["project_domain_name"] == "Default"


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, f"clouds:\n  a: {inline()}\n"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.poll_interval = 1  # type: ignore[misc]


def test_every_key(tmp_path: Path) -> None:
    ca = write(tmp_path, "-----BEGIN CERTIFICATE-----\n", "ca.pem")
    path = write(
        tmp_path,
        f"""\
state_dir: state
poll_interval: 1h30m
max_transfers: 8
transfer_retries: 0
check_max_age: 30s
metrics_listen: '[::1]:9780'
log_format: json
log_level: WARNING
clouds:
  uvic:
    auth_type: v3applicationcredential
    auth:
      auth_url: https://keystone.uvic.example:5000/v3
      application_credential_name: isync
      application_credential_secret: uvic-Secret-99
      username: canfar
      user_domain_id: default
    region_name: RegionOne
    interface: internal
    verify: {ca.name}
    timeout: 2m
    max_transfers: 3
    endpoint_override: https://glance.uvic.example:9292/
stores:
  archive: {{type: directory, path: /srv/imagesync, max_transfers: 5}}
images:
  - name: exact
    clouds: [uvic]
    stores: [archive]
    visibility: public
    min_copies: 2
    keep: 2
    retire: delete
    on_mismatch: replace
""",
    )
    config = load_config(path)
    assert config.state_dir == tmp_path / "state"
    assert config.poll_interval == 5400.0 and config.check_max_age == 30.0
    assert (config.max_transfers, config.transfer_retries) == (8, 0)
    assert config.metrics_listen == "[::1]:9780"
    assert (config.log_format, config.log_level) == ("json", "warning")
    assert config.clouds["uvic"] == CloudConfig(
        name="uvic",
        auth_type="v3applicationcredential",
        auth={
            "auth_url": "https://keystone.uvic.example:5000/v3",
            "application_credential_name": "isync",
            "application_credential_secret": "uvic-Secret-99",
            "username": "canfar",
            "user_domain_id": "default",
        },
        region_name="RegionOne",
        interface="internal",
        verify=str(ca),
        timeout=120.0,
        max_transfers=3,
        endpoint_override="https://glance.uvic.example:9292/",
    )
    assert config.stores["archive"] == StoreConfig(
        name="archive", type="directory", path=Path("/srv/imagesync"), max_transfers=5
    )
    assert config.images == (
        ImageRule(
            pattern="exact",
            clouds=("uvic",),
            stores=("archive",),
            visibility="public",
            min_copies=2,
            keep=2,
            retire="delete",
            on_mismatch="replace",
        ),
    )


def test_auth_type_follows_the_credentials(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
clouds:
  ac: {auth: {auth_url: 'https://k/v3', application_credential_id: i,
              application_credential_secret: app-Secret-1}}
  tok: {auth: {auth_url: 'https://k/v3', token: tok-Secret-1, project_id: p}}
  pw: {auth: {auth_url: 'https://k/v3', user_id: u, password: pw-Secret-1, project_id: p}}
""",
    )
    clouds = load_config(path).clouds
    assert clouds["ac"].auth_type == "v3applicationcredential"
    assert clouds["tok"].auth_type == "token"
    assert clouds["pw"].auth_type == "password"
    assert "user_domain_name" not in clouds["pw"].auth  # user_id needs no domain


def test_relative_paths_follow_the_config_file(tmp_path: Path, clouds_yaml: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    path = write(
        sub, "clouds_yaml: ../os/clouds.yaml\nstate_dir: ../state\nclouds:\n  cy: {cloud: cybera}\n"
    )
    config = load_config(path)
    assert config.state_dir == tmp_path / "state"
    assert config.clouds["cy"].cloud == "cybera"


def test_yaml_anchors_under_x_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
x-auth: &auth {auth_url: 'https://k/v3', username: u, password: anchor-Secret, project_name: p}
clouds:
  a: {auth: *auth}
  b: {auth: {<<: *auth, project_name: other}}
""",
    )
    clouds = load_config(path).clouds
    assert clouds["a"].auth["project_name"] == "p"
    assert clouds["b"].auth["project_name"] == "other"


def test_error_carries_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "stores:\n  a: {type: directory, path: rel}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.file == str(path)
    assert exc.value.key == "stores.a.path"
    assert str(exc.value).startswith(f"{path}:2: stores.a.path: ")


def test_odd_names_are_quoted_in_key_paths(tmp_path: Path) -> None:
    path = write(tmp_path, "stores:\n  a: {type: directory, path: /srv, 'max transfers': 1}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.key == 'stores.a["max transfers"]'


# --------------------------------------------------------------------------- rules

RULES = """\
clouds:
  cybera: {c}
  uvic: {c}
  arbutus: {c}
stores:
  archive: {{type: directory, path: /srv/a}}
  backup: {{type: directory, path: /srv/b}}
images:
  - name: canfar-batch-*
  - name: canfar-batch-special
    clouds: [uvic]
    store: archive
  - name: canfar-*
    clouds: all
    stores: [archive, backup]
  - name: stores-only
    clouds: []
    store: backup
  - name: one-cloud
    clouds: arbutus
"""


def test_clouds_all_expands_in_order(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, RULES.format(c=inline())))
    everything = ("cybera", "uvic", "arbutus")
    assert config.images[0].clouds == everything and config.images[0].stores == ()
    assert config.images[2].clouds == everything
    assert config.images[2].stores == ("archive", "backup")
    assert config.images[2].sites == (*everything, "archive", "backup")
    assert config.images[1].clouds == ("uvic",) and config.images[1].stores == ("archive",)
    assert config.images[3].sites == ("backup",)
    assert config.images[4].clouds == ("arbutus",)
    assert config.site_names == (*everything, "archive", "backup")


def test_rule_for_prefers_exact_names(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, RULES.format(c=inline())))
    special = config.rule_for("canfar-batch-special")
    assert special is not None and special.pattern == "canfar-batch-special"
    batch = config.rule_for("canfar-batch-7")
    assert batch is not None and batch.pattern == "canfar-batch-*"  # first glob wins
    other = config.rule_for("canfar-ubuntu")
    assert other is not None and other.pattern == "canfar-*"
    assert config.rule_for("centos-7") is None


# --------------------------------------------------------------------------- clouds.yaml


def test_clouds_yaml_key(tmp_path: Path, clouds_yaml: Path) -> None:
    path = write(
        tmp_path,
        f"clouds_yaml: {clouds_yaml}\nclouds:\n  cy: {{cloud: cybera}}\n"
        "  east: {cloud: multi, region_name: East, timeout: 5s}\n"
        "  west: {cloud: multi, region_name: West, interface: admin, verify: false}\n",
    )
    clouds = load_config(path).clouds
    cy = clouds["cy"]
    assert cy.cloud == "cybera"
    assert cy.auth_type == "password"
    assert cy.auth["password"] == "cybera-Secret-77"
    assert cy.auth["auth_url"] == "https://keystone.cybera.example:5000/v3"
    assert (cy.region_name, cy.interface, cy.timeout, cy.verify) == (
        "Calgary",
        "internal",
        30.0,
        True,
    )
    assert cy.endpoint_override == "https://glance.cybera.example:9292"
    east, west = clouds["east"], clouds["west"]
    assert east.endpoint_override is None
    assert east.auth_type == "v3applicationcredential"
    assert (east.region_name, east.timeout) == ("East", 5.0)
    assert (west.region_name, west.interface, west.verify) == ("West", "admin", False)


def test_os_client_config_file(
    tmp_path: Path, clouds_yaml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "clouds:\n  cy: {cloud: cybera}\n")
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds_yaml))
    assert load_config(path).clouds["cy"].auth["username"] == "alice"
    monkeypatch.delenv("OS_CLIENT_CONFIG_FILE")
    # the env argument is what is read, not the process environment
    config = load_config(path, env={"OS_CLIENT_CONFIG_FILE": str(clouds_yaml)})
    assert config.clouds["cy"].region_name == "Calgary"


def test_clouds_yaml_entry_missing_lists_entries(tmp_path: Path, clouds_yaml: Path) -> None:
    path = write(tmp_path, "clouds:\n  cy: {cloud: cybra}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={"OS_CLIENT_CONFIG_FILE": str(clouds_yaml)})
    msg = str(exc.value)
    assert exc.value.key == "clouds.cy.cloud"
    assert "did you mean 'cybera'?" in msg
    assert "entries there: cybera, multi" in msg
    assert f"$OS_CLIENT_CONFIG_FILE={clouds_yaml}" in msg  # the files searched


def test_clouds_yaml_bad_region(tmp_path: Path, clouds_yaml: Path) -> None:
    path = write(
        tmp_path,
        f"clouds_yaml: {clouds_yaml}\nclouds:\n  m: {{cloud: multi, region_name: North}}\n",
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.key == "clouds.m.cloud"
    assert "North" in str(exc.value) and "East" in str(exc.value)


def test_clouds_yaml_unparsable(tmp_path: Path) -> None:
    broken = write(tmp_path, "clouds:\n  cybera: {auth: {auth_url: x\n", "clouds.yaml")
    path = write(tmp_path, "clouds_yaml: clouds.yaml\nclouds:\n  cy: {cloud: cybera}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert f"{broken} is not valid YAML" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_secure_yaml_beside_clouds_yaml(tmp_path: Path) -> None:
    write(
        tmp_path,
        "clouds:\n  c:\n    auth: {auth_url: 'https://k/v3', username: u, project_name: p}\n",
        "clouds.yaml",
    )
    write(tmp_path, "clouds:\n  c:\n    auth: {password: secure-Secret-6}\n", "secure.yaml")
    path = write(tmp_path, "clouds_yaml: clouds.yaml\nclouds:\n  c: {cloud: c}\n")
    assert load_config(path).clouds["c"].auth["password"] == "secure-Secret-6"


def test_clouds_yaml_entry_without_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        tmp_path,
        "clouds:\n  nopw:\n    auth: {auth_url: 'https://k/v3', username: u, project_name: p}\n",
        "clouds.yaml",
    )
    path = write(tmp_path, "clouds_yaml: clouds.yaml\nclouds:\n  x: {cloud: nopw}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.key == "clouds.x.cloud"
    assert "password missing" in str(exc.value)
    assert capsys.readouterr() == ("", "")  # openstacksdk printed nothing


def test_example_file_loads(tmp_path: Path) -> None:
    # installed as documented: the clouds.yaml it names (`clouds_yaml: clouds.yaml`) beside it
    (tmp_path / "clouds.yaml").write_text((EXAMPLE.parent / "clouds.yaml.example").read_text())
    config = load_config(write(tmp_path, EXAMPLE.read_text()))
    assert list(config.clouds) == ["cybera", "uvic"]
    assert config.clouds["cybera"].cloud == "cybera"
    assert config.clouds["uvic"].auth_type == "v3applicationcredential"
    assert list(config.stores) == ["archive"]
    assert config.stores["archive"].path == Path("/srv/imagesync")
    rule = config.rule_for("canfar-batch-2024")
    assert rule is not None
    assert rule.sites == ("cybera", "uvic", "archive")


def test_example_file_documents_every_key() -> None:
    from imagesync.config import types as cfg

    text = EXAMPLE.read_text()
    keys = {*cfg.TOP_KEYS, *cfg.CLOUD_KEYS, *cfg.DIRECTORY_KEYS, *cfg.VOSPACE_KEYS, *cfg.RULE_KEYS}
    for key in keys:
        assert f"{key}:" in text, key


# --------------------------------------------------------------------------- show, secrets


def test_secrets_are_registered_for_logs(tmp_path: Path, clouds_yaml: Path) -> None:
    logs.forget_secrets()
    path = write(
        tmp_path,
        f"clouds_yaml: {clouds_yaml}\nclouds:\n  cy: {{cloud: cybera}}\n"
        f"  in: {inline(password='inline-Secret-55')}\n",
    )
    load_config(path)
    text = logs.redact("login failed for cybera-Secret-77 and inline-Secret-55")
    assert "Secret" not in text and text.count("********") == 2


def test_render_masks_and_round_trips(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
poll_interval: 90
stores:
  archive: {type: directory, path: /srv/a}
images:
  - {name: 'canfar-*', stores: [archive], keep: 2}
""",
    )
    config = load_config(path)
    text = render_config(config)
    assert "poll_interval: 1m30s" in text
    assert text.startswith(f"# effective configuration of {path}\n")
    data = yaml.safe_load(text)
    again = load_config(write(tmp_path, yaml.safe_dump(data), "again.yaml"))
    assert dataclasses.replace(again, path=config.path) == config


def one_cloud(cloud: CloudConfig, state_dir: Path = Path("/s")) -> Config:
    """A configuration of ``cloud`` alone: no stores, no rules, no file."""
    return Config(
        path=None,
        state_dir=state_dir,
        poll_interval=60,
        stores={},
        images=(),
        clouds={cloud.name: cloud},
    )


def test_render_masks_secrets_by_key_without_registration() -> None:
    logs.forget_secrets()
    config = one_cloud(
        CloudConfig(
            name="c",
            auth_type="token",
            auth={"auth_url": "https://k/v3", "token": "tkn-Value-1", "project_id": "p"},
        )
    )
    text = render_config(config)
    assert "tkn-Value-1" not in text and "token: '********'" in text


# --------------------------------------------------------------------------- connections


def test_check_connections_directory_stores(tmp_path: Path) -> None:
    (tmp_path / "ok").mkdir()
    (tmp_path / "file").write_text("")
    config = Config(
        path=None,
        state_dir=tmp_path,
        poll_interval=60,
        clouds={},
        images=(),
        stores={
            n: StoreConfig(name=n, type="directory", path=tmp_path / n)
            for n in ("ok", "missing", "file")
        },
    )
    results = check_connections(config)
    assert [(n, ok) for n, ok, _ in results] == [("ok", True), ("missing", False), ("file", False)]
    assert "does not exist" in results[1][2]
    assert list((tmp_path / "ok").iterdir()) == []  # the probe file is gone


def test_check_connections_unreachable_cloud(tmp_path: Path) -> None:
    config = one_cloud(
        CloudConfig(
            name="c",
            auth_type="v3applicationcredential",
            timeout=5,
            auth={
                "auth_url": "http://127.0.0.1:1/v3",
                "application_credential_id": "i",
                "application_credential_secret": "unreach-Secret-3",
            },
        ),
        tmp_path,
    )
    [(name, ok, detail)] = check_connections(config)
    assert (name, ok) == ("c", False)
    assert detail == "cannot connect to http://127.0.0.1:1/v3"


def test_the_static_auth_option_table_matches_keystoneauth() -> None:
    from keystoneauth1 import loading

    from imagesync.sites.openstack_auth import KNOWN_AUTH_OPTIONS

    for auth_type, (names, required) in KNOWN_AUTH_OPTIONS.items():
        options = loading.get_plugin_loader(auth_type).get_options()
        assert sorted(names) == sorted(o.dest for o in options), auth_type
        assert sorted(required) == sorted(o.dest for o in options if o.required), auth_type


def test_the_types_import_without_yaml_or_the_sites() -> None:
    # Importing any config submodule runs imagesync/config/__init__.py first: it must stay
    # free of the reader (YAML) and the loader (which reaches into imagesync.sites).
    code = (
        "import sys; import imagesync.config, imagesync.config.types; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('yaml', 'keystoneauth1',"
        " 'openstack') or m.startswith(('imagesync.sites', 'imagesync.config.'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out == "['imagesync.config.types']\n"


def test_alias_expansion_stops_at_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A "billion laughs" file is refused after visiting at most MAX_YAML_NODES values.

    Counted, not timed: every value the reader visits passes through Lines.walk, and so does
    anything the checks later read. (Before the bound the walk went on through 9**9 values.)
    """
    visits = 0
    walk = document.Lines.walk

    def counting(self: document.Lines, node: yaml.Node, *args: Any, **kwargs: Any) -> None:
        nonlocal visits
        visits += 1
        assert visits <= document.MAX_YAML_NODES + 1, "the walk went past the bound"
        walk(self, node, *args, **kwargs)

    monkeypatch.setattr(document.Lines, "walk", counting)
    lols = ", ".join(['"lol"'] * 9)
    text = f"x-a: &a [{lols}]\n" + "".join(
        f"x-{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n"
        for a, b in zip("abcdefgh", "bcdefghi", strict=True)
    )
    path = write(tmp_path, text + "stores: {s: {type: directory, path: /srv}}\n")
    with pytest.raises(ConfigError, match="expands to more than 100000 values"):
        load_config(path)
    assert visits == document.MAX_YAML_NODES + 1


def test_aliases_and_merges_below_the_bounds_still_load(tmp_path: Path) -> None:
    # shared settings by alias, many times over, and nesting a little under the depth bound
    deep = "[" * (document.MAX_YAML_DEPTH - 2) + "1" + "]" * (document.MAX_YAML_DEPTH - 2)
    rules = "".join(f"  - {{<<: *rule, name: img-{i}}}\n" for i in range(200))
    path = write(
        tmp_path,
        f"x-deep: {deep}\nx-rule: &rule {{store: s, keep: 2}}\n"
        f"stores: {{s: {{type: directory, path: /srv}}}}\nimages:\n{rules}",
    )
    config = load_config(path)
    assert len(config.images) == 200 and config.images[-1].keep == 2


def test_nesting_is_bounded_just_past_the_limit(tmp_path: Path) -> None:
    depth = document.MAX_YAML_DEPTH
    path = write(tmp_path, "x-deep: " + "[" * depth + "]" * depth + "\nstores: {}\n")
    with pytest.raises(ConfigError, match=f"nested more than {depth} levels deep") as exc:
        load_config(path)
    assert exc.value.key is not None and exc.value.key.startswith("x-deep[0]")


def test_nesting_through_aliases_is_bounded_too(tmp_path: Path) -> None:
    # each anchor nests 40 levels in the text; through the alias the value nests 80
    path = write(
        tmp_path,
        "x-a: &a " + "[" * 40 + "]" * 40 + "\nx-b: " + "[" * 40 + "*a" + "]" * 40 + "\n"
        "stores: {}\n",
    )
    with pytest.raises(ConfigError, match="nested more than 64 levels deep") as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}:2: x-b[0][0]…: ")


def test_the_file_size_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "imagesync.yaml"
    path.write_bytes(b"stores: {}\n" + b"#" * document.MAX_CONFIG_BYTES)
    with pytest.raises(ConfigError, match="larger than 256 KiB"):
        load_config(path)


def test_a_totp_passcode_is_masked_and_registered(tmp_path: Path) -> None:
    logs.forget_secrets()
    path = write(
        tmp_path,
        "clouds:\n  c:\n    auth_type: v3totp\n    auth:\n      auth_url: 'https://k/v3'\n"
        "      username: u\n      passcode: '918273'\n      project_name: p\n",
    )
    config = load_config(path)
    assert config.clouds["c"].auth["passcode"] == "918273"
    text = render_config(config)
    assert "918273" not in text and "passcode: '********'" in text
    assert logs.redact("keystone refused 918273") == f"keystone refused {logs.MASK}"


@pytest.mark.parametrize(
    ("listen", "public"),
    [
        ("127.0.0.1:9780", False),
        ("127.0.0.5:9780", False),
        ("localhost:9780", False),
        ("'[::1]:9780'", False),
        ("0.0.0.0:9780", True),
        ("'[::]:9780'", True),
        ("192.0.2.10:9780", True),
    ],
)
def test_metrics_listen_beyond_loopback_must_be_meant(
    tmp_path: Path, listen: str, public: bool
) -> None:
    store = "stores: {s: {type: directory, path: /srv}}\n"
    path = write(tmp_path, f"metrics_listen: {listen}\n{store}")
    if public:
        with pytest.raises(ConfigError, match="metrics_listen_public: true") as exc:
            load_config(path)
        assert exc.value.key == "metrics_listen"
        path.write_text(f"metrics_listen: {listen}\nmetrics_listen_public: true\n{store}")
    config = load_config(path)
    assert config.metrics_listen == listen.strip("'")
    assert config.metrics_listen_public is public
    assert f"metrics_listen_public: {str(public).lower()}" in render_config(config)


BOOT_TEST = """
clouds:
  uvic: {c}
  arbutus: {c}
images:
  - name: web
    clouds: [uvic, arbutus]
    boot_test: {bt}
"""


def test_boot_test_is_read_with_a_default_timeout(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BOOT_TEST.format(c=inline(), bt="{cloud: uvic, flavor: m1}")))
    bt = cfg.images[0].boot_test
    assert bt is not None and (bt.cloud, bt.flavor, bt.timeout) == ("uvic", "m1", 300.0)
    text = BOOT_TEST.format(c=inline(), bt="{cloud: arbutus, flavor: m1, timeout: 2m}")
    assert load_config(write(tmp_path, text)).images[0].boot_test.timeout == 120.0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("bt", "key", "says"),
    [
        ("{cloud: elsewhere, flavor: m1}", "boot_test.cloud", "not one of this rule's clouds"),
        ("{cloud: uvic}", "boot_test.flavor", "missing"),
        ("{cloud: uvic, flavor: m1, timeout: 0}", "boot_test.timeout", "zero"),
        ("{cloud: uvic, flavor: m1, size: 3}", "boot_test.size", ""),
    ],
)
def test_boot_test_mistakes_name_the_key(tmp_path: Path, bt: str, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, BOOT_TEST.format(c=inline(), bt=bt)))
    assert exc.value.key is not None and exc.value.key.endswith(key), exc.value.key
    assert says in str(exc.value)
