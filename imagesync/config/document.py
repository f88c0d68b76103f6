"""The line-tracking YAML reader: every value checked here fails as ``FILE:LINE: KEY: what, fix``.

:func:`read_document` parses a configuration file with PyYAML and remembers the line of every
key path (:class:`Lines`), so that a later check can name where the mistake is. A
:class:`Document` wraps the parsed file and offers typed getters (``mapping``, ``string``,
``choice``, ``integer``, ``duration``, ``path``, ``url``…); each raises one
:class:`~imagesync.errors.ConfigError` whose message ends with what to write instead.
Knowing which keys exist and what they mean is the job of :mod:`imagesync.config.load` and
:mod:`imagesync.config.rules`.

The reader is bounded, because the daemon rereads the file on SIGHUP and a hostile or broken
file must fail fast rather than hang it: the file is at most :data:`MAX_CONFIG_BYTES`, nesting
at most :data:`MAX_YAML_DEPTH` levels (PyYAML composes recursively, so deeper input would end
in a ``RecursionError``), and the document, with every alias (``*name``) expanded, at most
:data:`MAX_YAML_NODES` values. YAML aliases share nodes, so eight lines can stand for a
billion values ("billion laughs"); PyYAML builds the shared graph cheaply, but anything that
walks the result (our line tracking first, then every check) pays for the expansion. Counting
while :class:`Lines` walks the expanded tree, before anything else touches it, stops that.
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

from imagesync.config.types import (
    CONFIG_ENV,
    DURATION_HINT,
    describe,
    format_duration,
    parse_duration,
)
from imagesync.errors import ConfigError

#: a configuration of hundreds of clouds and rules is tens of KiB; pure-Python YAML parses
#: roughly 100-500 KiB a second, so this keeps even a rejected file's parse short
MAX_CONFIG_BYTES = 256 * 1024
#: a configuration needs five or six levels; PyYAML's composer recurses about three Python
#: frames per level, so the interpreter's limit (1000) is reached near 300
MAX_YAML_DEPTH = 64
#: values (scalars, lists, mappings) with every alias expanded; a real file has hundreds
MAX_YAML_NODES = 100_000

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


class _OverLimit(Exception):
    """The document is over one of the reader's bounds, or recursive (-> a ConfigError)."""

    def __init__(self, key: str, line: int, message: str) -> None:
        super().__init__(message)
        self.key, self.line, self.message = key, line, message


def _too_deep(key: str, line: int) -> _OverLimit:
    return _OverLimit(
        key,
        line,
        f"nested more than {MAX_YAML_DEPTH} levels deep: a configuration needs a few levels; "
        "flatten it",
    )


