"""The ``gpt2exp`` command line: one Typer app, one module per group of commands.

``experiment`` (validate, run, compare, schema), ``models`` (generate, evaluate), ``ui``, ``jobs`` (submit and
``gpt2exp jobs ...``), ``pipeline`` (``gpt2exp pipeline ...``); ``output`` holds the consoles and the one error
path (:class:`~gpt2exp.cli.output.OneErrorPath`), ``options`` the options several commands share. Commands
import their heavy libraries (torch, MLflow, Ray) when they run, so that ``--help`` and ``validate`` stay fast."""

from __future__ import annotations

from typing import Annotated

import typer

from gpt2exp.cli import experiment, jobs, models, pipeline, ui
from gpt2exp.cli.output import OneErrorPath

__all__ = ["app", "main"]

app = typer.Typer(cls=OneErrorPath, no_args_is_help=True, help="Compare GPT-2 variants from one YAML spec.")


def _version(value: bool) -> None:
    if value:
        from gpt2exp import __version__

        typer.echo(f"gpt2exp {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Compare GPT-2 variants from one YAML spec."""


# registered here, in the order `gpt2exp --help` lists them
for command in (
    experiment.validate,
    experiment.run,
    experiment.compare,
    experiment.schema,
    models.generate,
    models.evaluate,
    ui.ui,
    jobs.submit,
):
    app.command()(command)
app.add_typer(jobs.jobs_app, name="jobs")
app.add_typer(pipeline.pipeline_app, name="pipeline")


def main() -> None:
    """The ``gpt2exp`` command (also ``python -m gpt2exp.cli``); errors go through ``OneErrorPath``."""
    app()
