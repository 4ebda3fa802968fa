"""Generation engine benchmark: ours against transformers and CTranslate2, side by side in one run.

    python bench/engine.py                       # 350M shape, random weights, 2 threads, 3 rounds
    python bench/engine.py --rounds 5 --precisions fp32,int8
    python bench/engine.py --device cuda --precisions bf16 --size 2B --compile   # GPU: ours vs transformers
    python bench/engine.py --precisions int8 --systems ours,ours@fbgemm,ours@onednn,ctranslate2   # forced kernels

For each precision, every system runs in its own subprocess (so peak RSS is per system), one subprocess per
system and round; the rounds interleave the systems so that load from other processes on a shared machine
falls on all of them alike. Each figure is the median over rounds. Scenarios (random prompt ids, EOS ignored
so every run generates the same number of tokens; times are end to end, prefill included; n8 is timed after an
untimed n=8 request of 8 tokens: CTranslate2's first n=8 request in a process ran at 24 tok/s and later ones at
46-53, which until the eleventh session counted as ours leading it 2-3x):

  decode   batch 1, 64-token prompt, --new-tokens greedy tokens: generated tokens / s
  context  batch 1 after a 1536-token prompt (an editor's file), --new-tokens greedy tokens: tokens / s of the
           decoding alone (the time of 1 + N new tokens less that of 1), where attention reads a long cache
  n8       8 samples of one 256-token prompt (T 0.8, top-p 0.95): generated tokens / s of all samples
           (ours: one shared prefill; CTranslate2: num_hypotheses=8; transformers: num_return_sequences=8)
  prefill  8 different 256-token prompts, one new token each: seconds
  ttft     one 256-token prompt: seconds to the first token
  rss      the subprocess's peak resident memory (model load included; on a GPU its peak allocated device
           memory): GB, after the batch-1 decode scenario (rss_decode) and after all of them

On a GPU (--device cuda, precisions bf16/fp16) the peers are ours and transformers, the shape is --size, and the
table ends with each system's batch-1 decode bandwidth: matmul weight bytes × tokens/s, against a device copy
measured in the same process. --compile runs our decode step as CUDA graphs (compiled before timing).

The checkpoint (random weights, official layout) and its CTranslate2 conversions (made with CTranslate2's own
TransformersConverter) are cached in --workdir. Our int8 kernels are chosen (timed once per machine and cached,
``codegen_lm.kernels``) before the rounds, so no timed process pays for that; the table is preceded by the kernel
each kind of layer runs. A system ``ours@<kernel>`` is ours with that int8 kernel forced for every layer
(``CODEGEN_LM_INT8_KERNEL``), ``ours@<layout>`` with that fp32 layout (``CODEGEN_LM_FP32_LAYOUT``: blocked-1,
blocked-8, row-major, none of them padded), for A/B runs side by side; ``ours@several-rows`` takes the fp32 plans
made for steps of several rows, as an evaluation loads them (``load_model(..., several_rows=True)``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from machine import cpu_summary

SYSTEMS = {  # (system, precision) pairs that exist; transformers has no int8/int4 CPU path of its own
    "fp32": ["ours", "transformers", "ctranslate2"],
    "int8": ["ours", "ctranslate2"],
    "int4": ["ours"],
    "bf16": ["ours", "transformers"],  # GPU (--device cuda)
    "fp16": ["ours", "transformers"],
}
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SCENARIOS = ("decode", "context", "n8", "prefill", "ttft")
SEVERAL_ROWS = "several-rows"  # ours@several-rows: the fp32 plans for steps of several rows


def prompts(vocab: int = 50000) -> dict[str, list]:
    import random

    rng = random.Random(0)
    return {
        "decode": [rng.randrange(vocab) for _ in range(64)],
        "long": [rng.randrange(vocab) for _ in range(256)],
        "batch": [[rng.randrange(vocab) for _ in range(256)] for _ in range(8)],
        "context": [rng.randrange(vocab) for _ in range(1536)],
    }


# --- workers: one system, one precision, one measurement of each scenario ----------------------------------


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        sys.modules["torch"].cuda.synchronize()
    return time.perf_counter() - start


def decoding(generate: Callable[[int], None], new: int) -> float:
    """Seconds that ``new`` tokens take to decode after a prompt: ``generate(n)`` makes n tokens, prefill included."""
    return timed(lambda: generate(new + 1)) - timed(lambda: generate(1))


def eight_rows_warm(generate: Callable[[int], None], new: int) -> float:
    """Seconds of ``generate(new)`` (n=8), after an untimed ``generate(8)``: a first n=8 request in a process pays for
    setting up eight rows (CTranslate2's ran at 24 tok/s, later ones at 46-53), which is not what a server sees."""
    generate(8)
    return timed(lambda: generate(new))


def load_ours(args: argparse.Namespace):
    import codegen_lm  # noqa: F401  first, as the CLI does: it asks torch for 2 MB pages before torch allocates anything
    import torch

    from codegen_lm.checkpoint import load_model
    from codegen_lm.quantize import kernel_choices

    torch.set_num_threads(args.threads)
    # What Generator.from_pretrained does (the checkpoint has no tokenizer files).
    quantize = args.precision if args.precision in ("int8", "int4") else None
    dtype = TORCH_DTYPES.get(args.precision, "float32")
    model = load_model(args.checkpoint, quantize=quantize, inference=True, dtype=dtype, device=args.device,
                       several_rows=args.system.partition("@")[2] == SEVERAL_ROWS)
    print("KERNELS " + json.dumps(kernel_choices(model)), flush=True)
    return model


def run_ours(args: argparse.Namespace, p: dict) -> dict[str, Callable[[], float]]:
    from codegen_lm.engine import Generator, SamplingParams

    # No prefix cache: the rounds repeat their prompts, and the peers keep nothing between requests.
    generator = Generator(load_ours(args), None, max_batch=8, compile=args.compile, prefix_cache_mb=0)
    new = args.new_tokens

    def complete(batch, **params):
        results = generator.complete(batch, SamplingParams(ignore_eos=True, **params))
        assert all(len(c.token_ids) == params["max_new_tokens"] for r in results for c in r)

    def warmed(measure: Callable[[], float]) -> Callable[[], float]:
        """Compiling happens at the first steps of each shape: with --compile, a scenario runs once untimed just
        before it is timed (so the batch-1 peak memory is not that of a warm-up with 8 rows)."""
        def run() -> float:
            if args.compile:
                measure()
            return measure()
        return run

    complete([p["decode"]], max_new_tokens=8)  # warm-up
    return {
        "decode": warmed(lambda: new / timed(lambda: complete([p["decode"]], max_new_tokens=new))),
        "context": warmed(lambda: new / decoding(lambda n: complete([p["context"]], max_new_tokens=n), new)),
        "n8": warmed(lambda: 8 * new / eight_rows_warm(lambda n: complete([p["long"]], max_new_tokens=n, n=8,
                                                                           temperature=0.8, top_p=0.95, seed=1), new)),
        "prefill": lambda: timed(lambda: complete(p["batch"], max_new_tokens=1)),
        "ttft": lambda: timed(lambda: complete([p["long"]], max_new_tokens=1)),
    }


def run_transformers(args: argparse.Namespace, p: dict) -> dict[str, Callable[[], float]]:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    model = transformers.CodeGenForCausalLM.from_pretrained(args.checkpoint, dtype=getattr(torch, TORCH_DTYPES[args.precision]))
    model = model.to(args.device).eval()
    new = args.new_tokens

    def generate(batch, **kwargs):
        with torch.inference_mode():
            ids = torch.tensor(batch, device=args.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=50256, min_new_tokens=kwargs["max_new_tokens"], **kwargs)
        assert out.shape[1] == ids.shape[1] + kwargs["max_new_tokens"]

    generate([p["decode"]], max_new_tokens=8, do_sample=False)
    return {
        "decode": lambda: new / timed(lambda: generate([p["decode"]], max_new_tokens=new, do_sample=False)),
        "context": lambda: new / decoding(lambda n: generate([p["context"]], max_new_tokens=n, do_sample=False), new),
        "n8": lambda: 8 * new / eight_rows_warm(lambda n: generate([p["long"]], max_new_tokens=n, do_sample=True,
                                                                    temperature=0.8, top_p=0.95, top_k=0,
                                                                    num_return_sequences=8), new),
        "prefill": lambda: timed(lambda: generate(p["batch"], max_new_tokens=1, do_sample=False)),
        "ttft": lambda: timed(lambda: generate([p["long"]], max_new_tokens=1, do_sample=False)),
    }


def run_ctranslate2(args: argparse.Namespace, p: dict) -> dict[str, Callable[[], float]]:
    import ctranslate2

    folder = Path(args.workdir) / f"ct2-{args.precision}"
    generator = ctranslate2.Generator(str(folder), device="cpu", compute_type=args.precision.replace("fp32", "float32"),
                                      intra_threads=args.threads, inter_threads=1)
    vocab = json.loads((folder / "vocabulary.json").read_text())
    new = args.new_tokens

    def generate(batch, **kwargs):
        tokens = [[vocab[i] for i in row] for row in batch]
        results = generator.generate_batch(tokens, max_length=kwargs.pop("max_length"), include_prompt_in_result=False, **kwargs)
        assert all(len(seq) == kwargs["min_length"] for r in results for seq in r.sequences_ids)

    generate([p["decode"]], max_length=8, min_length=8)
    return {
        "decode": lambda: new / timed(lambda: generate([p["decode"]], max_length=new, min_length=new)),
        "context": lambda: new / decoding(lambda n: generate([p["context"]], max_length=n, min_length=n), new),
        "n8": lambda: 8 * new / eight_rows_warm(lambda n: generate([p["long"]], max_length=n, min_length=n,
                                                                    num_hypotheses=8, sampling_topk=0, sampling_topp=0.95,
                                                                    sampling_temperature=0.8), new),
        "prefill": lambda: timed(lambda: generate(p["batch"], max_length=1, min_length=1)),
        "ttft": lambda: timed(lambda: generate([p["long"]], max_length=1, min_length=1)),
    }


def peak_rss() -> float:
    """This process's peak resident memory in GB (VmHWM: unlike ru_maxrss it does not include what the parent
    process held when it forked us)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def peak_gpu_memory() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 1e9


def copy_bandwidth() -> float:
    """GB/s of a 4 GB device-to-device copy (bytes read + written), median of 10: the HBM ceiling measured here."""
    import torch

    a = torch.empty(1 << 30, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 4 * (1 << 30) / statistics.median(times[2:]) / 1e9


def worker(args: argparse.Namespace) -> None:
    from codegen_lm.kernels import FP32_LAYOUTS

    system, _, kernel = args.system.partition("@")
    if kernel and kernel != SEVERAL_ROWS:
        os.environ["CODEGEN_LM_FP32_LAYOUT" if kernel in FP32_LAYOUTS else "CODEGEN_LM_INT8_KERNEL"] = kernel
    if not args.scenarios:  # only load: chooses (and caches) our kernels
        load_ours(args)
        return
    runner = {"ours": run_ours, "transformers": run_transformers, "ctranslate2": run_ctranslate2}[system]
    scenarios = runner(args, prompts())
    peak = peak_gpu_memory if args.device.startswith("cuda") else peak_rss
    result = {}
    for name in args.scenarios.split(","):
        result[name] = scenarios[name]()
        if name == "decode":  # before the batched scenarios grow the KV cache
            result["rss_decode"] = peak()
    result["rss"] = peak()
    if args.device.startswith("cuda"):
        result["copy_gbps"] = copy_bandwidth()
    print("RESULT " + json.dumps(result), flush=True)


# --- driver -------------------------------------------------------------------------------------------------


def prepare(workdir: Path, precisions: list[str], size: str = "350M", dtype: str = "fp32") -> Path:
    """The random-weight checkpoint of the ``size`` shape and its CTranslate2 conversions, made once."""
    checkpoint = workdir / (f"codegen-{size}-random" + ("" if dtype == "fp32" else f"-{dtype}"))
    if not any(checkpoint.glob("*.safetensors")):
        import torch

        from codegen_lm import CodeGenConfig, CodeGenForCausalLM

        torch.manual_seed(0)
        CodeGenForCausalLM(CodeGenConfig.preset(f"codegen-{size}-mono")).to(getattr(torch, TORCH_DTYPES[dtype])).save_pretrained(checkpoint)
    for precision in precisions:
        folder = workdir / f"ct2-{precision}"
        if precision in ("fp32", "int8") and not (folder / "model.bin").exists():
            from ctranslate2.converters import TransformersConverter

            quantization = {"fp32": "float32", "int8": "int8"}[precision]
            TransformersConverter(str(checkpoint)).convert(str(folder), quantization=quantization, force=True)
    return checkpoint


def arguments(argv: list[str] | None = None, **defaults: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/codegen-lm-bench")
    parser.add_argument("--precisions", default="fp32,int8,int4")
    parser.add_argument("--systems", default="ours,transformers,ctranslate2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for bf16/fp16 (ours vs transformers)")
    parser.add_argument("--size", default="350M", choices=["350M", "2B", "6B", "16B"], help="model shape")
    parser.add_argument("--compile", action="store_true", help="ours: compiled decode step (CUDA graphs on a GPU)")
    parser.add_argument("--json", help="also write the medians here")
    parser.add_argument("--worker", nargs=2, metavar=("SYSTEM", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def main() -> None:
    args = arguments()
    if args.worker:
        args.system, args.precision = args.worker
        worker(args)
        return

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU; run on one, or drop --device")
    from codegen_lm.kernels import FP32_LAYOUTS

    precisions = args.precisions.split(",")
    runs = [(s, p) for p in precisions for s in args.systems.split(",")  # ours@<int8 kernel>: quantized only
            if s.partition("@")[0] in SYSTEMS[p]
            and ("@" not in s or (p == "fp32") == (s.partition("@")[2] in (*FP32_LAYOUTS, SEVERAL_ROWS)))]
    samples = measure(runs, args)
    medians = summarize(samples)
    print_table(medians, precisions)
    print_ratios(medians, samples, precisions)
    if args.device.startswith("cuda"):
        print_bandwidth(medians, args.size)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{s} {p}": m for (s, p), m in medians.items()}, indent=2) + "\n")


Samples = dict[tuple[str, str], list[dict[str, float]]]


def measure(runs: list[tuple[str, str]], args: argparse.Namespace) -> Samples:
    """Run every (system, precision) once per round, each in its own subprocess: each run's figures, by round."""
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    gpu = args.device.startswith("cuda")
    checkpoint = prepare(workdir, sorted({p for s, p in runs if s == "ctranslate2"}), args.size,
                         runs[0][1] if gpu else "fp32")
    print(f"CPU: {cpu_summary()}")
    if gpu:
        import torch

        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    weights = sum(f.stat().st_size for f in Path(checkpoint).glob("*.safetensors")) / 1e9
    print(f"checkpoint {args.size} weights: {weights:.2f} GB")
    print(f"threads {args.threads}, {args.rounds} rounds, {args.new_tokens} new tokens; load average at start: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")

    def run(system: str, precision: str, scenarios: str) -> str:
        command = [sys.executable, __file__, "--worker", system, precision, "--checkpoint", str(checkpoint),
                   "--workdir", str(workdir), "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
                   "--scenarios", scenarios, "--device", args.device] + (["--compile"] if args.compile else [])
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(f"{system} {precision} failed:\n{done.stderr[-3000:]}")
        return done.stdout

    for system, precision in runs:  # our kernel choices, made (or read from the cache) before anything is timed
        if system.startswith("ours"):
            kernels = next(l for l in run(system, precision, "").splitlines() if l.startswith("KERNELS "))
            print(f"{system} {precision} kernels: {', '.join(f'{k}: {v}' for k, v in json.loads(kernels[8:]).items())}")
    samples: dict[tuple[str, str], list[dict[str, float]]] = {run: [] for run in runs}
    for round_ in range(args.rounds):
        for system, precision in runs:
            line = next((l for l in run(system, precision, args.scenarios).splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{system} {precision} gave no result")
            samples[(system, precision)].append(json.loads(line[7:]))
            print(f"round {round_ + 1} {system:12s} {precision}: {line[7:]}", flush=True)
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return samples


def summarize(samples: Samples) -> dict[tuple[str, str], dict[str, float]]:
    """Medians over rounds (peak memory: the largest)."""
    medians = {run: {k: statistics.median(s[k] for s in results) for k in results[0]} for run, results in samples.items()}
    peaks = {k for k in next(iter(samples.values()))[0] if k.startswith("rss")}
    return {run: {**m, **{k: max(s[k] for s in samples[run]) for k in peaks}} for run, m in medians.items()}


COLUMNS = {"decode": ("decode tok/s", "{:.1f}"), "context": ("decode after 1536 tok/s", "{:.1f}"),
           "n8": ("n=8 gen tok/s", "{:.1f}"), "prefill": ("prefill 8×256 s", "{:.2f}"),
           "ttft": ("TTFT 256 s", "{:.3f}"), "rss_decode": ("peak memory batch 1 GB", "{:.2f}"),
           "rss": ("peak memory all GB", "{:.2f}")}


def print_bandwidth(medians: dict[tuple[str, str], dict[str, float]], size: str) -> None:
    """Batch-1 decode reads every matmul weight once per token (DESIGN §6): weight bytes × tokens/s against the
    copy bandwidth measured in the same process."""
    from codegen_lm import CodeGenConfig

    c = CodeGenConfig.preset(f"codegen-{size}-mono")
    params = c.n_layer * (4 * c.n_embd * c.n_embd + 2 * c.n_embd * c.inner_dim) + c.vocab_size * c.n_embd
    print(f"\nBatch-1 decode bandwidth ({params / 1e9:.2f} B matmul parameters read per token):")
    for (system, precision), m in medians.items():
        gbps = params * {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int4": 0.5}[precision] * m["decode"] / 1e9
        print(f"{system} {precision}: {gbps:.0f} GB/s = {gbps / m['copy_gbps']:.0%} of the measured copy bandwidth "
              f"({m['copy_gbps']:.0f} GB/s)")


def print_table(medians: dict[tuple[str, str], dict[str, float]], precisions: list[str]) -> None:
    keys = [k for k in COLUMNS if k in next(iter(medians.values()))]
    print("\n| system | precision | " + " | ".join(COLUMNS[k][0] for k in keys) + " |\n|" + "---|" * (len(keys) + 2))
    for (system, precision), m in medians.items():
        print(f"| {system} | {precision} | " + " | ".join(COLUMNS[k][1].format(m[k]) for k in keys) + " |")


def ratio(key: str, ours: dict[str, float], theirs: dict[str, float]) -> float:
    """> 1 means ours is better: tokens/s ours / peer, times and memory peer / ours."""
    return ours[key] / theirs[key] if key in ("decode", "context", "n8") else theirs[key] / ours[key]


def print_ratios(medians: dict[tuple[str, str], dict[str, float]], samples: Samples, precisions: list[str]) -> None:
    """Each of our systems against each peer: the ratio of the medians, then the median of the per-round ratios
    (each from processes run one after the other in the same round, so less exposed to a shared machine's load)."""
    keys = [k for k in COLUMNS if k in next(iter(medians.values()))]
    print("\nRatios, ours / peer (higher is better for ours; prefill, TTFT and RSS are peer / ours); "
          "ratio of medians [median of per-round ratios]:")
    for precision in precisions:
        for system in [s for s, p in medians if p == precision and s.startswith("ours")]:
            ours = medians[system, precision]
            for peer in ("transformers", "ctranslate2"):
                for peer_precision in dict.fromkeys([precision, "fp32"]):
                    theirs = medians.get((peer, peer_precision))
                    if theirs is None:
                        continue
                    rounds = list(zip(samples[system, precision], samples[peer, peer_precision]))
                    paired = {k: statistics.median(ratio(k, a, b) for a, b in rounds) for k in keys if not k.startswith("rss")}
                    print(f"{system} {precision} vs {peer} {peer_precision}: " + ", ".join(
                        f"{k} {ratio(k, ours, theirs):.2f}×" + (f" [{paired[k]:.2f}×]" if k in paired else "") for k in keys))


if __name__ == "__main__":
    main()