class Lines:
    """Where each key path sits in the file (for messages), and duplicate keys (which PyYAML
    silently collapses: the last one wins, which is never what the writer meant).

    :meth:`walk` visits the tree with aliases expanded, so it is also where the expansion is
    bounded: it raises :class:`_OverLimit` past :data:`MAX_YAML_NODES` values, past
    :data:`MAX_YAML_DEPTH` levels (aliases can chain nodes deeper than the text nests), and on
    an alias inside the node it names (a recursive structure, which no setting needs).
    """

    def __init__(self) -> None:
        self.line: dict[str, int] = {}
        self.duplicates: list[tuple[str, int, int]] = []  # key, first line, repeated line
        self._merged: set[str] = set()
        self.visited = 0

    def walk(
        self, node: yaml.Node, prefix: str, stack: tuple[int, ...] = (), merged: bool = False
    ) -> None:
        line = node.start_mark.line + 1
        if id(node) in stack:
            raise _OverLimit(
                prefix or "(top level)",
                line,
                "an alias (*name) refers to a mapping or list that contains it: a recursive "
                "structure never makes a setting; write the values out",
            )
        if len(stack) >= MAX_YAML_DEPTH:
            raise _too_deep(prefix, line)
        self.visited += 1
        if self.visited > MAX_YAML_NODES:
            raise _OverLimit(
                prefix or "(top level)",
                line,
                f"the file expands to more than {MAX_YAML_NODES} values (YAML aliases, *name, "
                "repeat what they name): use fewer aliases, or write the values out",
            )
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

    def integer(self, value: object, key: str, minimum: int, *, maximum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                what = "a positive whole number" if minimum > 0 else "a whole number ≥ 0"
                self.fail(key, f"is {describe(value)}; write {what} like {max(minimum, 1)}")
        if value < minimum:
            what = "positive (1 or more)" if minimum == 1 else f"at least {minimum}"
            self.fail(key, f"is {value}; it must be {what}")
        if maximum is not None and value > maximum:
            self.fail(
                key, f"is {value}; the allowed range is {minimum} to {maximum}: write one in it"
            )
        return value

    def duration(
        self,
        value: object,
        key: str,
        allow_zero: bool = False,
        *,
        within: tuple[float, float] | None = None,
    ) -> float:
        """Seconds; ``within`` is the allowed (low, high) range, both included."""
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.fail(key, f"{exc}: {DURATION_HINT}")
        if seconds == 0 and not allow_zero:
            self.fail(key, f"is zero: {DURATION_HINT}")
        if within is not None and not within[0] <= seconds <= within[1]:
            low, high = (format_duration(s) for s in within)
            self.fail(
                key,
                f"is {format_duration(seconds)}; the allowed range is {low} to {high}: "
                "write a duration in it",
            )
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
        with path.open("rb") as f:
            # read one byte past the bound rather than trust st_size (a pipe or /proc file)
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"larger than {MAX_CONFIG_BYTES // 1024} KiB: this is not a configuration "
                "file (a real one is a few KiB): give the path of the YAML file",
                file=where,
            )
        return data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "file not found: create it (`imagesync config example` prints an annotated "
            f"one), or point -c or ${CONFIG_ENV} at your configuration",
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


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing to compose past :data:`MAX_YAML_DEPTH` levels.

    The composer is the recursive part of PyYAML (the scanner and parser keep explicit
    stacks, the safe constructor defers children through generators), so bounding the depth
    here, where the key path is known, is the one place that prevents ``RecursionError``.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._keys: list[str] = []  # key path of each node being composed, outermost first

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        prefix = self._keys[-1] if self._keys else ""
        if isinstance(index, yaml.ScalarNode):  # a mapping's value, under this key
            key = join(prefix, index.value)
        elif isinstance(index, int) and not isinstance(index, bool):  # a list's item
            key = f"{prefix}[{index}]"  # (the parameter hides this module's index())
        else:  # the document, or a mapping's key
            key = prefix
        if len(self._keys) >= MAX_YAML_DEPTH:
            event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in the stubs
            raise _too_deep(key, event.start_mark.line + 1)
        self._keys.append(key)
        try:
            return super().compose_node(parent, index)
        finally:
            self._keys.pop()


_KEY_PART = re.compile(r'\[(?:"(?:[^"\\]|\\.)*"|\d+)\]|\.?[^.\[]+')


def _outer(key: str, parts: int) -> str:
    """The first ``parts`` parts of a key path."""
    return "".join(_KEY_PART.findall(key)[:parts])


def _over_limit(where: str, exc: _OverLimit, line: int) -> ConfigError:
    # the first parts of the path: enough to find the place, short enough to read
    key = _outer(exc.key, 3)
    key += "…" if key != exc.key else ""
    err = ConfigError(exc.message, file=where, key=key)
    err.args = (f"{where}:{line}: {key}: {exc.message}",)  # as Document.fail does
    return err


def _parse(text: str, where: str, lines: Lines) -> Any:
    loader = _BoundedLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except _OverLimit as exc:  # the composer's line is where the text nests too deep
            raise _over_limit(where, exc, exc.line) from None
        if node is None:
            return None
        try:
            lines.walk(node, "")
        except _OverLimit as exc:
            # the walk's node may be an alias's target, far from the trouble: point at the
            # top-level key whose value expands
            raise _over_limit(where, exc, lines.find(_outer(exc.key, 1)) or exc.line) from None
        return loader.construct_document(node)
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
