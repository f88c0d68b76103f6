"""`type: vospace` stores in the configuration: the container URI, how the service is found,
credentials from files only, and what `config show` prints."""

from __future__ import annotations

from pathlib import Path

from imagesync.config.load import load_config
from imagesync.config.render import render_config
from imagesync.config.types import CADC_REGISTRY


def _load(tmp_path: Path, store: str) -> Path:
    path = tmp_path / "imagesync.yaml"
    path.write_text(f"stores:\n  vault:\n    type: vospace\n{store}")
    return path


def test_the_service_is_the_containers_resource_id_in_cadcs_registry(tmp_path: Path) -> None:
    cert = tmp_path / "cadcproxy.pem"
    cert.write_text("PEM")
    cfg = load_config(
        _load(
            tmp_path,
            f"    container: vos://cadc.nrc.ca!vault/canfar/images/\n    certificate: {cert}\n",
        )
    )
    vo = cfg.stores["vault"].vospace
    assert vo is not None
    assert vo.container == "vos://cadc.nrc.ca~vault/canfar/images"  # ! read as ~, no slash
    assert vo.authority_resource_id == "ivo://cadc.nrc.ca/vault"
    assert vo.registry == CADC_REGISTRY and vo.capabilities_url is None
    assert vo.certificate == cert


def test_a_base_url_gets_capabilities_added(tmp_path: Path) -> None:
    cfg = load_config(
        _load(tmp_path, "    container: vos://a~b/c\n    url: https://vo.example/vault/\n")
    )
    vo = cfg.stores["vault"].vospace
    assert vo is not None and vo.capabilities_url == "https://vo.example/vault/capabilities"


def test_show_never_prints_the_token_and_reads_back(tmp_path: Path) -> None:
    token = tmp_path / "vault.token"
    token.write_text("bearer-Secret-77\n")
    cfg = load_config(_load(tmp_path, f"    container: vos://a~b/c\n    token_file: {token}\n"))
    shown = render_config(cfg)
    assert "token_file:" in shown and "Secret" not in shown  # (a secret-named key: masked)
    cert = tmp_path / "cadcproxy.pem"
    cert.write_text("PEM")
    cfg = load_config(_load(tmp_path, f"    container: vos://a~b/c\n    certificate: {cert}\n"))
    shown = render_config(cfg)
    assert f"registry: {CADC_REGISTRY}" in shown and f"certificate: {cert}" in shown
    again = tmp_path / "again.yaml"
    again.write_text(shown)
    assert load_config(again).stores == cfg.stores  # what show prints reads back the same
