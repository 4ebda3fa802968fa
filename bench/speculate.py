"""Speculative decoding on the 350M shape (random weights, 2 threads): what verifying k proposed tokens costs, and
what the whole loop gains at an acceptance we control, side by side with CTranslate2 and transformers' assisted
generation.

    python bench/speculate.py                                   # every part, fp32 and int8, 3 rounds
    python bench/speculate.py --parts steps --batches 1,4,16    # the verify-step cost only
    python bench/speculate.py --parts loop --traces bench/out/speculate/traces.json

Each precision runs in one process; the rounds interleave every variant of a part, and figures are medians over
rounds. Random weights cannot show acceptance honestly (an untrained model's greedy text repeats one token, which
flatters n-gram lookup), so acceptance here is controlled, and every such figure is labelled simulated.

In fp32 two copies of the model are loaded, as users get them: one for plain decoding and one in the layouts made
for verify steps (``Generator.from_pretrained(..., speculative=...)``, ``codegen_lm.kernels``). Runs without
speculation use the first, speculative runs the second, so every "× none" is against the plain model.

  steps  a scheduler step of b decoding sequences (128-token random prompts), each verifying k = 1..8 proposed
         tokens, against a plain decode step of the same b (both in the speculative layouts; the plain model's
         step is the loop's "none"): the time ratio, and the knee where a step turns
         compute-bound (the engine's DEFAULT_MAX_STEP_TOKENS["cpu"]: proposals stop where a step would carry more)
  loop   batch 1, greedy, a 64-token random prompt, --new-tokens tokens (EOS ignored), end to end, prefill included:
           none                  ours without speculation
           none, speculative layouts  (fp32) the same in the layouts made for verify steps: what they cost a step
                                 without proposals
           oracle a=A k=K        (simulated) proposes the target's own greedy continuation (computed before, without
                                 speculation), each token replaced by a wrong one with probability 1 - A
           replay k=K            (simulated) the trained model's n-gram speculation (bench/speculate_trained.py
                                 writes --traces) replayed position by position: where it proposed n tokens and
                                 kept a, the same
           draft=target k=K      the model drafts for itself: everything accepted, each draft token a full step
           random draft k=K      a random 4x256 model drafts: nothing accepted (the adaptive pause must hold the
                                 loss under 5%)
           ngram k=K (repeats)   n-gram lookup on the random model's output, which repeats one token (flattering;
                                 for the peer comparison only, where transformers' prompt lookup sees the same)
         and the peers at the same precision: CTranslate2 (greedy), transformers (fp32 only) plain, with
         prompt_lookup_num_tokens=K, and with assistant_model (the target itself; the random 4x256 model),
         num_assistant_tokens=K on a constant schedule
  batch  b = 1..32 random 64-token prompts, 64 new tokens each, greedy, all at once: generated tokens/s with and
         without speculation (n-gram on the repeating output; the oracle at --batch-alpha), where the room left
         under max_step_tokens turns proposals off

Every speculative run's tokens are checked against the run without speculation (greedy equality; a difference would
come from float rounding between batch shapes, and is counted). Prints the machine and the load; writes --json and
--plot.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from machine import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 50295  # the CodeGen tokenizer's tokens: random prompts and wrong proposals stay inside it
STEP_PROMPT, LOOP_PROMPT = 128, 64

import codegen_lm  # noqa: E402,F401  first, as the CLI does (it sets torch's allocator up before torch allocates)
import torch  # noqa: E402

from codegen_lm.engine import SamplingParams, Scheduler, SpeculativeConfig  # noqa: E402
from codegen_lm.engine.speculate import Proposal, Speculator  # noqa: E402


# -- proposers whose acceptance the benchmark controls ----------------------------------------------------------


class _Installed(Speculator):
    """A speculator that takes over an existing scheduler's (same config, model, vocabulary and draft)."""

    def __init__(self, scheduler: Scheduler):
        super().__init__(scheduler.speculative, scheduler.model, scheduler.vocab_limit, scheduler.draft)
        scheduler.speculator = self


class FixedProposals(_Installed):
    """Exactly ``k`` random proposals for every decoding row at every step, no pauses, no room limit: what a verify
    step costs."""

    def __init__(self, scheduler: Scheduler):
        super().__init__(scheduler)
        self.k, self.rng = 0, random.Random(0)

    def propose(self, seqs, room):
        return {seq: Proposal(random_tokens(self.rng, self.k)) for seq in seqs} if self.k else {}


