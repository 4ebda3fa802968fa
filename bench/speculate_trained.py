"""Speculative decoding on trained models: acceptance and end-to-end tokens/s of batch-1 greedy decoding, on Python
the models never saw in training. The target and its draft are small CodeGens trained on this machine's standard
library with some modules held out (bench/speculate_models.py trains them into bench/out/speculate/ if missing).

    python bench/speculate_trained.py                  # both tasks, methods none,ngram:4,ngram:8,draft:4, 3 rounds
    python bench/speculate_trained.py --tasks edit --methods none,ngram:8 --rounds 5

Tasks (prompts from the held-out modules, bench/speculate_models.py HELD_OUT; at most 512 positions, the models'):

  complete  --per-file cursor points at line starts in each held-out file; the prompt is the file up to the cursor,
            its last --prompt-tokens tokens; 128 new tokens (EOS ends a completion; fewer if the positions run out)
  edit      a function of a held-out file (6-40 lines, at most 200 tokens), then the same function with a small
            change: renamed, and its first parameter renamed; the prompt ends with the changed signature and the
            model writes the body, which is close to the one above it (the body's length in tokens, + 16)

Methods: none; ngram:K (n-gram lookup, K tokens at most per step); draft:K (the trained draft model);
self-int8:K. Peers (--peers): transformers plain and with prompt_lookup_num_tokens=K / assistant_model=draft
(num_assistant_tokens=K, constant schedule), and CTranslate2, on the same prompts. --precision int8 runs ours and
CTranslate2 in int8 (transformers has no int8 CPU path to compare): whether speculation keeps int8 greedy output
identical on trained weights, where verify rows and single rows may round differently.

Every method runs every prompt of a task once per round (one request at a time: batch 1), rounds interleave the
methods, and the figure is the median over rounds of generated tokens / seconds. Each method's tokens are compared
with those of `none` (greedy equality). Writes --json, and --traces: the n-gram runs' steps on `complete` (at
which generated position how many tokens were proposed and kept), which bench/speculate.py replays on the 350M shape.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from machine import cpu_summary
from speculate import Recorder, ct2_folder, load_average, peak_rss_gb, progress, run
from speculate_models import HELD_OUT, STDLIB, build, model_path

import torch  # noqa: E402  (speculate imported codegen_lm first)

from codegen_lm.engine import Generator, SamplingParams, SpeculativeConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POSITIONS = 512  # the trained models' n_positions
LOOKAHEAD = 16  # positions left free past the last new token: a verify step (ours, transformers') reads up to K beyond it


# -- tasks -----------------------------------------------------------------------------------------------------


def completion_prompts(tokenizer, per_file: int, prompt_tokens: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, max new tokens): cursor points at the start of indented lines in the second half of each held-out
    file; the prompt is the last ``prompt_tokens`` tokens of the file before the cursor."""
    rng = random.Random(seed)
    prompts = []
    for name in HELD_OUT:
        lines = (STDLIB / name).read_text(encoding="utf-8").splitlines(keepends=True)
        candidates = [i for i in range(len(lines) // 2, len(lines) - 10) if lines[i].startswith("    ") and lines[i].strip()]
        for i in sorted(rng.sample(candidates, per_file)):
            text = "".join(lines[:i]) + lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            prompt = tokenizer.encode(text)[-prompt_tokens:]
            prompts.append((prompt, min(128, POSITIONS - LOOKAHEAD - len(prompt))))
    return prompts


def changed(source: str, func: ast.FunctionDef) -> str:
    """The function's signature with a small change: the function renamed, and its first parameter (after self/cls)."""
    lines, header, depth = source.splitlines(keepends=True), "", 0
    for line in lines[func.lineno - 1 :]:
        header += line
        depth += line.count("(") - line.count(")")
        if depth <= 0 and line.split("#")[0].rstrip().endswith(":"):
            break
    start, rest = header.split(f"def {func.name}(", 1)
    params = [a.arg for a in func.args.args if a.arg not in ("self", "cls")]
    if params:
        rest = re.sub(rf"\b{params[0]}\b", f"{params[0]}_new", rest, count=1)
    return f"{start}def {func.name}_v2({rest}"


def edit_prompts(tokenizer, count: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, max new tokens): a held-out function, a blank line, then its changed header; the body to write is
    the original's length in tokens + 16."""
    rng = random.Random(seed)
    found = []
    for name in HELD_OUT:
        source = (STDLIB / name).read_text(encoding="utf-8")
        lines = source.splitlines(keepends=True)
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.FunctionDef) or node.decorator_list or node.body[0].lineno == node.lineno:
                continue
            if not 6 <= node.end_lineno - node.lineno + 1 <= 40:
                continue
            function = "".join(lines[node.lineno - 1 : node.end_lineno])
            body = "".join(lines[node.body[0].lineno - 1 : node.end_lineno])
            indent = len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())
            prompt = tokenizer.encode(dedent(function, indent) + "\n" + dedent(changed(source, node), indent))
            new = len(tokenizer.encode(dedent(body, indent))) + 16
            if len(tokenizer.encode(function)) <= 200 and len(prompt) + new + LOOKAHEAD <= POSITIONS:
                found.append((prompt, new))
    return rng.sample(found, min(count, len(found)))


