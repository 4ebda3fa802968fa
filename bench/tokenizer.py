"""Tokenizer throughput: ours against transformers' CodeGen tokenizers, on the same corpus, in one run.

The corpus is Python standard-library source (the files the tests use). Four tasks, each timed per
tokenizer in interleaved rounds (the order rotates every round), median over rounds, reported in MB/s of
source text: encode a batch (``tok(texts)``), encode one text per call, ``batch_decode``, ``decode`` one
sequence per call. Outputs are checked to be identical before timing.

transformers 5 has one CodeGen tokenizer class under both names (its "slow" pure-Python BPE is gone). To
time the pure-Python tokenizer too, point ``--transformers4-python`` at an interpreter with transformers 4.x
installed (``python -m venv /tmp/t4 && /tmp/t4/bin/pip install "transformers<5"``): its slow and fast
tokenizers then run in a worker process on the same corpus, in the same run.

    python bench/tokenizer.py [--mb 4] [--repeats 5] [--transformers4-python /tmp/t4/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

TASKS = ("encode batch", "encode per text", "decode batch", "decode per text")
WHITESPACE_TOKENS = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]


def load_corpus(megabytes: float) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    random.Random(0).shuffle(files)
    texts, size = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        size += len(text.encode())
        if size >= megabytes * 1e6:
            break
    return texts


def cpu_description() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")
    return f"{model}; {os.cpu_count()} logical CPUs; flags: {' '.join(f for f in wanted if f in flags) or 'n/a'}"


def tasks_for(tok, texts: list[str], ids: list[list[int]]) -> dict:
    return {
        "encode batch": lambda: tok(texts)["input_ids"],
        "encode per text": lambda: [tok(t)["input_ids"] for t in texts],
        "decode batch": lambda: tok.batch_decode(ids),
        "decode per text": lambda: [tok.decode(x) for x in ids],
    }


def check(tokenizers: dict, texts: list[str], ids: list[list[int]]) -> list[str]:
    """Differences from the expected ids and from an exact decode round trip (this also warms up)."""
    notes = []
    for name, tok in tokenizers.items():
        fns = tasks_for(tok, texts, ids)
        if (got := fns["encode batch"]()) != ids:
            notes.append(f"{name}: different ids on {sum(a != b for a, b in zip(got, ids))} of {len(ids)} texts")
        if (text := fns["decode batch"]()) != texts:
            notes.append(f"{name}: decode differs from the source on {sum(a != b for a, b in zip(text, texts))} of {len(texts)} texts")
    return notes


def measure(tokenizers: dict, texts: list[str], ids: list[list[int]], repeats: int, progress=None) -> dict[str, dict[str, float]]:
    """Median seconds per (tokenizer, task), rounds interleaved so that machine noise hits all alike."""
    runs = {name: tasks_for(tok, texts, ids) for name, tok in tokenizers.items()}
    times: dict[str, dict[str, list[float]]] = {n: {t: [] for t in TASKS} for n in tokenizers}
    names = list(tokenizers)
    for r in range(repeats):
        for task in TASKS:
            for name in names[r % len(names):] + names[: r % len(names)]:
                start = time.perf_counter()
                runs[name][task]()
                times[name][task].append(time.perf_counter() - start)
        if progress is not None:
            progress()
    return {n: {t: statistics.median(v) for t, v in by_task.items()} for n, by_task in times.items()}


def contenders(bpe_folder: str) -> dict:
    """Ours and this interpreter's transformers CodeGen tokenizers, all built from the same BPE files."""
    import tokenizers
    import transformers

    from codegen_lm.tokenizer import CodeGenTokenizerFast

    folder = Path(bpe_folder)
    found = {f"codegen_lm (tokenizers {tokenizers.__version__})": CodeGenTokenizerFast(folder / "vocab.json", folder / "merges.txt")}
    for name in ("CodeGenTokenizer", "CodeGenTokenizerFast"):
        cls = getattr(transformers, name)
        if any(type(t) is cls for t in found.values()):
            continue  # transformers 5: both names are one class
        tok = cls.from_pretrained(bpe_folder)
        tok.add_tokens(WHITESPACE_TOKENS)
        assert len(tok) == 50295, len(tok)
        found[f"transformers {transformers.__version__} {name}"] = tok
    return found


def run_group(bpe_folder: str, texts: list[str], repeats: int, show_progress: bool) -> dict:
    """Check, then time, ours and the transformers tokenizers of this interpreter, interleaved."""
    toks = contenders(bpe_folder)
    ids = next(iter(toks.values()))(texts)["input_ids"]
    notes = check(toks, texts, ids)
    if show_progress:
        from rich.progress import Progress

        with Progress() as progress:
            bar = progress.add_task("timing", total=repeats)
            times = measure(toks, texts, ids, repeats, lambda: progress.advance(bar))
    else:
        times = measure(toks, texts, ids, repeats)
    return {"times": times, "notes": notes, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def print_group(title: str, group: dict, size_mb: float) -> None:
    times = group["times"]
    ours = next(iter(times.values()))
    width = max(map(len, times)) + 2
    print(f"\n{title} (peak RSS of the process {group['peak_rss_mb']:.0f} MB)")
    print(f"{'MB/s':<{width}}" + "".join(f"{t:>17}" for t in TASKS))
    for name, secs in times.items():
        print(f"{name:<{width}}" + "".join(f"{size_mb / secs[t]:>17.2f}" for t in TASKS))
    for name, secs in list(times.items())[1:]:
        print(f"{'ours vs ' + name.split(' (')[0]:<{width}}" + "".join(f"{secs[t] / ours[t]:>16.2f}x" for t in TASKS))
    for note in group["notes"] or ["same ids everywhere; every decode reproduces the source exactly"]:
        print(f"check: {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=4.0, help="corpus size in MB of source text")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; medians are reported")
    parser.add_argument("--transformers4-python", help="interpreter with transformers 4.x, for its slow tokenizer")
    parser.add_argument("--transformers4-repeats", type=int, default=3, help="rounds for the transformers 4 worker")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # corpus JSON; runs one group, prints JSON
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # codegen_lm without installing it
        job = json.loads(Path(args.worker).read_text())
        print(json.dumps(run_group(job["bpe_folder"], job["texts"], args.repeats, show_progress=False)))
        return

    from codegen_lm.tokenizer import DATA

    texts = load_corpus(args.mb)
    size_mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"CPU: {cpu_description()}")
    print(f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', '(unset: Rust uses all cores)')}")
    print(f"corpus: {len(texts)} stdlib .py files, {size_mb:.2f} MB; medians of interleaved rounds; ratios > 1: ours faster")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("vocab.json", "merges.txt"):  # the same files for every tokenizer
            shutil.copy(DATA / name, Path(tmp) / name)
        print_group(f"this interpreter, {args.repeats} rounds", run_group(tmp, texts, args.repeats, True), size_mb)
        if args.transformers4_python:
            job = Path(tmp) / "job.json"
            job.write_text(json.dumps({"bpe_folder": tmp, "texts": texts}))
            print(f"\ntiming under {args.transformers4_python} ...", flush=True)
            run = subprocess.run(
                [args.transformers4_python, __file__, "--worker", str(job), "--repeats", str(args.transformers4_repeats)],
                capture_output=True, text=True,
            )
            if run.returncode != 0:
                sys.exit(f"the transformers 4 worker failed:\n{run.stderr[-3000:]}")
            group = json.loads(run.stdout.strip().splitlines()[-1])
            print_group(f"{args.transformers4_python}, {args.transformers4_repeats} rounds", group, size_mb)


if __name__ == "__main__":
    sys.exit(main())
