"""imagesync's provenance marks, as the unit tests put them on the records they build.

A copy carries its original (``site:id``), the original's version time and, when known, its
sha512; one home for that shape, so that a test's record looks like what a sync writes.
"""

from __future__ import annotations

from datetime import datetime

from imagesync.model import PROP_ORIGIN, PROP_SHA512, PROP_VERSION, format_time


def copy_marks(origin: str, version: datetime, sha512: str | None = None) -> dict[str, str]:
    """The properties of a copy of ``origin`` (``site:id``) made from its ``version``."""
    marks = {PROP_ORIGIN: origin, PROP_VERSION: format_time(version)}
    if sha512 is not None:
        marks[PROP_SHA512] = sha512
    return marks
