"""The ``codegen-lm`` command: each subcommand is a plain typed function that calls the library."""

from __future__ import annotations

import os
import sys

import typer

app = typer.Typer(
    name="codegen-lm",
    help="Run, serve, evaluate and fine-tune Salesforce CodeGen models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Errors that come from what the user typed or pointed us at: shown as one line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError)


def fail(message: str, code: int = 2) -> "typer.Exit":
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


# Commands are added below this line, one function each.


def main() -> None:
    """Entry point: run the app; user mistakes print one line and exit non-zero (CODEGEN_LM_DEBUG=1 shows tracebacks)."""
    try:
        app()
    except USER_ERRORS as e:
        if os.environ.get("CODEGEN_LM_DEBUG"):
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
