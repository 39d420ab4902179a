"""Live progress of an experiment's runs (variant, step, loss, tokens/s, ETA) with rich."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


class ProgressView:
    """A table with one row per run, refreshed as metric records arrive (thread-safe enough: rich
    redraws from its own thread; records only replace dict entries)."""

    def __init__(self, keys: list[str], console: Console | None = None, enabled: bool = True) -> None:
        self.rows: dict[str, dict[str, Any]] = {k: {"status": "pending"} for k in keys}
        self.started: dict[str, tuple[float, int]] = {}
        self.console = console or Console()
        self.live = Live(self.render(), console=self.console, refresh_per_second=4, transient=False) if enabled else None

    def __enter__(self) -> ProgressView:
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.live.update(self.render())
            self.live.__exit__(*exc)

    def record(self, key: str, record: dict[str, Any]) -> None:
        row = self.rows.setdefault(key, {})
        step = record.get("step", 0)
        self.started.setdefault(key, (time.monotonic(), step))
        t0, s0 = self.started[key]
        rate = (step - s0) / max(1e-9, time.monotonic() - t0)
        eta = (record.get("total_steps", step) - step) / rate if rate > 0 else None
        row.update(record, status="done" if record.get("event") == "done" else "running", eta=eta)
        self._refresh()

    def status(self, key: str, status: str) -> None:
        self.rows.setdefault(key, {})["status"] = status
        self._refresh()

    def _refresh(self) -> None:
        if self.live:
            self.live.update(self.render())

    def render(self) -> Table:
        table = Table(expand=False)
        for col in ("run", "step", "train loss", "val loss", "tokens/s", "ETA", "status"):
            table.add_column(col, justify="left" if col in ("run", "status") else "right")
        for key, r in self.rows.items():
            step = f"{r['step']}/{r['total_steps']}" if "step" in r else ""
            eta = r.get("eta")
            table.add_row(
                key,
                step,
                _fmt(r.get("train_loss"), ".3f"),
                _fmt(r.get("val_loss"), ".3f"),
                _fmt(r.get("tokens_per_sec"), ",.0f"),
                "" if eta is None or r["status"] != "running" else f"{eta:.0f}s",
                r["status"],
            )
        return table
