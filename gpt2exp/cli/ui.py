"""``gpt2exp ui``: the MLflow UI over the project's store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gpt2exp.cli.options import OutputOpt, TrackingUriOpt


def ui(
    output: OutputOpt = Path("outputs"),
    tracking_uri: TrackingUriOpt = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 5000,
    host: Annotated[
        str, typer.Option(help="Address to listen on (MLflow refuses Host headers that are not local or private).")
    ] = "127.0.0.1",
    open_browser: Annotated[bool, typer.Option("--open/--no-open", help="Open the UI in the default web browser.")] = False,
) -> None:
    """Serve the MLflow UI over the project's store (one worker, this machine only) until Ctrl-C."""
    from gpt2exp.tracking.runs import project_store, store_uri
    from gpt2exp.tracking.ui import serve_ui

    own, uri = project_store(output), store_uri(output, tracking_uri)
    code = serve_ui(uri, output / "mlartifacts" if uri == own else None, host=host, port=port, open_browser=open_browser)
    raise typer.Exit(code)
