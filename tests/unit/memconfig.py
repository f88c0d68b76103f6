"""The configuration the engine and daemon unit tests run on: in-memory sites, no clouds.

One home for the ``Config`` those tests build by hand (the sites come in through
``Engine(config, sites=...)``), so a new required field is added here once.
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
