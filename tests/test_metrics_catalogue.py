"""The code creates exactly the catalogued metric series, and the generated docs/dashboard are current."""

import ast
import json
from pathlib import Path

from cluster.metrics import CATALOGUE, dashboard_json, markdown_table

ROOT = Path(__file__).resolve().parent.parent
KINDS = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram"}


def created_series():
    found = {}
    for folder in ("actors", "reward", "learner", "cluster"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                first = node.args[0]
                if func in KINDS and isinstance(first, ast.Constant) and str(first.value).startswith("ampo_"):
                    found[first.value] = (KINDS[func], path.relative_to(ROOT))
    return found


def test_code_and_catalogue_agree():
    created = created_series()
    catalogued = {spec.name: spec.kind for spec in CATALOGUE}
    assert sorted(created) == sorted(catalogued)
    for name, (kind, path) in created.items():
        assert catalogued[name] == kind, f"{name} is a {kind} in {path}"


def test_generated_files_are_current():
    assert (ROOT / "configs" / "grafana" / "ampo.json").read_text() == dashboard_json()
    assert markdown_table() in (ROOT / "docs" / "metrics.md").read_text()
    dashboard = json.loads(dashboard_json())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    assert all(spec.exported in exprs for spec in CATALOGUE)
