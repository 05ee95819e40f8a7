"""The alert rules shipped in doc/ops/: valid for Prometheus, unit-tested by their series, in step
with the metrics the bot exports, and named (not copied) by the deployment guide."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import cast

import pytest

from services.database import Pool
from services.failures import Failure
from services.fallback.storage import Storage
from services.ops import gauges, metrics

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "doc" / "ops"
RULES = OPS / "alerts.yml"
RULE_TESTS = OPS / "alerts.test.yml"
GUIDE = ROOT / "doc" / "guides" / "07-DEPLOYMENT.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install --no-install-recommends prometheus)"
)


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), flags=re.MULTILINE)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=OPS, capture_output=True, text=True, timeout=60, check=False)


@needs_promtool
def test_the_rules_are_valid() -> None:
    checked = promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(alert_names())} rules found" in checked.stdout


@needs_promtool
def test_every_alert_fires_on_its_series_and_only_then() -> None:
    tested = promtool("test", "rules", RULE_TESTS.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_series_that_makes_it_fire() -> None:
    tests = RULE_TESTS.read_text()
    names = alert_names()
    assert len(names) == len(set(names)) >= 6
    silent = [name for name in names if not re.search(rf"alertname: {name}\s+exp_alerts:\s+- exp_labels", tests)]
    assert not silent


class _Pool:
    def get_stats(self) -> dict[str, int]:
        return {}


class _Storage:
    degraded = False
    spooled = 0


def exported() -> set[str]:
    """The names of every sample the bot exports: the process-wide registry and a bot's collector."""
    collector = gauges.BotCollector(cast(Pool, _Pool()), cast(Storage, _Storage()))
    families = [*metrics.REGISTRY.collect(), *collector.collect()]
    return {sample.name for family in families for sample in family.samples} | {family.name for family in families}


def test_the_rules_name_only_metrics_and_labels_the_bot_exports() -> None:
    text = RULES.read_text()
    named = set(re.findall(r"\bllmbot_[a-z0-9_]+", text))
    assert named, "no llmbot metric in the rules"
    assert named <= exported(), named - exported()
    values = {
        "failure": {failure.value for failure in Failure},
        "outcome": set(metrics.OUTCOMES),
        "stage": set(metrics.STAGES),
    }
    for label, value in re.findall(r"\b(failure|outcome|stage)=~?\"([^\"]+)\"", text):
        assert set(value.split("|")) <= values[label], (label, value)


def test_the_deployment_guide_links_the_rules_and_names_each_alert_without_a_copy() -> None:
    guide = GUIDE.read_text()
    assert "](../ops/alerts.yml)" in guide
    assert "expr:" not in guide, "the guide holds a copy of the rules: link doc/ops/alerts.yml instead"
    unnamed = [name for name in alert_names() if f"`{name}`" not in guide]
    assert not unnamed
