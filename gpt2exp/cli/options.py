"""Arguments and options that several commands share (Typer reads them from the type annotations)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer


class Launcher(StrEnum):
    local = "local"
    ray = "ray"


class Format(StrEnum):
    """What ``compare`` prints (gpt2exp.report.FORMATS)."""

    table = "table"
    markdown = "markdown"
    csv = "csv"
    json = "json"


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout (other output goes to stderr).")]
LauncherOpt = Annotated[
    Launcher | None, typer.Option(help="The launcher (default: the spec's parallel.launcher).", show_default=False)
]
SpecArg = Annotated[Path, typer.Argument(help="Experiment spec (YAML).", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a field: a.b.c=value (repeatable).")]
OutputOpt = Annotated[Path, typer.Option(help="The project's output folder (its MLflow store: <output>/mlflow.db).")]
TrackingUriOpt = Annotated[
    str | None, typer.Option(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the output folder's store).")
]

# Ray Jobs: `submit` and `pipeline submit`, the `jobs` commands
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        "-a",
        help="The cluster's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS).",
        show_default=False,
    ),
]
ClusterOutputOpt = Annotated[
    str | None,
    typer.Option(
        "--output",
        help="Output folder as the cluster sees it (several nodes: an absolute path on a shared filesystem). "
        "Default: ./outputs, when the cluster runs on this machine.",
        show_default=False,
    ),
]
FollowOpt = Annotated[bool, typer.Option("--follow", "-f", help="Stream the job's logs and exit with its final status.")]
WorkingDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="Project folder to upload (default: the current one; .gitignore and .rayignore apply).", show_default=False
    ),
]
ExcludeOpt = Annotated[list[str] | None, typer.Option(help="Also leave out these paths (gitignore patterns, repeatable).")]
AutoscalingOpt = Annotated[
    bool, typer.Option(help="The cluster adds nodes on demand: multi-node rules apply, the resource check is skipped.")
]
SubmissionIdOpt = Annotated[str | None, typer.Option(help="Job id (default: gpt2exp-<name>-<UTC time>).", show_default=False)]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="List the files that would be uploaded and the entrypoint; contact no one.")
]