def dedent(text: str, indent: int) -> str:
    """``text`` moved left by ``indent`` columns (a method becomes a top-level function)."""
    return "".join(line[indent:] if line.strip() else line for line in text.splitlines(keepends=True))


# -- systems ---------------------------------------------------------------------------------------------------


def parse_method(text: str) -> tuple[str, int]:
    method, _, k = text.partition(":")
    return method, int(k or 4)


def ours(method: str, k: int, draft: Path, precision: str) -> Callable[[list[tuple[list[int], int]]], dict]:
    """A run of our engine over prompts, one request at a time; returns tokens, seconds, passes, proposed, accepted,
    the token ids, and the trace of each verify step (n-gram and draft)."""
    speculative = None if method == "none" else SpeculativeConfig(method, k, draft_model=str(draft) if method == "draft" else None)
    quantize = {"quantize": precision} if precision != "fp32" else {}
    generator = Generator.from_pretrained(str(model_path("target")), max_batch=1, prefix_cache_mb=0, speculative=speculative,
                                          **quantize)

    def once(prompts: list[tuple[list[int], int]]) -> dict:
        out = {"tokens": 0, "seconds": 0.0, "passes": 0, "proposed": 0, "accepted": 0, "ids": [], "traces": []}
        for prompt, new in prompts:
            scheduler = generator.scheduler()
            recorder = Recorder(scheduler) if speculative is not None else None
            seconds, done = run(scheduler, {"0": prompt}, SamplingParams(max_new_tokens=new))
            c = done["0"]
            out["tokens"] += len(c.token_ids)
            out["seconds"] += seconds
            out["passes"] += c.forward_passes
            out["proposed"] += c.proposed_tokens
            out["accepted"] += c.accepted_tokens
            out["ids"].append(c.token_ids)
            out["traces"].append({"tokens": len(c.token_ids), "steps": recorder.trace.get("0", {}) if recorder else {}})
        return out

    return once


def transformers_runner(draft: Path, **kwargs) -> Callable[[list[tuple[list[int], int]]], dict]:
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.CodeGenForCausalLM.from_pretrained(model_path("target"), dtype=torch.float32).eval()
    if kwargs.pop("assistant", False):
        kwargs["assistant_model"] = transformers.CodeGenForCausalLM.from_pretrained(draft, dtype=torch.float32).eval()

    def once(prompts: list[tuple[list[int], int]]) -> dict:
        out = {"tokens": 0, "seconds": 0.0, "ids": []}
        for prompt, new in prompts:
            ids = torch.tensor([prompt])
            start = time.perf_counter()
            with torch.inference_mode():
                result = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                                        pad_token_id=50256, eos_token_id=50256, **kwargs)
            out["seconds"] += time.perf_counter() - start
            tokens = result[0, len(prompt) :].tolist()
            out["tokens"] += len(tokens)
            out["ids"].append(tokens)
        return out

    return once


def ctranslate2_runner(threads: int, precision: str) -> Callable[[list[tuple[list[int], int]]], dict]:
    import ctranslate2

    folder = ct2_folder(model_path("target"), precision)
    generator = ctranslate2.Generator(str(folder), device="cpu", compute_type={"fp32": "float32", "int8": "int8"}[precision],
                                      intra_threads=threads, inter_threads=1)
    vocab = json.loads((folder / "vocabulary.json").read_text())
    index = {token: i for i, token in enumerate(vocab)}

    def once(prompts: list[tuple[list[int], int]]) -> dict:
        out = {"tokens": 0, "seconds": 0.0, "ids": []}
        for prompt, new in prompts:
            start = time.perf_counter()
            result = generator.generate_batch([[vocab[i] for i in prompt]], max_length=new, include_prompt_in_result=False,
                                              end_token="<|endoftext|>")
            out["seconds"] += time.perf_counter() - start
            tokens = [index[t] for t in result[0].sequences[0]]
            out["tokens"] += len(tokens)
            out["ids"].append(tokens)
        return out

    return once


