"""Chunked prefill: what a step costs when it carries a prompt chunk of C tokens beside b decoding sequences, against
a plain decode step of the same b sequences. Every decoding stream waits for the whole step, so this ratio is the
inter-token latency they see while a long prompt arrives; the engine's default ``--prefill-chunk`` on CPU is the
largest C that keeps it within 3x on the 350M shape.

    python bench/prefill_chunk.py                      # 350M shape, fp32 and int8, b = 1 and 4, 2 threads
    python bench/prefill_chunk.py --chunks 16,32,64 --rounds 5

In one process (the scheduler's own steps, timed): b sequences with 1000-token contexts decode; a 1500-token prompt
arrives and is prefilled C tokens a step; the median mixed step is compared with the median plain step around it.
Rounds interleave the chunk sizes; figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from machine import cpu_summary

ROOT = Path(__file__).resolve().parents[1]


def step_times(scheduler, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        scheduler.step()
        times.append(time.perf_counter() - start)
    return times


def measure(generator, decoding: int, chunks: list[int], rounds: int) -> dict[int, tuple[float, float]]:
    """Per chunk size: (median plain step, median mixed step) in seconds."""
    import random

    from codegen_lm.engine import SamplingParams

    rng = random.Random(0)
    scheduler = generator.scheduler()
    for _ in range(decoding):
        scheduler.add_request([rng.randrange(50000) for _ in range(1000)],
                              SamplingParams(max_new_tokens=1000, ignore_eos=True))
    while any(s.prefilling for s in scheduler.running) or scheduler.waiting:
        scheduler.step()
    results: dict[int, list[tuple[float, float]]] = {c: [] for c in chunks}
    for _ in range(rounds):
        for chunk in chunks:
            plain = statistics.median(step_times(scheduler, 4))
            scheduler.prefill_chunk = chunk
            arriving = scheduler.add_request([rng.randrange(50000) for _ in range(1500)], SamplingParams(max_new_tokens=1))
            scheduler.step()  # (admits it)
            mixed = statistics.median(step_times(scheduler, max(2, min(6, 1500 // chunk - 1))))
            scheduler.abort(arriving)
            results[chunk].append((plain, mixed))
    return {c: (statistics.median(p for p, _ in r), statistics.median(m for _, m in r)) for c, r in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--decoding", default="1,4", help="sequences decoding beside the arriving prompt")
    parser.add_argument("--chunks", default="8,16,32,64,128")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from editor_replay import checkpoint

    from codegen_lm.engine import Generator

    print(f"cpu: {cpu_summary()}; torch {torch.__version__}, {args.threads} threads; load average "
          f"{os.getloadavg()[0]:.1f}")
    chunks = [int(c) for c in args.chunks.split(",")]
    model = checkpoint(args.workdir, "350M")
    print(f"{'precision':9} {'decoding':>8} {'chunk':>6} {'plain step ms':>14} {'mixed step ms':>14} {'ratio':>6} "
          f"{'ms / prompt token':>18}")
    for precision in args.precisions.split(","):
        generator = Generator.from_pretrained(str(model), quantize=None if precision == "fp32" else precision,
                                              prefix_cache_mb=0)
        for decoding in (int(b) for b in args.decoding.split(",")):
            for chunk, (plain, mixed) in measure(generator, decoding, chunks, args.rounds).items():
                print(f"{precision:9} {decoding:8d} {chunk:6d} {plain * 1e3:14.1f} {mixed * 1e3:14.1f} "
                      f"{mixed / plain:6.2f} {(mixed - plain) / chunk * 1e3:18.2f}")


if __name__ == "__main__":
    main()
