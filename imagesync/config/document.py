"""The line-tracking YAML reader: every value checked here fails as ``FILE:LINE: KEY: what, fix``.

:func:`read_document` parses a configuration file with PyYAML and remembers the line of every
key path (:class:`Lines`), so that a later check can name where the mistake is. A
:class:`Document` wraps the parsed file and offers typed getters (``mapping``, ``string``,
``choice``, ``integer``, ``duration``, ``path``, ``url``…); each raises one
:class:`~imagesync.errors.ConfigError` whose message ends with what to write instead.
Knowing which keys exist and what they mean is the job of :mod:`imagesync.config.load` and
:mod:`imagesync.config.rules`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlparse

import yaml

from imagesync.config.types import CONFIG_ENV, DURATION_HINT, describe, parse_duration
from imagesync.errors import ConfigError

_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SIMPLE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def join(prefix: str, name: object) -> str:
    """The key path of ``name`` under ``prefix``: ``clouds.uvic``, ``auth["odd key"]``."""
    text = str(name)
    part = text if _SIMPLE_KEY.fullmatch(text) else f"[{json.dumps(text)}]"
    if not prefix or part.startswith("["):
        return prefix + part
    return f"{prefix}.{part}"


def index(prefix: str, i: int) -> str:
    """The key path of item ``i`` of the list at ``prefix``: ``images[2]``."""
    return f"{prefix}[{i}]"


def suggest(word: str, choices: Iterable[str]) -> str:
    """``did you mean 'x'? `` for the closest of ``choices``, or nothing."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {match[0]!r}? " if match else ""


class Lines:
    """Where each key path sits in the file (for messages), and duplicate keys (which PyYAML
    silently collapses: the last one wins, which is never what the writer meant)."""

    def __init__(self) -> None:
        self.line: dict[str, int] = {}
        self.duplicates: list[tuple[str, int, int]] = []  # key, first line, repeated line
        self._merged: set[str] = set()

    def walk(
        self, node: yaml.Node, prefix: str, stack: tuple[int, ...] = (), merged: bool = False
    ) -> None:
        if id(node) in stack:  # a recursive alias
            return
        stack += (id(node),)
        if isinstance(node, yaml.MappingNode):
            for knode, vnode in node.value:
                if knode.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden
                    self.walk(vnode, prefix, stack, merged=True)
                    continue
                if not isinstance(knode, yaml.ScalarNode):
                    continue
                key = join(prefix, knode.value)
                line = knode.start_mark.line + 1
                if merged:
                    self._merged.add(key)
                elif key in self.line and key not in self._merged:
                    self.duplicates.append((key, self.line[key], line))
                self.line.setdefault(key, line)
                self.walk(vnode, key, stack, merged)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                key = index(prefix, i)
                self.line.setdefault(key, item.start_mark.line + 1)
                self.walk(item, key, stack, merged)

    def find(self, key: str | None) -> int | None:
        while key:
            if key in self.line:
                return self.line[key]
            cut = max(key.rfind("."), key.rfind("["))
            key = key[:cut] if cut > 0 else ""
        return None


