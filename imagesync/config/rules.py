"""Image rules as written under ``images:`` → checked :class:`~imagesync.config.types.ImageRule`.

A rule names an image (or a glob), the clouds and stores it must be on, and how to keep it
(visibility, ``min_copies``, ``keep``, ``retire``, ``on_mismatch``). Every reference to a site
is checked against the configured clouds and stores, with a suggestion when a name is close.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, cast

from imagesync.config.document import Document, index, join, suggest
from imagesync.config.types import (
    BOOT_TEST_KEYS,
    ON_MISMATCH,
    RETIRE,
    RULE_KEYS,
    VISIBILITIES,
    BootTest,
    ImageRule,
    describe,
)

_GLOB_EXAMPLE = "'canfar-batch-*'"


def check_pattern(doc: Document, value: object, key: str) -> str:
    """An image name or fnmatch glob that Glance could hold, with its ``[`` sets closed."""
    if not isinstance(value, str):
        doc.fail(
            key,
            f"is {describe(value)}; write the image name or a glob like {_GLOB_EXAMPLE} (quote it)",
        )
    if not value.strip():
        doc.fail(key, f"is empty: write the image name or a glob like {_GLOB_EXAMPLE}")
    if value != value.strip():
        doc.fail(key, f"{value!r} begins or ends with spaces: remove them")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        doc.fail(key, f"{value!r} contains control characters: remove them")
    if len(value) > 255:
        doc.fail(key, "is longer than 255 characters, the longest name Glance accepts")
    i = 0
    while i < len(value):
        if value[i] == "[":
            j = i + 1
            if j < len(value) and value[j] == "!":
                j += 1
            if j < len(value) and value[j] == "]":
                j += 1
            close = value.find("]", j)
            if close < 0:
                doc.fail(
                    key,
                    f"{value!r} has a '[' that is never closed: close the set, or "
                    "write [[] to match a literal '['",
                )
            i = close
        i += 1
    return value


def site_list(
    doc: Document,
    value: object,
    key: str,
    kind: str,
    known: Mapping[str, object],
    other: Mapping[str, object],
    other_key: str,
) -> tuple[str, ...]:
    """Names of ``kind`` ("cloud" or "store") from one name or a list, each known and once."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        doc.fail(key, f"is {describe(value)}; write a list of {kind} names like [a, b]")
    names: list[str] = []
    for i, item in enumerate(items):
        ikey = index(key, i) if not isinstance(value, str) else key
        if not isinstance(item, str):
            doc.fail(ikey, f"is {describe(item)}; write a {kind} name")
        if item not in known:
            if item in other:
                where = (
                    "list it under clouds:" if other_key == "clouds" else "use store: or stores:"
                )
                doc.fail(ikey, f"{item!r} is not a {kind} but a {other_key[:-1]}: {where}")
            choices = list(known)
            doc.fail(
                ikey,
                f"no {kind} named {item!r}: {suggest(item, choices)}"
                f"use one of: {', '.join(choices) or f'(no {kind}s are configured)'}",
            )
        if item in names:
            doc.fail(ikey, f"{item!r} is listed twice: remove one")
        names.append(item)
    return tuple(names)


def _rule_sites(
    doc: Document,
    body: Mapping[str, Any],
    key: str,
    clouds: Mapping[str, object],
    stores: Mapping[str, object],
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(clouds, stores) a rule names; ``clouds:`` defaults to ``all``."""
    raw_clouds = body.get("clouds", "all")
    if raw_clouds == "all":
        rule_clouds = tuple(clouds)
    else:
        rule_clouds = site_list(
            doc, raw_clouds, join(key, "clouds"), "cloud", clouds, stores, "stores"
        )
    if "store" in body and "stores" in body:
        doc.fail(join(key, "stores"), "both store: and stores: are given: keep one")
    rule_stores: tuple[str, ...] = ()
    if "store" in body:
        skey = join(key, "store")
        if not isinstance(body["store"], str):
            doc.fail(
                skey,
                f"is {describe(body['store'])}; store: takes one name (for several "
                "write stores: [a, b])",
            )
        rule_stores = site_list(doc, body["store"], skey, "store", stores, clouds, "clouds")
    elif "stores" in body:
        rule_stores = site_list(
            doc, body["stores"], join(key, "stores"), "store", stores, clouds, "clouds"
        )
    if not rule_clouds + rule_stores:
        doc.fail(key, "names no site: give clouds: (a list, or all) or store:")
    return rule_clouds, rule_stores


def parse_rule(
    doc: Document, raw: object, key: str, clouds: Mapping[str, object], stores: Mapping[str, object]
) -> ImageRule:
    """One entry of ``images:``, checked against the configured ``clouds`` and ``stores``."""
    body = doc.mapping(raw, key, "write `- name: PATTERN` with clouds:/store:")
    if not body:
        doc.fail(key, "is empty: write `- name: PATTERN` with clouds: and store:")
    doc.known_keys(body, key, RULE_KEYS)
    if "name" not in body:
        doc.fail(
            join(key, "name"), f"missing: add it (the image name or a glob like {_GLOB_EXAMPLE})"
        )
    pattern = check_pattern(doc, body["name"], join(key, "name"))
    rule_clouds, rule_stores = _rule_sites(doc, body, key, clouds, stores)
    sites = rule_clouds + rule_stores
    visibility = "private"
    if "visibility" in body:
        visibility = doc.choice(body["visibility"], join(key, "visibility"), VISIBILITIES)
    min_copies = 0
    if "min_copies" in body:
        min_copies = doc.integer(body["min_copies"], join(key, "min_copies"), 0)
        if min_copies > len(sites):
            doc.fail(
                join(key, "min_copies"),
                f"is {min_copies} but the rule names only "
                f"{len(sites)} site(s) ({', '.join(sites)}): lower it or add sites",
            )
    keep = None
    if body.get("keep") is not None:
        keep = doc.integer(body["keep"], join(key, "keep"), 1)
    retire = "hide"
    if "retire" in body:
        retire = doc.choice(body["retire"], join(key, "retire"), RETIRE)
    on_mismatch = "report"
    if "on_mismatch" in body:
        on_mismatch = doc.choice(body["on_mismatch"], join(key, "on_mismatch"), ON_MISMATCH)
    boot_test = None
    if body.get("boot_test") is not None:
        boot_test = _boot_test(doc, body["boot_test"], join(key, "boot_test"), rule_clouds)
    return ImageRule(
        pattern=pattern,
        clouds=rule_clouds,
        stores=rule_stores,
        visibility=cast(Literal["private", "shared", "community", "public"], visibility),
        min_copies=min_copies,
        keep=keep,
        retire=cast(Literal["hide", "delete"], retire),
        on_mismatch=cast(Literal["report", "replace"], on_mismatch),
        boot_test=boot_test,
    )


def _boot_test(doc: Document, raw: object, key: str, rule_clouds: tuple[str, ...]) -> BootTest:
    """``boot_test: {cloud: C, flavor: F, timeout: 300s}``: C must be one of the rule's clouds
    (the version is booted where it first is, before it spreads)."""
    body = doc.mapping(raw, key, "write `boot_test: {cloud: C, flavor: F, timeout: 300s}`")
    doc.known_keys(body, key, BOOT_TEST_KEYS)
    for required in ("cloud", "flavor"):
        if required not in body:
            doc.fail(
                join(key, required),
                f"missing: add it (boot_test needs {', '.join(BOOT_TEST_KEYS[:2])})",
            )
    cloud = doc.string(body["cloud"], join(key, "cloud"))
    if cloud not in rule_clouds:
        doc.fail(
            join(key, "cloud"),
            f"is {cloud!r}, not one of this rule's clouds ({', '.join(rule_clouds) or 'none'}): "
            "name one of them",
        )
    flavor = doc.string(body["flavor"], join(key, "flavor"))
    timeout = 300.0
    if "timeout" in body:
        timeout = doc.duration(body["timeout"], join(key, "timeout"), within=(10, 3600))
    return BootTest(cloud=cloud, flavor=flavor, timeout=timeout)


def parse_rules(
    doc: Document, raw_images: object, clouds: Mapping[str, object], stores: Mapping[str, object]
) -> tuple[ImageRule, ...]:
    """The whole ``images:`` list; two rules with the same pattern are a mistake."""
    if raw_images is None:
        raw_images = []
    if not isinstance(raw_images, list):
        doc.fail(
            "images", f"is {describe(raw_images)}; it must be a list of rules (`- name: PATTERN`)"
        )
    rules: list[ImageRule] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_images):
        rule = parse_rule(doc, raw, index("images", i), clouds, stores)
        if rule.pattern in seen:
            doc.fail(
                join(index("images", i), "name"),
                f"{rule.pattern!r} is already the "
                f"pattern of images[{seen[rule.pattern]}]: merge the two rules",
            )
        seen[rule.pattern] = i
        rules.append(rule)
    return tuple(rules)
