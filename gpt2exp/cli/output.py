"""What the CLI prints, and its one error path: the consoles, ``error: ...`` lines, a bad spec's
``FILE: path: reason`` lines, and the group that turns whatever a command raises into them."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from gpt2exp.errors import describe, printable
from gpt2exp.spec import SpecError

if TYPE_CHECKING:
    from typer._click import Context  # Typer's groups run on its vendored click: ctx is this Context, not typer.Context

console = Console() if sys.stdout.isatty() else Console(width=160)  # piped output: no truncated tables
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def fail_spec(e: SpecError) -> typer.Exit:
    """Print a bad spec's ``FILE: path: reason`` lines on stderr and return the Exit to raise (code 2)."""
    for line in e.lines():
        err_console.print(printable(line), highlight=False, soft_wrap=True, markup=False)
    return typer.Exit(e.code)


def print_json(data: object) -> None:
    """``data`` as JSON on stdout (NaN as null), for scripts: ``--json`` on the commands that have it."""
    sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")


def note(text: str) -> None:
    """A short note on stderr, as it is (no markup): what ``gpt2exp submit`` says while it works."""
    err_console.print(text, highlight=False, markup=False, soft_wrap=True)


class OneErrorPath(TyperGroup):
    """The top-level group: whatever a command raises ends as ``error: ...`` (a bad spec: its
    ``FILE: path: reason`` lines) and exit code 1 or 2 (see ``gpt2exp.errors.describe``), Ctrl-C as
    one line and exit code 130; a traceback only with ``GPT2EXP_DEBUG=1``."""

    def invoke(self, ctx: Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except Exception as e:
            if type(e).__module__.split(".")[0] in ("typer", "click") or os.environ.get("GPT2EXP_DEBUG") == "1":
                raise  # exits and usage errors are Typer's to handle; debugging: the traceback
            if isinstance(e, SpecError):
                raise fail_spec(e) from None
            raise fail(*describe(e)) from None
