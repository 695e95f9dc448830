"""Regenerate docs/metrics.md's table and configs/grafana/ampo.json from cluster/metrics.py.

    .venv/bin/python scripts/write_dashboard.py
"""

from __future__ import annotations

from pathlib import Path

from cluster.metrics import dashboard_json, markdown_table

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- metrics-table:begin -->", "<!-- metrics-table:end -->"


def main() -> None:
    (ROOT / "configs" / "grafana" / "ampo.json").write_text(dashboard_json())
    doc = ROOT / "docs" / "metrics.md"
    text = doc.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    doc.write_text(f"{head}{BEGIN}\n{markdown_table()}\n{END}{tail}")
    print("wrote configs/grafana/ampo.json and docs/metrics.md")


if __name__ == "__main__":
    main()
