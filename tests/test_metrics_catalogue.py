"""The code creates exactly the catalogued metric series with the catalogued tags (plus `run`, through
actors/run_metrics.py), and the generated docs/dashboard are current."""

import ast
import json
from pathlib import Path

from cluster.metrics import CATALOGUE, dashboard_json, markdown_table

ROOT = Path(__file__).resolve().parent.parent
KINDS = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram"}


def created_series():
    """Series name -> (kind, file, tag keys as written) for every metric the roles create."""
    found = {}
    for folder in ("actors", "reward", "learner", "cluster"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                first = node.args[0]
                if func in KINDS and isinstance(first, ast.Constant) and str(first.value).startswith("ampo_"):
                    tag_keys = next((ast.literal_eval(k.value) for k in node.keywords if k.arg == "tag_keys"), ())
                    found[first.value] = (KINDS[func], path.relative_to(ROOT), tuple(tag_keys))
    return found


def test_code_and_catalogue_agree():
    created = created_series()
    catalogued = {spec.name: spec.kind for spec in CATALOGUE}
    assert sorted(created) == sorted(catalogued)
    for name, (kind, path, _) in created.items():
        assert catalogued[name] == kind, f"{name} is a {kind} in {path}"


def test_every_documented_tag_is_the_exported_one():
    created = created_series()
    for spec in CATALOGUE:
        kind, path, tag_keys = created[spec.name]
        assert tag_keys == spec.tags, f"{spec.name} in {path} has tags {tag_keys}, the catalogue says {spec.tags}"


def test_every_series_gets_the_run_tag():
    """Each file that creates series takes its metric classes from actors.run_metrics (which adds `run`), none
    from ray.util.metrics directly."""
    for path in sorted({ROOT / path for _, path, _ in created_series().values()}):
        modules = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                modules.update({node.module} | {f"{node.module}.{a.name}" for a in node.names})
            elif isinstance(node, ast.Import):
                modules.update(a.name for a in node.names)
        assert "ray.util.metrics" not in modules, f"{path.relative_to(ROOT)} creates series without the run tag"
        assert "actors.run_metrics" in modules, f"{path.relative_to(ROOT)} does not use actors.run_metrics"


def test_generated_files_are_current():
    assert (ROOT / "configs" / "grafana" / "ampo.json").read_text() == dashboard_json()
    assert markdown_table() in (ROOT / "docs" / "metrics.md").read_text()
    dashboard = json.loads(dashboard_json())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    assert all(spec.exported in exprs for spec in CATALOGUE)


def test_every_panel_filters_on_the_run_variable():
    """The dashboard's `run` variable selects runs, every panel query filters on it and draws one line per run."""
    import re

    from cluster.metrics import counter_start_values

    dashboard = json.loads((ROOT / "configs" / "grafana" / "ampo.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["run"]["type"] == "query" and variables["run"]["includeAll"]
    # The runs come from a series every run exports from start-up (a counter started at 0).
    source = re.fullmatch(r"label_values\(ray_(\w+), run\)", variables["run"]["query"]).group(1)
    assert source in counter_start_values()
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(targets) == len(CATALOGUE)
    for target in targets:
        assert '{run=~"$run"}' in target["expr"] and "{{run}}" in target["legendFormat"], target
        assert re.search(r"by \((le, )?run\b", target["expr"]), target
