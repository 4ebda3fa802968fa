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


def transformers_references(bpe_folder: str) -> dict:
    import transformers

    refs = {}
    for name in ("CodeGenTokenizer", "CodeGenTokenizerFast"):
        cls = getattr(transformers, name)
        if any(type(r) is cls for r in refs.values()):
            continue  # transformers 5: both names are one class
        tok = cls.from_pretrained(bpe_folder)
        tok.add_tokens(WHITESPACE_TOKENS)
        assert len(tok) == 50295, len(tok)
        refs[f"transformers {transformers.__version__} {name}"] = tok
    return refs


def worker(args: argparse.Namespace) -> None:
    """Runs under another interpreter (transformers 4): time its tokenizers, print JSON."""
    corpus = json.loads(Path(args.corpus).read_text())
    refs = transformers_references(args.bpe_folder)
    notes = check(refs, corpus["texts"], corpus["ids"])
    result = measure(refs, corpus["texts"], corpus["ids"], args.repeats)
    print(json.dumps({"times": result, "notes": notes, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=4.0, help="corpus size in MB of source text")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; medians are reported")
    parser.add_argument("--transformers4-python", help="interpreter with transformers 4.x, for its slow tokenizer")
    parser.add_argument("--transformers4-repeats", type=int, default=3, help="rounds for the transformers 4 worker")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--bpe-folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from rich.progress import Progress

    from codegen_lm import CodeGenTokenizerFast
    from codegen_lm.tokenizer import DATA

    texts = load_corpus(args.mb)
    size_mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"CPU: {cpu_description()}")
    print(f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', '(unset: Rust uses all cores)')}")
    print(f"corpus: {len(texts)} stdlib .py files, {size_mb:.2f} MB; {args.repeats} rounds, medians")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("vocab.json", "merges.txt"):  # the same files for every tokenizer
            shutil.copy(DATA / name, Path(tmp) / name)
        tokenizers = {"codegen_lm CodeGenTokenizerFast": CodeGenTokenizerFast(Path(tmp) / "vocab.json", Path(tmp) / "merges.txt")}
        tokenizers.update(transformers_references(tmp))
        ids = tokenizers["codegen_lm CodeGenTokenizerFast"](texts)["input_ids"]
        notes = check(tokenizers, texts, ids)
        with Progress() as progress:
            bar = progress.add_task("timing", total=args.repeats)
            results = measure(tokenizers, texts, ids, args.repeats, lambda: progress.advance(bar))
        peak = {"this process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if args.transformers4_python:
            corpus = Path(tmp) / "corpus.json"
            corpus.write_text(json.dumps({"texts": texts, "ids": ids}))
            print(f"timing transformers 4 under {args.transformers4_python} ...", flush=True)
            run = subprocess.run(
                [args.transformers4_python, __file__, "--worker", "--corpus", str(corpus), "--bpe-folder", tmp,
                 "--repeats", str(args.transformers4_repeats)],
                capture_output=True, text=True,
            )
            if run.returncode != 0:
                sys.exit(f"the transformers 4 worker failed:\n{run.stderr[-3000:]}")
            t4 = json.loads(run.stdout.strip().splitlines()[-1])
            peak["transformers 4 worker"] = t4["peak_rss_mb"]
            results.update(t4["times"])
            notes += t4["notes"]

    ours = results["codegen_lm CodeGenTokenizerFast"]
    width = max(map(len, results))
    print(f"\n{'MB/s':<{width}}  " + "  ".join(f"{t:>16}" for t in TASKS))
    for name, secs in results.items():
        print(f"{name:<{width}}  " + "  ".join(f"{size_mb / secs[t]:>16.2f}" for t in TASKS))
    print(f"\n{'ours / theirs (speed)':<{width}}  " + "  ".join(f"{t:>16}" for t in TASKS))
    for name, secs in results.items():
        if secs is not ours:
            print(f"{name:<{width}}  " + "  ".join(f"{secs[t] / ours[t]:>15.2f}x" for t in TASKS))
    print("\npeak RSS: " + ", ".join(f"{k} {v:.0f} MB" for k, v in peak.items()))
    for note in notes or ["all tokenizers give the same ids, and decode reproduces the source exactly"]:
        print(f"check: {note}")


if __name__ == "__main__":
    sys.exit(main())