class Oracle(_Installed):
    """Simulated acceptance: proposes the target's own greedy continuation ``truth[request id]`` (computed without
    speculation), each token replaced by a wrong one with probability ``1 - alpha``. The engine's pauses and the
    step's room apply as to n-gram proposals."""

    def __init__(self, scheduler: Scheduler, truth: dict[str, list[int]], alpha: float, seed: int = 0):
        super().__init__(scheduler)
        self.truth, self.alpha, self.rng = truth, alpha, random.Random(seed)

    def _wrong(self, token: int) -> int:
        return (token + 1 + self.rng.randrange(VOCAB - 1)) % VOCAB

    def _ngram(self, seq, count: int) -> list[int]:
        at = len(seq.token_ids)
        return [t if self.rng.random() < self.alpha else self._wrong(t)
                for t in self.truth[seq.request.id][at : at + count]]


class Replay(Oracle):
    """Simulated: recorded speculation replayed on this model. ``traces[request id]`` maps a generated position to
    (tokens proposed there, tokens kept); the same number is proposed at the same position, and the same number kept."""

    def __init__(self, scheduler: Scheduler, truth: dict[str, list[int]], traces: dict[str, dict[int, tuple[int, int]]]):
        super().__init__(scheduler, truth, 1.0)
        self.traces = traces

    def _ngram(self, seq, count: int) -> list[int]:
        at = len(seq.token_ids)
        proposed, kept = self.traces[seq.request.id].get(at, (0, 0))
        tokens = self.truth[seq.request.id][at : at + min(proposed, count)]
        return [t if j < kept else self._wrong(t) for j, t in enumerate(tokens)]


class Recorder(_Installed):
    """The scheduler's own proposer, each verify step recorded: ``trace[request id][generated position] = (proposed,
    kept)`` (what ``Replay`` replays)."""

    def __init__(self, scheduler: Scheduler):
        super().__init__(scheduler)
        self.trace: dict[str, dict[int, tuple[int, int]]] = {}

    def settle(self, seq, proposed: int, kept: int) -> None:
        self.trace.setdefault(seq.request.id, {})[len(seq.token_ids)] = (proposed, kept)
        super().settle(seq, proposed, kept)


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


# -- running the engine ----------------------------------------------------------------------------------------


def run(scheduler: Scheduler, prompts: dict[str, list[int]], params: SamplingParams) -> tuple[float, dict]:
    """Seconds to complete every prompt (all added at once), and the completions by request id."""
    done = {}
    start = time.perf_counter()
    for request_id, prompt in prompts.items():
        scheduler.add_request(prompt, params, request_id=request_id)
    while scheduler.has_unfinished():
        for out in scheduler.step():
            if out.error is not None:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            if out.completion is not None:
                done[out.request_id] = out.completion
    return time.perf_counter() - start, done


def scheduler_for(model, speculative: SpeculativeConfig | None = None, draft=None, max_batch: int = 1) -> Scheduler:
    return Scheduler(model, None, max_batch, speculative=speculative, draft=draft)


def load(path: Path, precision: str, several_rows: bool = False):
    """The model for inference; ``several_rows``: in the fp32 layouts chosen for steps of several rows (verify steps),
    as ``Generator.from_pretrained(..., speculative=...)`` loads it (int8 has no fp32 layers: the same model)."""
    from codegen_lm.checkpoint import load_model

    return load_model(path, inference=True, quantize=None if precision == "fp32" else precision, several_rows=several_rows)


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def progress(total: int, description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), transient=True)
    return bar, bar.add_task(description, total=total)


# -- part 1: the cost of a verify step -------------------------------------------------------------------------


