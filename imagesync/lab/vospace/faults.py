"""Fault hooks of the lab VOSpace service, switched at run time through a file.

The service re-reads ``DIRECTORY/faults.json`` on every request (a missing file costs one
``stat``), so a test changes the service's behaviour without restarting it, whatever uwsgi
worker answers: ``set_faults(directory, [Fault(...)])`` writes it, ``clear_faults`` removes it.
Rules with ``times`` are used up one request at a time, under a lock shared by the workers.

Faults (each matches an HTTP ``method`` and a ``path`` substring, both optional):

- ``unavailable``: answer 503 with ``Retry-After: <retry_after>`` instead of serving;
- ``slow``: data responses sleep ``delay`` seconds before each chunk;
- ``cut``: a data response closes the connection after ``after_bytes`` bytes of its body;
- ``wrong_digest``: data responses carry a ``Digest`` that does not match the bytes;
- ``corrupt``: data responses serve other bytes (each chunk's first byte flipped), with the
  right length and headers: what a target importing from the URL must catch itself.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from imagesync.lab import procs

FAULTS_FILE = "faults.json"
Kind = Literal["unavailable", "slow", "cut", "wrong_digest", "corrupt"]
KINDS: tuple[Kind, ...] = ("unavailable", "slow", "cut", "wrong_digest", "corrupt")


@dataclass(frozen=True)
class Fault:
    """One rule. ``times=None``: until cleared."""

    fault: Kind
    method: str | None = None
    path: str | None = None
    times: int | None = None
    retry_after: int = 1
    delay: float = 0.1
    after_bytes: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method.upper() == method) and (
            self.path is None or self.path in path
        )


def set_faults(directory: Path, faults: Iterable[Fault]) -> None:
    """Replace the service's fault rules (``directory``: the service's directory)."""
    with _locked(directory):
        _write(directory, list(faults))


def clear_faults(directory: Path) -> None:
    with _locked(directory), contextlib.suppress(FileNotFoundError):
        (directory / FAULTS_FILE).unlink()


#: the kinds that act on a data response only (they are not used up by other requests)
DATA_KINDS: frozenset[Kind] = frozenset({"slow", "cut", "wrong_digest", "corrupt"})


def take(directory: Path, method: str, path: str, *, data: bool) -> dict[Kind, Fault]:
    """The faults that apply to this request (one per kind), using up counted ones.

    ``data``: the request is for a data endpoint (only then do data faults apply).
    """
    if not (directory / FAULTS_FILE).exists():
        return {}
    with _locked(directory):
        rules = _read(directory)
        found: dict[Kind, Fault] = {}
        kept: list[Fault] = []
        changed = False
        for rule in rules:
            applies = data or rule.fault not in DATA_KINDS
            if applies and rule.fault not in found and rule.matches(method, path):
                found[rule.fault] = rule
                if rule.times is not None:
                    changed = True
                    if rule.times > 1:
                        kept.append(_with_times(rule, rule.times - 1))
                    continue
            kept.append(rule)
        if changed:
            _write(directory, kept)
    return found


def _with_times(rule: Fault, times: int) -> Fault:
    return Fault(**{**asdict(rule), "times": times})


def _locked(directory: Path) -> contextlib.AbstractContextManager[None]:
    """The fault file is read and rewritten by the test and by every service worker."""
    return procs.file_lock(directory / ".faults.lock")


def _read(directory: Path) -> list[Fault]:
    try:
        raw = json.loads((directory / FAULTS_FILE).read_text())
    except FileNotFoundError:
        return []
    return [Fault(**r) for r in raw.get("rules", [])]


def _write(directory: Path, rules: list[Fault]) -> None:
    path = directory / FAULTS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"rules": [asdict(r) for r in rules]}, indent=2) + "\n")
    os.replace(tmp, path)


class Corrupting:
    """A data response's body with each chunk's first byte flipped (the ``corrupt`` fault)."""

    def __init__(self, body: Iterable[bytes]) -> None:
        self.body = body

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.body:
            yield bytes([chunk[0] ^ 0xFF]) + chunk[1:] if chunk else chunk

    def close(self) -> None:
        close = getattr(self.body, "close", None)
        if close is not None:
            close()