# -- main ------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="complete,edit")
    parser.add_argument("--methods", default="none,ngram:4,ngram:8,draft:4")
    parser.add_argument("--peers", default="transformers,ctranslate2", help="peers to run beside ours ('' for none)")
    parser.add_argument("--k", type=int, default=4, help="the peers' proposals per step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--per-file", type=int, default=2, help="complete: cursor points per held-out file")
    parser.add_argument("--prompt-tokens", type=int, default=368, help="complete: prompt length")
    parser.add_argument("--edits", type=int, default=16, help="edit: functions")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    parser.add_argument("--json", type=Path, help="default: bench/out/speculate-trained[-int8].json")
    parser.add_argument("--traces", type=Path, help="where the n-gram traces on `complete` go, for bench/speculate.py "
                        "(default: bench/out/speculate/traces[-int8].json)")
    args = parser.parse_args()
    suffix = "" if args.precision == "fp32" else f"-{args.precision}"
    args.json = args.json or ROOT / "bench" / "out" / f"speculate-trained{suffix}.json"
    args.traces = args.traces or model_path("target").parent / f"traces{suffix}.json"
    torch.set_num_threads(args.threads)
    build(["target", "draft"])
    from codegen_lm.tokenizer import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path("target")))
    tasks = {"complete": completion_prompts(tokenizer, args.per_file, args.prompt_tokens),
             "edit": edit_prompts(tokenizer, args.edits)}
    tasks = {name: tasks[name] for name in args.tasks.split(",")}
    print(f"cpu: {cpu_summary()}; torch {torch.__version__}, {args.threads} threads; load average {load_average()}")
    for name, prompts in tasks.items():
        print(f"{name}: {len(prompts)} prompts, {sum(len(p) for p, _ in prompts)} prompt tokens, at most "
              f"{sum(n for _, n in prompts)} new")
    draft = model_path("draft")
    systems: dict[str, Callable] = {}
    for text in args.methods.split(","):
        method, k = parse_method(text)
        systems[text if method != "none" else "none"] = ours(method, k, draft, args.precision)
    peers = [p for p in args.peers.split(",") if p]
    if "transformers" in peers and args.precision == "fp32":
        systems["transformers"] = transformers_runner(draft)
        systems[f"transformers prompt lookup k={args.k}"] = transformers_runner(draft, prompt_lookup_num_tokens=args.k)
        systems[f"transformers assistant=draft k={args.k}"] = transformers_runner(
            draft, assistant=True, num_assistant_tokens=args.k, num_assistant_tokens_schedule="constant")
    if "ctranslate2" in peers:
        systems[f"ctranslate2 {args.precision}"] = ctranslate2_runner(args.threads, args.precision)
    for system in systems.values():  # warm-up
        system([tasks[next(iter(tasks))][0]])

    samples: dict[tuple[str, str], list[dict]] = {(t, s): [] for t in tasks for s in systems}
    bar, handle = progress(args.rounds * len(samples), "trained models")
    with bar:
        for _ in range(args.rounds):
            for task, prompts in tasks.items():
                for name, system in systems.items():
                    samples[(task, name)].append(system(prompts))
                    bar.advance(handle)

    report = {"cpu": cpu_summary(), "threads": args.threads, "precision": args.precision, "load_end": load_average(), "tasks": {}}
    for task, prompts in tasks.items():
        base_ids = samples[(task, "none")][0]["ids"]
        rows = {}
        for name in systems:
            runs = samples[(task, name)]
            rate = statistics.median(r["tokens"] / r["seconds"] for r in runs)
            first = runs[0]
            rows[name] = {"tok_s": rate, "runs": [r["tokens"] / r["seconds"] for r in runs], "tokens": first["tokens"],
                          "differ": sum(a != b for a, b in zip(first["ids"], base_ids)),
                          **{key: first[key] for key in ("passes", "proposed", "accepted") if key in first}}
        report["tasks"][task] = rows
        base = rows["none"]["tok_s"]
        print(f"\n### {task} ({len(prompts)} prompts, batch 1 greedy): tokens/s (median of {args.rounds} rounds)")
        print("| system | tok/s | × ours none | acceptance | tokens per forward pass | completions that differ from none |\n"
              "|---|---|---|---|---|---|")
        for name, r in rows.items():
            acceptance = f"{r['accepted'] / r['proposed']:.0%}" if r.get("proposed") else ""
            per_pass = f"{r['tokens'] / r['passes']:.2f}" if r.get("passes") else ""
            print(f"| {name} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}× | {acceptance} | {per_pass} | "
                  f"{r['differ']} of {len(prompts)} |")
    ngram = next((s for s in systems if s == f"ngram:{args.k}"), next((s for s in systems if s.startswith("ngram")), None))
    if ngram is not None and "complete" in tasks:
        traces = samples[("complete", ngram)][0]["traces"]
        args.traces.parent.mkdir(parents=True, exist_ok=True)
        args.traces.write_text(json.dumps({"k": parse_method(ngram)[1], "method": ngram, "traces": traces}) + "\n")
        print(f"\nn-gram traces ({ngram}, complete) for bench/speculate.py: {args.traces}")
    report["peak_rss_gb"] = peak_rss_gb()
    print(f"load average at end: {report['load_end']}; peak RSS {report['peak_rss_gb']:.2f} GB")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
