"""Multi-turn synthesis with and without the prefix cache: each turn's prompt re-sends the whole history, so without
reuse every turn prefills more than the last. Time to the first token of each turn of MTPB problems with at least
5 turns, in the two front ends that run turns: a `chat` session (``Session``) and `eval mtpb` (all 5 test cases of a
problem advance together, one ``complete`` per turn). 350M shape, random weights, 2 threads.

    python bench/multi_turn.py                  # 3 problems of >= 5 turns, fp32, 3 rounds
    python bench/multi_turn.py --problems 1 --rounds 1

Rounds interleave the cache settings; figures are medians over rounds and problems.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from machine import cpu_summary

ROOT = Path(__file__).resolve().parents[1]


def timed_generator(checkpoint: Path, prefix_cache_mb: float | None, firsts: list[tuple[float, float]]):
    """A generator whose schedulers note, from their creation, the time to their first generated token and the median
    over their requests of each one's first token (eval mtpb runs a problem's test cases as one batch)."""
    from codegen_lm.engine import Generator

    class TimedGenerator(Generator):
        def scheduler(self):
            scheduler, created = super().scheduler(), time.perf_counter()
            step, seen = scheduler.step, {}

            def timed_step():
                outputs = step()
                for o in outputs:
                    if o.token_ids and o.request_id not in seen:
                        seen[o.request_id] = time.perf_counter() - created
                if seen and not scheduler.has_unfinished():
                    firsts.append((min(seen.values()), statistics.median(seen.values())))
                return outputs

            scheduler.step = timed_step
            return scheduler

    return TimedGenerator.from_pretrained(str(checkpoint), prefix_cache_mb=prefix_cache_mb)


def chat_turns(generator, problem: dict, firsts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    from codegen_lm.engine import SamplingParams
    from codegen_lm.evaluate.mtpb import fill
    from codegen_lm.session import Session

    firsts.clear()
    session = Session(generator, params=SamplingParams(max_new_tokens=problem.get("max_gen_length", 128)))
    for prompt in problem["prompts"]:
        session.say(fill(prompt, problem["inputs"][0]))
    return list(firsts)


def eval_turns(generator, problem: dict, firsts: list[tuple[float, float]], workdir: Path) -> list[tuple[float, float]]:
    from codegen_lm.evaluate import mtpb

    firsts.clear()
    path = workdir / f"mtpb-{os.getpid()}-{time.monotonic_ns()}.jsonl"
    mtpb.generate_samples(generator, [problem], mtpb.Settings(problems="", model="", temperature=0.0), path)
    path.unlink()
    return list(firsts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=3, help="MTPB problems of at least 5 turns")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens per turn (default: the problem's max_gen_length; random weights always use all)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from editor_replay import checkpoint

    from codegen_lm.evaluate import mtpb

    print(f"cpu: {cpu_summary()}; torch {torch.__version__}, {args.threads} threads; load average "
          f"{os.getloadavg()[0]:.1f}")
    problems = [p for p in mtpb.load_problems(None) if len(p["prompts"]) >= 5][: args.problems]
    if args.max_new_tokens:
        problems = [{**p, "max_gen_length": args.max_new_tokens} for p in problems]
    model = checkpoint(args.workdir, "350M")
    firsts: list[tuple[float, float]] = []
    generators = {cache: timed_generator(model, None if cache else 0, firsts) for cache in (True, False)}
    times: dict[tuple[str, bool], list[list[float]]] = {}
    for _ in range(args.rounds):
        for problem in problems:
            for cache, generator in generators.items():
                if generator.prefix_cache is not None:
                    generator.prefix_cache.clear()  # every problem starts cold: only its own turns are reused
                times.setdefault(("chat", cache), []).append(chat_turns(generator, problem, firsts))
                times.setdefault(("eval mtpb", cache), []).append(eval_turns(generator, problem, firsts, args.workdir))
    print("time to the first token of each turn: the first sequence's / the median sequence's (eval mtpb: the test "
          "cases of a problem, one batch)")
    print(f"{'front end':10} {'cache':5} " + " ".join(f"{'turn ' + str(t):>13}" for t in range(1, 6)))
    medians = {}
    for (front, cache), runs in times.items():
        medians[(front, cache)] = [(statistics.median(run[t][0] for run in runs), statistics.median(run[t][1] for run in runs))
                                   for t in range(5)]
        print(f"{front:10} {'on' if cache else 'off':5} " + " ".join(f"{a:5.2f}s/{m:5.2f}s" for a, m in medians[(front, cache)]))
    for front in ("chat", "eval mtpb"):
        on, off = medians[(front, True)][4], medians[(front, False)][4]
        print(f"{front}: the 5th turn's first token {off[0] / on[0]:.1f}x sooner with the prefix cache "
              f"({off[0]:.2f} s -> {on[0]:.2f} s); the median sequence's {off[1] / on[1]:.1f}x ({off[1]:.2f} s -> {on[1]:.2f} s)")


if __name__ == "__main__":
    main()