def step_costs(model, batches: list[int], ks: list[int], rounds: int, steps: int) -> dict[tuple[int, int], float]:
    """Median seconds of a scheduler step with ``b`` decoding rows each verifying ``k`` proposals (k = 0: a plain
    decode step). Per batch size one scheduler; rounds interleave the k (after one untimed round)."""
    rng = random.Random(1)
    samples: dict[tuple[int, int], list[float]] = {(b, k): [] for b in batches for k in ks}
    bar, task = progress(len(batches) * (rounds + 1) * len(ks), "verify steps")
    with bar:
        for b in batches:
            config = SpeculativeConfig("ngram", max(ks) or 1, max_step_tokens=10**6)
            scheduler = scheduler_for(model, config, max_batch=b)
            speculator = FixedProposals(scheduler)
            budget = 2 * (rounds + 1) * len(ks) * steps + 16  # tokens each row may add (random proposals: ~none kept)
            for _ in range(b):
                scheduler.add_request(random_tokens(rng, STEP_PROMPT), SamplingParams(max_new_tokens=budget, ignore_eos=True))
            while scheduler.waiting or any(s.prefilling for s in scheduler.running):
                scheduler.step()
            for round_ in range(rounds + 1):
                for k in ks:
                    speculator.k = k
                    times = []
                    for _ in range(steps):
                        start = time.perf_counter()
                        scheduler.step()
                        times.append(time.perf_counter() - start)
                    if round_:  # the first round builds the kernels for each shape
                        samples[(b, k)].append(statistics.median(times))
                    bar.advance(task)
            if len(scheduler.running) != b:
                sys.exit(f"batch {b}: a sequence finished during the measurement; raise its token budget")
            del scheduler
            gc.collect()
    return {key: statistics.median(v) for key, v in samples.items()}


def knee(costs: dict[tuple[int, int], float]) -> tuple[float, float, float]:
    """Where a step turns compute-bound: the plain batch-1 step ``floor`` (reading the weights) against the line
    fitted (least squares) through the steps of 32 tokens or more (compute per token ``slope``, plus an intercept);
    the knee is the token count where that line reaches the floor. Returns (knee, floor, slope)."""
    floor = costs[(1, 0)]
    points = [(b * (k + 1), t) for (b, k), t in costs.items() if b * (k + 1) >= 32]
    if len(points) < 2:
        return float("nan"), floor, float("nan")
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    intercept = my - slope * mx
    return (floor - intercept) / slope, floor, slope


def print_steps(precision: str, costs: dict[tuple[int, int], float], ks: list[int]) -> dict:
    batches = sorted({b for b, _ in costs})
    print(f"\n### Verify step cost, {precision}: ms per step (ratio to the plain step of the same batch; tokens in the step)")
    print("| b | " + " | ".join(f"k={k}" for k in ks) + " |\n|" + "---|" * (len(ks) + 1))
    for b in batches:
        plain = costs[(b, 0)]
        cells = [f"{costs[(b, k)] * 1e3:.1f} ({costs[(b, k)] / plain:.2f}×; {b * (k + 1)})" for k in ks]
        print(f"| {b} | " + " | ".join(cells) + " |")
    point, floor, slope = knee(costs)
    print(f"knee ({precision}): a plain batch-1 step {floor * 1e3:.1f} ms; past 32 tokens a step costs "
          f"{slope * 1e3:.2f} ms per token; the compute line reaches the plain step at {point:.1f} tokens per step")
    return {"knee_tokens": point, "floor_ms": floor * 1e3, "ms_per_token": slope * 1e3}


# -- part 2: the whole loop at batch 1, and the peers ------------------------------------------------------------


def ct2_folder(checkpoint: Path, precision: str) -> Path:
    folder = checkpoint.parent / f"{checkpoint.name}-ct2-{precision}"
    if not (folder / "model.bin").exists():
        from ctranslate2.converters import TransformersConverter

        TransformersConverter(str(checkpoint)).convert(str(folder), force=True,
                                                       quantization={"fp32": "float32", "int8": "int8"}[precision])
    return folder


def ctranslate2_runner(checkpoint: Path, precision: str, threads: int, prompt: list[int], new: int) -> Callable[[], float]:
    import ctranslate2

    folder = ct2_folder(checkpoint, precision)
    generator = ctranslate2.Generator(str(folder), device="cpu", compute_type={"fp32": "float32", "int8": "int8"}[precision],
                                      intra_threads=threads, inter_threads=1)
    vocab = json.loads((folder / "vocabulary.json").read_text())
    tokens = [[vocab[i] for i in prompt]]

    def once() -> float:
        start = time.perf_counter()
        result = generator.generate_batch(tokens, max_length=new, min_length=new, include_prompt_in_result=False)
        elapsed = time.perf_counter() - start
        assert len(result[0].sequences_ids[0]) == new
        return new / elapsed

    return once


