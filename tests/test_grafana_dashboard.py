"""deploy/grafana/relay-dashboard.json charts every metric relay/metrics.py defines, correctly.

The metric list comes from a live ``Metrics()`` registry, so adding a metric without a panel,
renaming one, or charting a label that does not exist fails here instead of showing an empty
graph in production.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from relay.metrics import STANDARD_PREFIXES, Metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "relay-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# Labels Prometheus adds at scrape time, and the histogram bucket bound.
SCRAPE_LABELS = {"job", "instance"}


@dataclass(frozen=True)
class Family:
    name: str  # as written in metrics.py (counters keep their _total)
    kind: str  # counter | gauge | histogram
    labels: frozenset[str]

    @property
    def samples(self) -> set[str]:
        if self.kind == "histogram":
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"}
        return {self.name}


def families() -> dict[str, Family]:
    metrics = Metrics()
    # Every metric is an attribute of Metrics; the registry is the cross-check that none hides.
    found: dict[str, Family] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            kind = str(metric._type)
            # prometheus_client strips a counter's _total from its family name; put it back.
            name = f"{metric._name}_total" if kind == "counter" else metric._name
            found[name] = Family(name, kind, frozenset(metric._labelnames))
    registered = set()
    for fam in metrics.registry.collect():
        name = f"{fam.name}_total" if fam.type == "counter" else fam.name
        if name.startswith(STANDARD_PREFIXES):
            # prometheus_client's process/platform collectors: real names, not ours to chart all.
            STANDARD[name] = Family(name, fam.type, frozenset(
                label for sample in fam.samples for label in sample.labels))
        else:
            registered.add(name)
    assert registered == set(found)
    return found


STANDARD: dict[str, Family] = {}


FAMILIES = families()
SAMPLE_TO_FAMILY = {sample: fam for fam in (*FAMILIES.values(), *STANDARD.values())
                    for sample in fam.samples}


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def chart_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (target["expr"], target)
        for panel in chart_panels(dashboard)
        for target in panel.get("targets", [])
    ]


METRIC_NAME = r"(?:relay|process|python)_[a-z0-9_]+"


def metric_names(expr: str) -> list[str]:
    return re.findall(rf"\b({METRIC_NAME})\b", expr)


def test_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = load()
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["datasource"] == DATASOURCE
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_chart_uses_the_datasource_variable() -> None:
    for panel in chart_panels(load()):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]


def test_panels_fit_the_grid_without_overlapping() -> None:
    boxes = [(p["title"], p["gridPos"]) for p in load()["panels"]]
    for title, pos in boxes:
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, title
    for i, (title_a, a) in enumerate(boxes):
        for title_b, b in boxes[i + 1:]:
            apart = (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"]
                     or a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"])
            assert apart, f"{title_a!r} overlaps {title_b!r}"


def test_process_metrics_are_served_and_charted() -> None:
    # Linux: ProcessCollector reads /proc/self; these are what the process row charts.
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_max_fds"):
        assert name in STANDARD, sorted(STANDARD)
    assert "python_info" in STANDARD
    charted = {name for expr, _ in expressions(load()) for name in metric_names(expr)}
    assert {"process_resident_memory_bytes", "process_open_fds"} <= charted


def test_every_metric_family_is_charted() -> None:
    charted = {name for expr, _ in expressions(load()) for name in metric_names(expr)}
    missing = []
    for fam in FAMILIES.values():
        # Histograms must be charted as quantiles over their buckets, not just counted.
        wanted = f"{fam.name}_bucket" if fam.kind == "histogram" else fam.name
        if wanted not in charted:
            missing.append(wanted)
    assert not missing, f"metrics with no panel: {missing}"


@pytest.mark.parametrize("expr", sorted({e for e, _ in expressions(load())}))
def test_expression_matches_the_metric_types_and_labels(expr: str) -> None:
    names = metric_names(expr)
    assert names, f"no metric the relay serves in {expr!r}"
    labels = set(SCRAPE_LABELS)
    for name in names:
        assert name in SAMPLE_TO_FAMILY, f"{name} is not a metric relay/metrics.py defines"
        fam = SAMPLE_TO_FAMILY[name]
        labels |= fam.labels
        wrapped = re.search(rf"\b(rate|increase)\(\s*{name}\b", expr)
        if fam.kind == "gauge":
            assert not wrapped, f"rate()/increase() of the gauge {name}"
        else:
            # A raw counter only ever goes up and resets on restart: chart its rate.
            assert wrapped, f"{name} must be inside rate() or increase()"
        if name.endswith("_bucket"):
            assert "histogram_quantile(" in expr
            labels.add("le")
    for group in re.findall(r"\bby \(([^)]*)\)", expr):
        for label in (part.strip() for part in group.split(",")):
            assert label in labels, f"{expr!r} groups by {label!r}, which no metric here has"
    for label in re.findall(r"[{,]\s*([a-z_]+)=~?\"", expr):
        assert label in labels, f"{expr!r} selects on {label!r}, which no metric here has"
    # Scope every query to the relays picked in the dashboard's variables.
    for selector in re.findall(rf"{METRIC_NAME}(\{{[^}}]*\}})?", expr):
        assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, expr


def test_legends_name_only_grouped_labels() -> None:
    for expr, target in expressions(load()):
        grouped = {
            label.strip()
            for group in re.findall(r"\bby \(([^)]*)\)", expr)
            for label in group.split(",")
        }
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
            assert label in grouped, f"legend {{{{{label}}}}} but {expr!r} drops that label"
