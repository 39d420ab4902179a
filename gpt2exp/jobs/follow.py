"""Following a submitted job, and the ``gpt2exp jobs`` commands: details, logs (streamed or at once), the
outcome (the line that says why a job failed), listing, stopping, and the tables and lines they print."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from gpt2exp.errors import last_raised
from gpt2exp.jobs.connection import Cluster, SubmitError, first_line, job_api_error


def job_details(cluster: Cluster, submission_id: str) -> Any:
    """Ray's ``JobDetails`` of a job, or a one-line error when the cluster has no such job."""
    try:
        return cluster.client.get_job_info(submission_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise SubmitError(f"no job {submission_id} on {cluster.address} (gpt2exp jobs list shows the ids)") from None
        raise job_api_error(cluster, e, f"read job {submission_id}") from None
    except Exception as e:
        raise job_api_error(cluster, e, f"read job {submission_id}") from None


def stream_logs(cluster: Cluster, submission_id: str, write: Callable[[str], None] | None = None) -> None:
    """Write the job's logs as they come until the job ends (Ray's log websocket)."""
    write = write or to_stdout

    async def tail() -> None:
        async for chunk in cluster.client.tail_job_logs(submission_id):
            write(chunk)

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the websocket closed early (head restarted, network): the status still tells
        if "closed unexpectedly" not in str(e) and "WebSocket" not in str(e):
            raise job_api_error(cluster, e, f"follow the logs of {submission_id}") from None


def to_stdout(text: str) -> None:
    """The default ``write``: the text on stdout, at once."""
    sys.stdout.write(text)
    sys.stdout.flush()


def wait_terminal(cluster: Cluster, submission_id: str, timeout: float = 60.0) -> Any:
    """The job's details once its status is final (the log stream can end a moment before)."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_details(cluster, submission_id)
        if info.status.is_terminal() or time.monotonic() > deadline:
            return info
        time.sleep(0.25)


def error_line(logs: str, message: str | None) -> str:
    """The line that says why a job failed: gpt2exp's own ``error: ...`` line, else the last raised
    exception, else the job's last line of output, else Ray's message."""
    lines = [line.strip() for line in logs.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    if raised := last_raised(lines):
        return raised
    started = max((i for i, line in enumerate(lines) if line.startswith("Running entrypoint for job ")), default=None)
    if started is not None and started + 1 < len(lines):
        return lines[-1]
    return first_line(message or "") or "no error message"


def job_outcome(cluster: Cluster, info: Any) -> None:
    """Return quietly for SUCCEEDED; raise :class:`SubmitError` (code 1) naming the status and the error line."""
    status = str(info.status)
    if status == "SUCCEEDED":
        return
    sid = info.submission_id or info.job_id
    if status == "STOPPED":
        raise SubmitError(f"job {sid} STOPPED (gpt2exp jobs stop, or the cluster stopped it)")
    if status != "FAILED":
        raise SubmitError(f"job {sid} is still {status}: gpt2exp jobs status {sid}")
    try:
        logs = cluster.client.get_job_logs(sid)
    except Exception:
        logs = ""
    code = re.search(r"exit code (\d+)", info.message or "")
    raise SubmitError(f"job {sid} FAILED{f' (exit code {code.group(1)})' if code else ''}: {error_line(logs, info.message)}")


def follow_job(cluster: Cluster, submission_id: str, write: Callable[[str], None] | None = None) -> Any:
    """Stream the logs until the job ends; return its details when it SUCCEEDED, else raise SubmitError."""
    job_details(cluster, submission_id)  # a clear error for an unknown id, before the websocket
    try:
        stream_logs(cluster, submission_id, write)
    except KeyboardInterrupt:
        raise SubmitError(
            f"stopped following; job {submission_id} goes on: gpt2exp jobs logs {submission_id} --follow, "
            f"or gpt2exp jobs stop {submission_id}",
            130,
        ) from None
    info = wait_terminal(cluster, submission_id)
    job_outcome(cluster, info)
    return info


def list_jobs(cluster: Cluster, everything: bool = False) -> list[Any]:
    """The cluster's jobs (gpt2exp's only, unless ``everything``), oldest first."""
    try:
        jobs = cluster.client.list_jobs()
    except Exception as e:
        raise job_api_error(cluster, e, "list jobs") from None
    if not everything:
        jobs = [j for j in jobs if (j.submission_id or "").startswith("gpt2exp-") or "gpt2exp.experiment" in (j.metadata or {})]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def stop_job(cluster: Cluster, submission_id: str, timeout: float = 30.0) -> Any:
    """Ask the job to stop and wait until it has (Ray: SIGTERM to the driver, SIGKILL after a grace period)."""
    info = job_details(cluster, submission_id)
    if info.status.is_terminal():
        return info
    try:
        cluster.client.stop_job(submission_id)
    except Exception as e:
        raise job_api_error(cluster, e, f"stop {submission_id}") from None
    return wait_terminal(cluster, submission_id, timeout)


def job_logs(cluster: Cluster, submission_id: str) -> str:
    """The job's logs so far (driver stdout and stderr)."""
    job_details(cluster, submission_id)
    try:
        return cluster.client.get_job_logs(submission_id)
    except Exception as e:
        raise job_api_error(cluster, e, f"read the logs of {submission_id}") from None


def when(ms: int | None) -> str:
    """A Ray timestamp (ms since the epoch) as local time, "" for none."""
    return "" if not ms else datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def duration(info: Any) -> str:
    """How long the job ran (or has been running) as h:mm:ss, "" before it started."""
    if not info.start_time:
        return ""
    end = info.end_time or time.time() * 1000
    s = max(0, int((end - info.start_time) / 1000))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def job_rows(jobs: list[Any]) -> list[dict[str, Any]]:
    """One record per job: submission id, status, experiment, start and end (epoch ms), message."""
    return [
        {
            "submission_id": j.submission_id or j.job_id or "",
            "status": str(j.status),
            "experiment": (j.metadata or {}).get("gpt2exp.experiment", ""),
            "start_time": j.start_time,
            "end_time": j.end_time,
            "message": first_line(j.message or ""),
        }
        for j in jobs
    ]


def jobs_table(jobs: list[Any]) -> Any:
    """A rich table of jobs: id, status, experiment, start, duration, message."""
    from rich.table import Table

    table = Table(title=f"{len(jobs)} job(s)")
    for col in ("submission id", "status", "experiment", "started", "duration", "message"):
        table.add_column(col, overflow="fold")
    for j, row in zip(jobs, job_rows(jobs), strict=True):
        table.add_row(
            row["submission_id"], row["status"], row["experiment"], when(j.start_time), duration(j), row["message"][:80]
        )
    return table


def describe_job(info: Any) -> list[str]:
    """``jobs status`` lines: the status, Ray's message, and where the experiment writes."""
    meta = info.metadata or {}
    lines = [f"{info.submission_id or info.job_id}: {info.status}"]
    if info.message:
        lines.append(f"  message: {first_line(info.message)}")
    for key, label in (("gpt2exp.experiment", "experiment"), ("gpt2exp.output", "output"), ("gpt2exp.tracking_uri", "MLflow")):
        if meta.get(key):
            lines.append(f"  {label}: {meta[key]}")
    if info.start_time:
        lines.append(f"  started: {when(info.start_time)} · duration {duration(info)}")
    lines.append(f"  entrypoint: {info.entrypoint}")
    return lines
