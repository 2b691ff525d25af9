"""deploy/prometheus/relay-alerts.yml is a valid rules file about metrics the relay exports."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tests.test_grafana_dashboard import SAMPLE_TO_FAMILY, metric_names

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "relay-alerts.yml"
DURATION = re.compile(r"^\d+[smhd]$")


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    assert set(document) == {"groups"}
    found = []
    for group in document["groups"]:
        assert group["name"] and group["rules"]
        found.extend(group["rules"])
    return found


def test_every_rule_is_a_complete_alert() -> None:
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    assert "RelayProbeFailing" in names
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert DURATION.match(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"page", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_rules_use_relay_metrics_with_their_types() -> None:
    for rule in rules():
        expr = rule["expr"]
        names = metric_names(expr)
        assert names, rule["alert"]
        for name in names:
            family = SAMPLE_TO_FAMILY.get(name)
            assert family is not None, f"{rule['alert']}: {name} is not a relay metric"
            wrapped = re.search(rf"\b(rate|increase)\(\s*{name}\b", expr)
            assert bool(wrapped) == (family.kind != "gauge"), f"{rule['alert']}: {expr}"
