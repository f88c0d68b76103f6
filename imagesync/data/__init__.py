"""Files shipped inside the package for operators: the annotated configuration example, the
clouds.yaml it names, and the systemd unit (``imagesync config example|unit`` print them).

A package of its own (not loose files) so that setuptools installs them as package data and
:func:`read` finds them wherever the wheel was installed.
"""

from __future__ import annotations

from importlib.resources import files

#: what ``imagesync config example`` prints; etc/ holds a copy (a unit test keeps them equal)
CONFIG_EXAMPLE = "imagesync.yaml.example"
CLOUDS_EXAMPLE = "clouds.yaml.example"
#: what ``imagesync config unit`` prints; systemd/ holds a copy
SYSTEMD_UNIT = "imagesync.service"


def read(name: str) -> str:
    """The text of one shipped file."""
    return files(__name__).joinpath(name).read_text(encoding="utf-8")