def transformers_runners(checkpoint: Path, draft: Path, prompt: list[int], new: int, k: int) -> dict[str, Callable[[], float]]:
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.CodeGenForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    small = transformers.CodeGenForCausalLM.from_pretrained(draft, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def runner(**kwargs) -> Callable[[], float]:
        def once() -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                                     min_new_tokens=new, pad_token_id=50256, **kwargs)
            elapsed = time.perf_counter() - start
            assert out.shape[1] == ids.shape[1] + new
            return new / elapsed
        return once

    assisted = dict(num_assistant_tokens=k, num_assistant_tokens_schedule="constant")
    return {
        "transformers": runner(),
        f"transformers prompt lookup k={k} (repeats)": runner(prompt_lookup_num_tokens=k),
        f"transformers assistant=target k={k}": runner(assistant_model=model, **assisted),
        f"transformers random assistant k={k}": runner(assistant_model=small, **assisted),
    }


def load_traces(path: Path | None) -> tuple[int, list[dict]] | None:
    """(k, traces) that bench/speculate_trained.py recorded from its n-gram runs on held-out completions: each trace
    {"tokens": generated, "steps": {position: (proposed, kept)}}."""
    if path is None or not path.exists():
        return None
    data = json.loads(path.read_text())
    return data["k"], [{"tokens": t["tokens"], "steps": {int(p): tuple(v) for p, v in t["steps"].items()}}
                       for t in data["traces"]]


def acceptance(traces: list[dict]) -> float:
    steps = [v for t in traces for v in t["steps"].values()]
    return sum(a for _, a in steps) / max(1, sum(n for n, _ in steps))


def loop_variants(model, spec_model, small, precision: str, args, traces) -> tuple[dict[str, Callable[[], dict]], dict]:
    """The batch-1 variants of part 2: name -> one timed run, returning {tokens, seconds, tok_s} and for ours
    {passes, proposed, accepted, differ} (sequences whose tokens differ from the run without speculation). Runs
    without speculation use ``model``, speculative ones ``spec_model`` (fp32: its layouts made for verify steps)."""
    rng = random.Random(2)
    new, k = args.new_tokens, args.k
    prompt = random_tokens(rng, LOOP_PROMPT)
    # The continuation without speculation (each oracle proposes it; every run is checked against it).
    truth = run(scheduler_for(model), {"0": prompt}, SamplingParams(max_new_tokens=new, ignore_eos=True))[1]["0"].token_ids

    def ours(make: Callable[[], Scheduler], prompt: list[int] = prompt, truth: list[int] = truth) -> Callable[[], dict]:
        params = SamplingParams(max_new_tokens=len(truth), ignore_eos=True)

        def once() -> dict:
            seconds, done = run(make(), {"0": prompt}, params)
            c = done["0"]
            return {"tokens": len(c.token_ids), "seconds": seconds, "tok_s": len(c.token_ids) / seconds,
                    "passes": c.forward_passes, "proposed": c.proposed_tokens, "accepted": c.accepted_tokens,
                    "differ": int(c.token_ids != truth)}
        return once

    def with_speculator(kind, k: int, *extra) -> Callable[[], Scheduler]:
        def make() -> Scheduler:
            scheduler = scheduler_for(spec_model, SpeculativeConfig("ngram", k))
            kind(scheduler, *extra)
            return scheduler
        return make

    variants: dict[str, Callable[[], dict]] = {"none": ours(lambda: scheduler_for(model))}
    if spec_model is not model:  # what the layouts made for verify steps cost a step without proposals
        variants["none, speculative layouts"] = ours(lambda: scheduler_for(spec_model))
    info: dict = {}
    if traces is not None:  # recorded completions, evenly spaced, each replayed on its own prompt and length
        trace_k, recorded = traces
        chosen = [recorded[round(i * len(recorded) / args.replays)] for i in range(min(args.replays, len(recorded)))]
        info = {"replay_k": trace_k, "acceptance_all": acceptance(recorded), "acceptance_replayed": acceptance(chosen),
                "replayed": len(chosen), "recorded": len(recorded)}
        for i, trace in enumerate(chosen):
            p = random_tokens(rng, LOOP_PROMPT)
            t = run(scheduler_for(model), {"0": p}, SamplingParams(max_new_tokens=trace["tokens"], ignore_eos=True))[1]["0"].token_ids
            variants[f"replay k={trace_k} #{i}"] = ours(with_speculator(Replay, trace_k, {"0": t}, {"0": trace["steps"]}), p, t)
            variants[f"none, replayed #{i}"] = ours(lambda: scheduler_for(model), p, t)
    for kk in args.sweep_k:
        for alpha in args.alphas:
            variants[f"oracle a={alpha:g} k={kk}"] = ours(with_speculator(Oracle, kk, {"0": truth}, alpha))
    variants[f"draft=target k={k}"] = ours(lambda: scheduler_for(spec_model, SpeculativeConfig("draft", k, draft_model="target"), model))
    variants[f"random draft k={k}"] = ours(lambda: scheduler_for(spec_model, SpeculativeConfig("draft", k, draft_model="small"), small))
    variants[f"ngram k={k} (repeats)"] = ours(lambda: scheduler_for(spec_model, SpeculativeConfig("ngram", k)))
    peers: dict[str, Callable[[], float]] = {}
    if "ctranslate2" in args.peers:
        peers[f"ctranslate2 {precision}"] = ctranslate2_runner(args.checkpoint, precision, args.threads, prompt, new)
    if "transformers" in args.peers and precision == "fp32":
        peers.update(transformers_runners(args.checkpoint, args.small, prompt, new, k))
    for name, once in peers.items():
        once()  # warm-up
        variants[name] = (lambda once: lambda: {"tokens": new, "seconds": new / (r := once()), "tok_s": r})(once)
    return variants, info