class Document:
    """One configuration file being validated: raises errors that name file, line and key."""

    def __init__(self, path: Path, lines: Lines, env: Mapping[str, str]) -> None:
        self.file = path
        self.lines = lines
        self.env = env
        self.base = path.absolute().parent

    def fail(self, key: str | None, message: str, line: int | None = None) -> NoReturn:
        err = ConfigError(message, file=str(self.file), key=key)
        line = line or self.lines.find(key)
        if line is not None:
            # editors jump to FILE:LINE; err.file and err.key stay as given
            err.args = (f"{self.file}:{line}: {key}: {message}",)
        raise err

    # typed getters ------------------------------------------------------------------

    def mapping(self, value: object, key: str, hint: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(key, f"is {describe(value)}; it must be a mapping: {hint}")
        for k in value:
            if not isinstance(k, str):
                self.fail(join(key, k), f"the key {k!r} is not a string: quote it ('{k}')")
        return dict(value)

    def known_keys(
        self,
        value: Mapping[str, Any],
        key: str,
        allowed: Iterable[str],
        elsewhere: Mapping[str, str] | None = None,
    ) -> None:
        allowed = tuple(allowed)
        for k in value:
            if k not in allowed:
                if elsewhere and k in elsewhere:
                    self.fail(join(key, k), f"not a key here: {elsewhere[k]}")
                hint = suggest(k, allowed)
                self.fail(
                    join(key, k),
                    f"unknown key: {hint}remove it or use one of: {', '.join(allowed)}",
                )

    def string(self, value: object, key: str, what: str = "a string") -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.fail(key, f"is {describe(value)}; write {what}")
        text = str(value).strip()
        if not text:
            self.fail(key, f"is empty; write {what}")
        return text

    def choice(self, value: object, key: str, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            shown = repr(value) if isinstance(value, str) else describe(value)
            hint = suggest(value, choices) if isinstance(value, str) else ""
            self.fail(key, f"{shown} is not allowed: {hint}use one of: {', '.join(choices)}")
        return value.strip().lower()

    def integer(self, value: object, key: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                what = "a positive whole number" if minimum > 0 else "a whole number ≥ 0"
                self.fail(key, f"is {describe(value)}; write {what} like {max(minimum, 1)}")
        if value < minimum:
            what = "positive (1 or more)" if minimum == 1 else f"at least {minimum}"
            self.fail(key, f"is {value}; it must be {what}")
        return value

    def duration(self, value: object, key: str, allow_zero: bool = False) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.fail(key, f"{exc}: {DURATION_HINT}")
        if seconds == 0 and not allow_zero:
            self.fail(key, f"is zero: {DURATION_HINT}")
        return seconds

    def path(self, value: object, key: str) -> Path:
        """A path; relative paths are relative to the config file's directory."""
        p = Path(self.string(value, key, "a path")).expanduser()
        return Path(os.path.normpath(p if p.is_absolute() else self.base / p))

    def url(self, value: object, key: str, example: str) -> str:
        """An http(s) URL; ``example`` shows the writer what one looks like."""
        url = self.string(value, key, "a URL")
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            self.fail(key, f"{url!r} is not an http(s) URL: write it like {example}")
        return url

    def verify(self, value: object, key: str) -> bool | str:
        """TLS verification: true/false, or the path of a CA bundle that exists."""
        if isinstance(value, bool):
            return value
        path = self.path(value, key)
        if not path.exists():
            self.fail(
                key, f"CA bundle {path} not found: give the path of a PEM file, or true/false"
            )
        return str(path)

    def site_name(self, name: str, key: str) -> None:
        if name == "all":
            self.fail(key, "'all' is reserved (clouds: all means every cloud): rename the site")
        if not _SITE_NAME.fullmatch(name):
            self.fail(
                key,
                "a site name uses letters, digits, '_', '.' and '-' and starts with a "
                "letter or digit: rename it",
            )


def _read_text(path: Path) -> str:
    where = str(path)
    if path.is_dir():
        raise ConfigError("is a directory, not a file: give the path of the YAML file", file=where)
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "file not found: create it (see etc/imagesync.yaml.example), or point -c or "
            f"${CONFIG_ENV} at your configuration",
            file=where,
        ) from None
    except PermissionError:
        raise ConfigError(
            "cannot read the file (permission denied): make it readable by the "
            "user imagesync runs as",
            file=where,
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not UTF-8 text (byte {exc.start}): save the file as UTF-8", file=where
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", file=where) from None


def _parse(text: str, where: str, lines: Lines) -> Any:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            lines.walk(node, "")
        return loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "cannot parse"
        if exc.context and exc.problem:
            cm = exc.context_mark
            what += f" ({exc.context}{f' at line {cm.line + 1}' if cm else ''})"
        raise ConfigError(
            f"invalid YAML{at}: {what}: fix the syntax (indentation, quotes, a missing ':' or '-')",
            file=where,
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}: fix the syntax", file=where) from None
    finally:
        loader.dispose()


def read_document(path: Path, env: Mapping[str, str]) -> tuple[Any, Document]:
    """The parsed file (plain Python values) and the Document that checks them."""
    lines = Lines()
    data = _parse(_read_text(path), str(path), lines)
    doc = Document(path, lines, env)
    for key, first, again in lines.duplicates:
        doc.fail(
            key,
            f"duplicate key (first at line {first}); YAML would keep only the last: "
            "remove or rename one",
            line=again,
        )
    return data, doc
