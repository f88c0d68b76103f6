"""The registry of site kinds: what ``open_site`` builds, and what the config may accept."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from imagesync.config.types import Config, StoreConfig, VOSpaceConfig
from imagesync.errors import ConfigError, UsageError
from imagesync.sites import KINDS, open_site, store_kinds
from imagesync.sites.directory import DirectorySite
from imagesync.sites.vospace import VOSpaceSite


def _config(tmp_path: Path, *stores: StoreConfig) -> Config:
    return Config(
        path=tmp_path / "imagesync.yaml",
        state_dir=tmp_path,
        poll_interval=60,
        clouds={},
        images=(),
        stores={s.name: s for s in stores},
    )


def test_only_kinds_that_are_built_are_offered() -> None:
    assert store_kinds() == frozenset({"directory", "vospace"})
    assert {k.name for k in KINDS.values() if k.section == "clouds"} == {"glance"}


def test_open_site_builds_a_store_from_its_kind(tmp_path: Path) -> None:
    site = open_site(
        _config(tmp_path, StoreConfig("archive", "directory", path=tmp_path)), "archive"
    )
    assert isinstance(site, DirectorySite) and site.name == "archive"


def test_open_site_builds_a_vospace_store(tmp_path: Path) -> None:
    vo = VOSpaceConfig(container="vos://example.org~store/images", capabilities_url="http://x/c")
    site = open_site(_config(tmp_path, StoreConfig("vo", "vospace", vospace=vo)), "vo")
    assert isinstance(site, VOSpaceSite) and site.name == "vo" and site.kind == "vospace"
    site.close()


def test_a_kind_that_is_not_built_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    # a hand-built Config naming a kind the registry does not build (the loader refuses it)
    config = _config(tmp_path, StoreConfig("vo", cast(Any, "s3")))
    with pytest.raises(
        ConfigError,
        match=r"stores\.vo\.type: store type 's3' is not "
        r"supported \(supported: directory, vospace\)",
    ):
        open_site(config, "vo")


def test_an_unknown_site_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no cloud or store called 'x'"):
        open_site(_config(tmp_path), "x")
