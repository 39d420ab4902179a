"""The comparison table as text and HTML: Markdown (with the notes), CSV, JSON, a ``rich`` table for the
terminal, and a standalone HTML page with the plot embedded (so it shows in the MLflow UI)."""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from gpt2exp.report.runs import ReportError
from gpt2exp.report.table import display_frame, notes

FORMATS = ("table", "markdown", "csv", "json")


def _right(col: str) -> bool:
    return col not in ("variant", "setting", "verdict")


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no dependency on ``tabulate``)."""
    shown = display_frame(table)
    esc = lambda s: str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(esc(c) for c in shown.columns) + " |"]
    lines.append("|" + "|".join("---:" if _right(c) else ":---" for c in shown.columns) + "|")
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def plain(value: Any) -> Any:
    """A JSON-ready scalar: numpy numbers as Python ones (exact repr), NaN as None."""
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def to_json(table: pd.DataFrame) -> str:
    """``{"experiment", "parent_run_id", "metric", "baseline", "lower_is_better", "note", "rows": [...],
    "excluded"}``: full precision, NaN as null; ``note`` says why there is no verdict (null when there are)."""
    keys = ("experiment", "parent_run_id", "metric", "baseline", "lower_is_better", "note")
    meta = {k: table.attrs.get(k) for k in keys}
    rows = [{k: plain(v) for k, v in rec.items()} for rec in table.to_dict("records")]
    return json.dumps({**meta, "rows": rows, "excluded": table.attrs.get("excluded", [])}, indent=1) + "\n"


def render(table: pd.DataFrame, fmt: str) -> str:
    """The table as ``markdown``, ``csv`` or ``json`` text (``table``: see :func:`rich_table`)."""
    if fmt == "markdown":
        return to_markdown(table) + "\n" + "\n".join(f"- {n}" for n in notes(table)) + "\n"
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        return to_json(table)
    raise ReportError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def rich_table(table: pd.DataFrame):
    """The table for the terminal (a ``rich.table.Table``); print :func:`notes` under it."""
    from rich.table import Table

    a = table.attrs
    shown = display_frame(table)
    out = Table(title=f"{a['experiment']}: {a['metric']} by variant (parent run {a['parent_run_id'][:8]})")
    for col in shown.columns:
        out.add_column(col, justify="right" if _right(col) else "left", no_wrap=col == "variant")
    style = {"better": "green", "worse": "red", "baseline": "dim"}
    for row in shown.itertuples(index=False):
        *cells, v = row
        out.add_row(*cells, f"[{style[v]}]{v}[/]" if v in style else v)
    return out


def to_html(table: pd.DataFrame, image: Path | None = None, more: Sequence[Path] = ()) -> str:
    """A standalone page: title, table, notes and the plot, then the ``more`` figures (embedded, so they show in the MLflow UI)."""
    a = table.attrs
    shown = display_frame(table)
    head = "".join(f"<th class='{'r' if _right(c) else 'l'}'>{html.escape(c)}</th>" for c in shown.columns)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class='{'r' if _right(c) else 'l'} {str(v).replace(' ', '-') if c == 'verdict' else ''}'>{html.escape(str(v))}</td>"
            for c, v in zip(shown.columns, row, strict=True)
        )
        + "</tr>"
        for row in shown.itertuples(index=False)
    )
    img = ""
    if image is not None and image.is_file():
        data = base64.b64encode(image.read_bytes()).decode()
        img = f"<img alt='{html.escape(a['metric'])} curves' src='data:image/png;base64,{data}'>"
    for path in more:
        img += (
            f"\n<img alt='{html.escape(path.stem)}' src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'>"
        )
    title = html.escape(f"{a['experiment']}: comparison of variants")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }}
th, td {{ padding: 0.35em 0.8em; border-bottom: 1px solid #ddd; white-space: nowrap; }}
th {{ background: #f4f4f4; }} .r {{ text-align: right; }} .l {{ text-align: left; }}
.better {{ color: #17803d; font-weight: 600; }} .worse {{ color: #b42318; font-weight: 600; }}
.meta, li {{ color: #555; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>{title}</h1>
<p class="meta">metric {html.escape(a["metric"])} · baseline {html.escape(a["baseline"])} · parent run
<code>{html.escape(a["parent_run_id"])}</code> · {html.escape(a["tracking_uri"])} · {datetime.now():%Y-%m-%d %H:%M}</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<ul>{"".join(f"<li>{html.escape(n)}</li>" for n in notes(table))}</ul>
{img}
</body></html>
"""


def print_table(console: Any, table: pd.DataFrame) -> None:
    """The table and the notes that say how to read it, on a ``rich`` console."""
    console.print(rich_table(table))
    for line in notes(table):
        console.print(line, style="dim", highlight=False, markup=False)
