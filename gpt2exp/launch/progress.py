"""Where the driver sends the metric records of an experiment's runs: a live view of their progress
(variant, step, loss, tokens/s, ETA) with rich, and each run's ``metrics.jsonl``."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pandas as pd
from rich.console import Console
from rich.live import Live
from rich.table import Table

if TYPE_CHECKING:
    from gpt2exp.launch.plan import Plan
    from gpt2exp.training.job import TrainJob

METRICS = "metrics.jsonl"


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


class ProgressView:
    """A table with one row per run, refreshed as metric records arrive (thread-safe enough: rich
    redraws from its own thread; records only replace dict entries). When the console is not a terminal
    (a file, a CI log) it prints plain lines instead: each evaluation, each change of status, and otherwise
    at most one line per run every ``PLAIN_EVERY_S`` seconds."""

    PLAIN_EVERY_S = 30.0

    def __init__(self, keys: list[str], console: Console | None = None, enabled: bool = True) -> None:
        self.rows: dict[str, dict[str, Any]] = {k: {"status": "pending"} for k in keys}
        self.started: dict[str, tuple[float, int]] = {}
        self.console = console or Console()
        self.plain = enabled and not self.console.is_terminal
        self.said: dict[str, float] = {}  # plain mode: when each run last had a line
        live = enabled and not self.plain
        self.live = Live(self.render(), console=self.console, refresh_per_second=4, transient=False) if live else None

    def __enter__(self) -> ProgressView:
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.live:
            self.live.update(self.render())
            self.live.__exit__(exc_type, exc, tb)

    def record(self, key: str, record: dict[str, Any]) -> None:
        row = self.rows.setdefault(key, {})
        step = record.get("step", 0)
        self.started.setdefault(key, (time.monotonic(), step))
        t0, s0 = self.started[key]
        rate = (step - s0) / max(1e-9, time.monotonic() - t0)
        eta = (record.get("total_steps", step) - step) / rate if rate > 0 else None
        row.update(record, status="done" if record.get("event") == "done" else "running", eta=eta)
        self._refresh()
        if self.plain and record.get("event") == "step":
            now = time.monotonic()
            if "val_loss" in record or now - self.said.get(key, -math.inf) >= self.PLAIN_EVERY_S:
                self.said[key] = now
                self._say(key)

    def status(self, key: str, status: str) -> None:
        row = self.rows.setdefault(key, {})
        changed = row.get("status") != status
        row["status"] = status
        self._refresh()
        if self.plain and changed:
            self._say(key)

    def _say(self, key: str) -> None:
        """Plain mode: one line for the run ``key``."""
        r = self.rows[key]
        parts = [key, r["status"]]
        if "step" in r:
            parts.append(f"step {r['step']}/{r['total_steps']}")
        for name, fmt in (
            ("train_loss", "train loss {:.3f}"),
            ("val_loss", "val loss {:.3f}"),
            ("tokens_per_sec_during_training", "{:,.0f} tokens/s"),
        ):
            if r.get(name) is not None:
                parts.append(fmt.format(r[name]))
        if r.get("eta") is not None and r["status"] == "running":
            parts.append(f"ETA {r['eta']:.0f}s")
        self.console.print(" · ".join(parts), highlight=False, markup=False, soft_wrap=True)

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
                _fmt(r.get("tokens_per_sec_during_training"), ",.0f"),
                "" if eta is None or r["status"] != "running" else f"{eta:.0f}s",
                r["status"],
            )
        return table


class Recorder:
    """Where metric records go on the driver: the progress view and ``<run_dir>/metrics.jsonl``. Like the
    MLflow run, the file holds each step once: a resume re-runs the steps after its checkpoint, and those
    already written are not written again. (Under Ray a step can be missing instead: records in flight
    from the workers when the driver is killed are lost, and the steps up to the checkpoint are not re-run.)"""

    def __init__(self, plan: Plan, view: ProgressView) -> None:
        self.view, self.files = view, {}
        self.steps: dict[str, set[int]] = {}
        for job in plan.jobs:
            self.add(job)

    def add(self, job: TrainJob) -> None:
        """Records of ``job`` go to its ``metrics.jsonl`` too (a sweep adds its verdict runs once it has chosen)."""
        self.files[job.key] = path = Path(job.run_dir) / METRICS
        text = path.read_text(errors="replace") if path.is_file() else ""
        if text and not text.endswith("\n"):  # a line cut short (say, by a full disk): the next record starts afresh
            with open(path, "a") as f:
                f.write("\n")
        self.steps[job.key] = {r["step"] for r in parse_records(text) if r.get("event") == "step"}

    def record(self, key: str, record: dict[str, Any]) -> None:
        self.view.record(key, record)
        if record.get("event") == "step":
            if record["step"] in self.steps[key]:
                return
            self.steps[key].add(record["step"])
        self.files[key].parent.mkdir(parents=True, exist_ok=True)
        with open(self.files[key], "a") as f:
            f.write(json.dumps(record) + "\n")

    def status(self, key: str, status: str) -> None:
        self.view.status(key, status)


def parse_records(text: str) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` text; a line cut short is left out."""
    records = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def read_metrics(job: TrainJob) -> pd.DataFrame:
    """The step records of a run (one row per logged step)."""
    path = Path(job.run_dir) / METRICS
    rows = parse_records(path.read_text(errors="replace")) if path.is_file() else []
    return pd.DataFrame([r for r in rows if r.get("event") == "step"])
