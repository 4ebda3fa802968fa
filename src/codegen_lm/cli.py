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


@app.command("convert")
def convert_command(
    src: str = typer.Argument(..., help="Checkpoint folder or hub id (CodeGen; a GPT-J export for --to codegen)."),
    dst: str = typer.Argument(..., help="Folder to create."),
    to: str = typer.Option(..., "--to", help="Target format: gptj (vLLM, TGI, ...), codegen, ctranslate2."),
    dtype: str = typer.Option(None, "--dtype", help="fp32, fp16 or bf16 (default: keep the source's)."),
    quantization: str = typer.Option(
        None, "--quantization", help="CTranslate2 weight type: int8, int8_float32, int8_float16, int8_bfloat16, int16, float16, bfloat16, float32."
    ),
    max_shard_size: str = typer.Option("2GiB", "--max-shard-size", help="Largest safetensors shard (gptj, codegen)."),
    force: bool = typer.Option(False, "--force", help="Replace DST if it exists."),
) -> None:
    """Convert a checkpoint for another engine (GPT-J layout, CTranslate2) or back to the CodeGen layout."""
    import time

    from .checkpoint import parse_size
    from .convert import SIDE_FILES, convert

    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError:
        raise ValueError(f"--max-shard-size {max_shard_size!r} is not a size; write it like 2GiB or 500MB") from None
    start = time.perf_counter()
    out = convert(src, dst, to, dtype=dtype, quantization=quantization, force=force, max_shard_size=shard_bytes, progress=True)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    typer.echo(f"wrote {out} ({to}, {size / 2**20:,.1f} MiB) in {time.perf_counter() - start:.1f} s")
    if to != "ctranslate2" and not any((out / name).is_file() for name in SIDE_FILES[:3]):
        typer.echo(f"note: {src} has no tokenizer files; copy the base model's tokenizer files into {out} before serving it", err=True)


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