def measure_variants(variants: dict[str, Callable[[], dict]], rounds: int, description: str) -> dict[str, list[dict]]:
    """Every variant once per round, the rounds interleaving them: name -> the runs."""
    samples: dict[str, list[dict]] = {name: [] for name in variants}
    bar, task = progress(rounds * len(variants), description)
    with bar:
        for _ in range(rounds):
            for name, once in variants.items():
                samples[name].append(once())
                bar.advance(task)
    return samples


def summarize(samples: dict[str, list[dict]]) -> dict[str, dict]:
    """Medians over rounds; the replayed completions (and their runs without speculation) summed per round into one
    variant each: all their tokens over all their seconds."""
    groups: dict[str, list[list[dict]]] = {}
    for name, runs in samples.items():
        groups.setdefault(name.split(" #")[0], []).append(runs)
    out = {}
    for name, members in groups.items():
        rounds = [[m[i] for m in members] for i in range(len(members[0]))]
        per_round = [{key: sum(r[key] for r in runs) for key in runs[0]} for runs in rounds]
        for r in per_round:
            r["tok_s"] = r["tokens"] / r["seconds"]
        label = name if len(members) == 1 else f"{name} ({len(members)} completions)"
        out[label] = {key: statistics.median(r[key] for r in per_round) for key in per_round[0]}
        out[label]["runs"] = [r["tok_s"] for r in per_round]
    return out


def print_loop(precision: str, results: dict[str, dict], info: dict) -> None:
    base = results["none"]["tok_s"]
    peer = next((r["tok_s"] for n, r in results.items() if n.startswith("ctranslate2")), None)
    print(f"\n### Batch-1 greedy loop, {precision}: tokens/s (median of rounds), ratios")
    print("| variant | tok/s | × none | × CTranslate2 | tokens per forward pass | acceptance | greedy differs |\n"
          "|---|---|---|---|---|---|---|")
    for name, r in results.items():
        cells = [name, f"{r['tok_s']:.1f}", f"{r['tok_s'] / base:.2f}×", f"{r['tok_s'] / peer:.2f}×" if peer else "",
                 f"{r['tokens'] / r['passes']:.2f}" if "passes" in r else "",
                 f"{r['accepted'] / r['proposed']:.0%}" if r.get("proposed") else "",
                 str(int(r["differ"])) if "differ" in r else ""]
        print("| " + " | ".join(cells) + " |")
    replay = next((r for n, r in results.items() if n.startswith("replay")), None)
    if replay is not None:
        own = next(r for n, r in results.items() if n.startswith("none, replayed"))
        print(f"replay (simulated): {info['replayed']} of the {info['recorded']} recorded n-gram completions "
              f"(k={info['replay_k']}), acceptance {info['acceptance_replayed']:.0%} (all recorded: "
              f"{info['acceptance_all']:.0%}); {replay['tok_s'] / own['tok_s']:.2f}× the same completions without "
              f"speculation" + (f", {replay['tok_s'] / peer:.2f}× CTranslate2 {precision}" if peer else ""))


# -- part 3: batches -------------------------------------------------------------------------------------------


