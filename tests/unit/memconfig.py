"""The configuration the engine and daemon unit tests run on: in-memory sites, no clouds.

One home for the ``Config`` those tests build by hand (the sites come in through
``Engine(config, sites=...)``), so a new required field is added here once; and for the
``clouds.yaml`` entry the configuration tests read (:func:`cybera_clouds_yaml`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from imagesync.config.types import Config, ImageRule


def memory_config(
    tmp_path: Path,
    sites: Iterable[str],
    *,
    rule: Mapping[str, Any] | None = None,
    state: str = "state",
    poll_interval: float = 60,
    transfer_retries: int = 1,
    **settings: Any,
) -> Config:
    """One rule (``img*`` over every site in ``sites``, with ``rule``'s fields) and ``settings``."""
    return Config(
        path=tmp_path / "imagesync.yaml",
        state_dir=tmp_path / state,
        poll_interval=poll_interval,
        clouds={},
        stores={},
        images=(ImageRule(pattern="img*", clouds=tuple(sites), **(rule or {})),),
        transfer_retries=transfer_retries,
        **settings,
    )


def cybera_clouds_yaml(password: str, more: str = "") -> str:
    """A clouds.yaml whose entry ``cybera`` logs in with ``password`` (a secret the tests
    look for in what is printed); ``more`` is the rest of the entry, then more entries."""
    return f"""\
clouds:
  cybera:
    auth:
      auth_url: https://keystone.cybera.example:5000/v3
      username: alice
      password: {password}
      project_name: canfar
{more}"""
