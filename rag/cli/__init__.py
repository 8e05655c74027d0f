"""The ``rag`` command line: one module per command group, each command a thin call into the
library (`rag.cli.index`, `rag.cli.query`, `rag.cli.serve`, `rag.cli.eval`, `rag.cli.tune`,
`rag.cli.models`).

Errors print one line on stderr and exit 1 (a traceback with ``rag --debug ...``).
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType
from typing import Annotated

import typer

from rag.cli import eval as eval_cmds
from rag.cli import index, models, query, serve, tune
from rag.errors import RagError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Retrieval-augmented generation: index, search, ask, chat, serve, eval.")
app.add_typer(index.app, name="index")
app.add_typer(tune.app, name="tune")
app.add_typer(models.app, name="models")
for command in (query.search, query.ask, query.chat, serve.serve, eval_cmds.export, models.demo):
    app.command()(command)
app.command("eval")(eval_cmds.eval_)
_debug = False


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks and info logs")] = False) -> None:
    global _debug
    _debug = debug
    logging.getLogger().setLevel(logging.INFO if debug else logging.WARNING)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _click_errors() -> tuple[tuple[type[BaseException], ...], ...]:
    """(exits, usage errors, aborts): typer >= 0.29 has its own click (typer._click), older ones click's."""
    import click

    try:
        from typer import exceptions as typer_exc
        from typer._click import exceptions as vendored
    except ImportError:
        return (click.exceptions.Exit,), (click.ClickException,), (click.exceptions.Abort,)
    return ((click.exceptions.Exit, typer_exc.Exit), (click.ClickException, vendored.ClickException),
            (click.exceptions.Abort, typer_exc.Abort))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the Typer app and turns `RagError`s into one-line errors."""
    exits, usage, aborts = _click_errors()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM unwinds like Ctrl-C, so engines and their processes are shut down on the way out
    # (`rag serve` installs uvicorn's own handler while it runs)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        rc = typer.main.get_command(app).main(args=argv, prog_name="rag", standalone_mode=False)
    except exits as e:
        return int(getattr(e, "exit_code", 0))
    except usage as e:
        e.show()  # type: ignore[attr-defined]
        return int(getattr(e, "exit_code", 2))
    except aborts:
        typer.echo("aborted", err=True)
        return 130
    except RagError as e:
        if _debug:
            raise
        typer.echo(f"error: {e}", err=True)
        return 1
    except KeyboardInterrupt:
        typer.echo("interrupted (an index build resumes when run again)", err=True)
        return 130
    return rc if isinstance(rc, int) else 0  # a typer.Exit(code) inside a command