def batch_variants(model, spec_model, b: int, k: int, alpha: float) -> dict[str, Callable[[], dict]]:
    rng = random.Random(3 + b)
    prompts = {str(i): random_tokens(rng, LOOP_PROMPT) for i in range(b)}
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)
    _, done = run(scheduler_for(model, max_batch=b), prompts, params)
    truth = {r: c.token_ids for r, c in done.items()}

    def once(make: Callable[[], Scheduler]) -> Callable[[], dict]:
        def go() -> dict:
            scheduler = make()
            seconds, done = run(scheduler, prompts, params)
            return {"tokens": 64 * b, "seconds": seconds, "tok_s": 64 * b / seconds, "proposed": scheduler.stats.proposed_tokens,
                    "accepted": scheduler.stats.accepted_tokens,
                    "differ": sum(done[r].token_ids != truth[r] for r in prompts)}
        return go

    def oracle() -> Scheduler:
        scheduler = scheduler_for(spec_model, SpeculativeConfig("ngram", k), max_batch=b)
        Oracle(scheduler, truth, alpha)
        return scheduler

    return {f"b={b} none": once(lambda: scheduler_for(model, max_batch=b)),
            f"b={b} ngram k={k} (repeats)": once(lambda: scheduler_for(spec_model, SpeculativeConfig("ngram", k), max_batch=b)),
            f"b={b} oracle a={alpha:g} k={k}": once(oracle)}


