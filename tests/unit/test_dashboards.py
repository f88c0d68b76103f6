"""The Grafana dashboard and the Prometheus alerts in etc/ parse, have the expected structure,
and every expression in them names only metrics imagesync exports (or Prometheus's own
``up``): a renamed metric cannot silently leave a panel empty or an alert mute.

(Prometheus's own ``promtool`` checks the rules and their behaviour too, in
tests/integration/test_promtool.py.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagesync.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "etc" / "grafana" / "imagesync.json"
ALERTS = ROOT / "etc" / "prometheus" / "imagesync-alerts.yaml"

#: PromQL words that are not metric names
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}
#: series Prometheus makes itself
BUILTIN = {"up"}


def exported() -> set[str]:
    """Every series name the daemon's registry exposes (a counter ``x`` as ``x_total``)."""
    names = set()
    for family in Metrics().registry.collect():
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers left once strings, label
    matchers, grouping clauses, ranges and function calls are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings ($instance, regexes)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, subqueries
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in KEYWORDS or re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def test_the_name_finder_finds_names_and_only_names() -> None:
    expr = (
        'sum by (site, kind) (increase(imagesync_copy_failures_total{kind="integrity",'
        'instance=~"$instance"}[1h])) >= 2 and on (instance) imagesync_nosuch == 0 '
        "unless time() - up offset 5m > 3 * 60"
    )
    assert metric_names(expr) == {"imagesync_copy_failures_total", "imagesync_nosuch", "up"}


def test_every_metric_the_alerts_and_dashboard_need_is_exported() -> None:
    assert {
        "imagesync_copies_total",
        "imagesync_bytes_copied_total",
        "imagesync_copy_failures_total",
        "imagesync_sync_lag_seconds",
        "imagesync_last_pass_duration_seconds",
        "imagesync_last_pass_timestamp_seconds",
        "imagesync_poll_interval_seconds",
        "imagesync_site_reachable",
        "imagesync_last_successful_poll_timestamp_seconds",
    } <= exported()


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p.get("type") != "row"]


def test_the_dashboard_parses_and_every_panel_queries_exported_metrics() -> None:
    doc = _dashboard()
    assert doc["title"] == "imagesync" and doc["uid"]
    ids = [p["id"] for p in _panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    known = exported() | BUILTIN
    for panel in _panels():
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"  # no instance-specific uid
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"{panel['title']}: {target['expr']}"
            assert names <= known, f"{panel['title']}: unknown {names - known}"


@pytest.mark.parametrize(
    "needed",
    [
        "imagesync_copies_total",  # copies
        "imagesync_bytes_copied_total",  # bytes
        "imagesync_copy_failures_total",  # failures by site
        "imagesync_last_pass_duration_seconds",  # pass duration
        "imagesync_sync_lag_seconds",  # versions stale per site
    ],
)
def test_the_dashboard_shows(needed: str) -> None:
    used = {n for p in _panels() for t in p["targets"] for n in metric_names(t["expr"])}
    assert needed in used


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    assert set(doc) == {"groups"}
    rules: list[dict[str, Any]] = []
    for group in doc["groups"]:
        assert group["name"] and group["rules"]
        rules.extend(group["rules"])
    return rules


def test_the_alerts_are_well_formed_and_query_exported_metrics() -> None:
    known = exported() | BUILTIN
    names = [r["alert"] for r in _rules()]
    assert len(names) == len(set(names))
    for rule in _rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"])
        used = metric_names(rule["expr"])
        assert used and used <= known, f"{rule['alert']}: unknown {used - known}"


@pytest.mark.parametrize(
    ("alert", "metric"),
    [
        ("ImagesyncSiteUnreachable", "imagesync_site_reachable"),  # unreachable 15 minutes
        ("ImagesyncNameStale", "imagesync_sync_lag_seconds"),  # stale for over an hour
        ("ImagesyncIntegrityErrors", "imagesync_copy_failures_total"),  # repeated integrity
        ("ImagesyncPassesStopped", "imagesync_last_pass_timestamp_seconds"),  # passes stopped
    ],
)
def test_the_alerts_cover(alert: str, metric: str) -> None:
    (rule,) = [r for r in _rules() if r["alert"] == alert]
    assert metric in metric_names(rule["expr"])


def test_failures_are_counted_by_site_and_kind_from_the_first_listing() -> None:
    """The failure series exist at 0 once a site is listed, so increase() counts the first
    failure (a series born at 1 would hide it)."""
    from datetime import UTC, datetime

    from imagesync.model import SiteInventory

    m = Metrics()
    m.observe_inventories({"lab1": SiteInventory("lab1", listed_at=datetime.now(UTC))})
    text = m.exposition().decode()
    assert 'imagesync_copy_failures_total{kind="integrity",site="lab1"} 0.0' in text
    assert 'imagesync_site_reachable{site="lab1"} 1.0' in text


def test_a_failed_copy_is_counted_against_its_target_and_kind(tmp_path: Path) -> None:
    import os

    from imagesync.sites.memory import MemorySite
    from tests.unit.test_daemon import daemon_for

    sites = {n: MemorySite(n) for n in ("c1", "c2")}
    sites["c1"].add("img-a", os.urandom(1000))
    sites["c2"].faults.fail_write_after = 0
    sites["c2"].faults.fail_write_times = 99
    sites["c2"].faults.fail_write_transient = False
    metrics = Metrics()
    d = daemon_for(tmp_path, sites, metrics=metrics)
    d.run_pass()
    text = metrics.exposition().decode()
    failed = [
        line
        for line in text.splitlines()
        if line.startswith("imagesync_copy_failures_total{") and not line.endswith(" 0.0")
    ]
    assert len(failed) == 1 and 'site="c2"' in failed[0] and failed[0].endswith(" 1.0")
    assert "imagesync_last_pass_timestamp_seconds" in text