def print_batches(precision: str, results: dict[str, dict], batches: list[int]) -> None:
    print(f"\n### Throughput by batch size, {precision}: generated tokens/s (median), ratio to none, proposed tokens")
    names = sorted({n.split(" ", 1)[1] for n in results}, key=lambda n: (n != "none", n))
    print("| b | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 1))
    for b in batches:
        base = results[f"b={b} none"]["tok_s"]
        cells = []
        for n in names:
            r = results[f"b={b} {n}"]
            cells.append(f"{r['tok_s']:.1f}" + ("" if n == "none" else f" ({r['tok_s'] / base:.2f}×, {r['proposed']:.0f} proposed)"))
        print(f"| {b} | " + " | ".join(cells) + " |")


# -- plots and main --------------------------------------------------------------------------------------------


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precisions = list(report["precisions"])
    parts = [part for part in ("steps", "loop") if any(part in data for data in report["precisions"].values())]
    fig, axes = plt.subplots(len(parts), len(precisions), figsize=(6 * len(precisions), 4.5 * len(parts)), squeeze=False)
    for col, precision in enumerate(precisions):
        data = report["precisions"][precision]
        if "steps" in data:
            ax = axes[parts.index("steps")][col]
            costs = {tuple(map(int, key.split(","))): v for key, v in data["steps"]["ms"].items()}
            for b in sorted({b for b, _ in costs}):
                ks = sorted(k for bb, k in costs if bb == b)
                ax.plot([b * (k + 1) for k in ks], [costs[(b, k)] for k in ks], marker="o", label=f"batch {b}")
            point = data["steps"]["knee"]["knee_tokens"]
            ax.axvline(point, color="grey", linestyle="--", label=f"knee {point:.0f} tokens")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens in the step (b × (k + 1))")
            ax.set_ylabel("step time, ms")
            ax.set_title(f"{report['shape']} {precision}: a step verifying k tokens per row")
            ax.legend(fontsize=8)
        if "loop" in data:
            ax = axes[parts.index("loop")][col]
            loop = data["loop"]
            base = loop["none"]["tok_s"]
            for k in report["sweep_k"]:
                alphas = report["alphas"]
                ax.plot(alphas, [loop[f"oracle a={a:g} k={k}"]["tok_s"] / base for a in alphas], marker="o", label=f"oracle k={k} (simulated)")
            for name, r in loop.items():
                if name.startswith("ctranslate2"):
                    ax.axhline(r["tok_s"] / base, color="black", linestyle=":", label=name)
                if name.startswith("replay"):
                    own = next(x["tok_s"] for n, x in loop.items() if n.startswith("none, replayed"))
                    rate = r["accepted"] / r["proposed"]  # as run: below the recorded one where tokens differ (int8)
                    ax.scatter([rate], [r["tok_s"] / own], marker="*", s=160, color="red", zorder=5,
                               label="the trained model's n-gram runs replayed (simulated)")
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xlabel("acceptance per proposed token")
            ax.set_ylabel("tokens/s ÷ ours without speculation")
            ax.set_title(f"{report['shape']} {precision}, batch 1 greedy: the whole loop")
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="steps,loop,batch")
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,2,4,8,16", help="steps: batch sizes")
    parser.add_argument("--ks", default="0,1,2,3,4,5,6,7,8", help="steps: proposals per row (0: a plain step)")
    parser.add_argument("--steps", type=int, default=5, help="steps: steps timed per (b, k) and round")
    parser.add_argument("--new-tokens", type=int, default=128, help="loop: tokens generated")
    parser.add_argument("--k", type=int, default=4, help="loop, batch: proposals per step")
    parser.add_argument("--sweep-k", default="2,4,8", help="loop: k of the oracle sweep")
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,0.9,1", help="loop: oracle acceptances")
    parser.add_argument("--traces", type=Path, default=ROOT / "bench" / "out" / "speculate" / "traces.json",
                        help="loop: the trained model's n-gram traces to replay (from bench/speculate_trained.py)")
    parser.add_argument("--replays", type=int, default=4, help="loop: recorded completions replayed")
    parser.add_argument("--peers", default="ctranslate2,transformers")
    parser.add_argument("--batch-sizes", default="1,4,8,16,32", help="batch: batch sizes")
    parser.add_argument("--batch-alpha", type=float, default=None,
                        help="batch: the oracle's acceptance (default: the replayed trace's, else 0.5)")
    parser.add_argument("--shape", default="350M", choices=["350M", "small"], help="random-weight model shape "
                        "(small: 4x256, for a quick check of the script)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "speculate-350M.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "speculate_350M.png")
    args = parser.parse_args()
    parts = args.parts.split(",")
    args.sweep_k = [int(k) for k in args.sweep_k.split(",")]
    args.alphas = [float(a) for a in args.alphas.split(",")]
    torch.set_num_threads(args.threads)
    from editor_replay import checkpoint

    args.checkpoint, args.small = checkpoint(args.workdir, args.shape), checkpoint(args.workdir, "small")
    traces = load_traces(args.traces) if "loop" in parts or "batch" in parts else None
    print(f"cpu: {cpu_summary()}; torch {torch.__version__}, {args.threads} threads; load average {load_average()}")
    if traces is None and "loop" in parts:
        print(f"(no traces in {args.traces}: run bench/speculate_trained.py first to replay the trained model's acceptance)")
    report = {"shape": args.shape, "cpu": cpu_summary(), "threads": args.threads, "load_start": load_average(), "sweep_k": args.sweep_k,
              "alphas": args.alphas, "precisions": {}}
    for precision in args.precisions.split(","):
        model = load(args.checkpoint, precision)
        spec_model = load(args.checkpoint, precision, several_rows=True) if precision == "fp32" else model
        data = report["precisions"][precision] = {}
        if "steps" in parts:
            ks = [int(k) for k in args.ks.split(",")]
            costs = step_costs(spec_model, [int(b) for b in args.batches.split(",")], ks, args.rounds, args.steps)
            data["steps"] = {"ms": {f"{b},{k}": t * 1e3 for (b, k), t in costs.items()},
                             "knee": print_steps(precision, costs, ks)}
        if "loop" in parts:
            small = load(args.small, precision)
            variants, info = loop_variants(model, spec_model, small, precision, args, traces)
            data["loop"] = summarize(measure_variants(variants, args.rounds, f"batch-1 loop {precision}"))
            data["loop_info"] = info
            print_loop(precision, data["loop"], info)
            del small, variants
            gc.collect()
        if "batch" in parts:
            alpha = args.batch_alpha if args.batch_alpha is not None else (acceptance(traces[1]) if traces else 0.5)
            sizes = [int(b) for b in args.batch_sizes.split(",")]
            variants = {}
            for b in sizes:
                variants.update(batch_variants(model, spec_model, b, args.k, alpha))
            data["batch"] = summarize(measure_variants(variants, args.rounds, f"batches {precision}"))
            print_batches(precision, data["batch"], sizes)
        del model, spec_model
        gc.collect()
    report["load_end"], report["peak_rss_gb"] = load_average(), peak_rss_gb()
    print(f"\nload average at end: {report['load_end']}; peak RSS {report['peak_rss_gb']:.2f} GB")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.plot and any("steps" in d or "loop" in d for d in report["precisions"].values()):
        plot(report, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
