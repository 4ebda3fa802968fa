"""Editor replay: people typing real Python (the standard library's own files) against `codegen-lm serve`, with the
prefix cache on and off. What an editor plugin sends: at every pause in typing, a streaming completion of the file
up to the cursor (64 tokens, stop at a blank line), dropping the previous request if it still runs.

Each simulated user picks a file and a point in it where the text before the cursor is 500-1800 tokens, then types
the characters that follow in bursts of 2-10 at 5-8 characters a second, pausing 0.4-1.2 s between bursts; 300 ms
into each pause (an editor's debounce) it sends a request. The first request (the file just opened, its whole
prompt to compute) is waited for before typing goes on, and left out of the figures: follow-ups are what the cache is
for. Two client styles:

  whole    the whole file up to the cursor, FauxPilot's route (/v1/engines/codegen/completions), as Copilot-style
           clients send it
  window   the last 40 lines before the cursor, /v1/completions, as Tabby-style clients send it (the start of the
           prompt moves as lines are added, so only a plain prefix is reused: what such clients lose)

For each shape and precision one server runs per cache setting (`codegen-lm serve` on a random-weight checkpoint,
2 threads); settings, user counts and styles are interleaved over --repeats rounds and the figures are medians.
Reported: time to first token of follow-up requests (each user's first request excluded; a request dropped before
its first token counts as its time until then, a lower bound, and the share of those is shown; a completion that
ends without text, an empty suggestion, is left out and its share shown as well), inter-token latency of all
streams, prompt tokens reused and computed (from /metrics), the server's peak RSS, and the plain decode step at the
same batch as the reference for latency: as many streams as users, each on its user's file up to the cursor (the
first round's), the median gap while all of them decode and nothing else arrives. And, on an idle server,
follow-ups at about 1500 tokens that are waited for, not dropped: without the cache their time is the whole
prompt's, not a lower bound.

    python bench/editor_replay.py                                    # small and 350M (fp32, int8), 1 and 4 users
    python bench/editor_replay.py --shapes small --repeats 1 --requests 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from machine import cpu_summary
from server_process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "codegen_lm" / "data"
SHAPES = {"small": dict(n_embd=256, n_layer=4, n_head=8, rotary_dim=16),
          "350M": dict(n_embd=1024, n_layer=20, n_head=16, rotary_dim=32)}
WINDOW_LINES = 40
MAX_TOKENS = 64


# -- what people type ------------------------------------------------------------------------------------------


@dataclass
class Typist:
    """One user's file, cursor and typing: bursts of characters and the pauses after them."""

    path: Path
    text: str
    cursor: int
    bursts: list[tuple[int, float, float]] = field(default_factory=list)  # (characters, seconds typing, pause)


def pick_typists(count: int, requests: int, seed: int, tokens: tuple[int, int] = (500, 1800)) -> list[Typist]:
    """``count`` users, each at a point of a standard-library file with ``tokens`` (by default 500-1800) before it."""
    from codegen_lm.tokenizer import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DATA)
    rng = random.Random(seed)
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size > 20_000)
    typists: list[Typist] = []
    while len(typists) < count:
        path = rng.choice(files)
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines(keepends=True)
        line = rng.randrange(len(lines) // 4, len(lines) - 60)
        cursor = sum(map(len, lines[:line])) + len(lines[line]) - len(lines[line].lstrip())  # at an indented line's start
        if not tokens[0] <= len(tokenizer.encode(text[:cursor])) <= tokens[1]:
            continue
        typist = Typist(path, text, cursor)
        for _ in range(requests):
            chars = rng.randint(2, 10)
            typist.bursts.append((chars, chars / rng.uniform(5, 8), rng.uniform(0.4, 1.2)))
        typists.append(typist)
    return typists


def prompt_at(typist: Typist, cursor: int, style: str) -> str:
    text = typist.text[:cursor]
    if style == "window":
        start = len(text)
        for _ in range(WINDOW_LINES + 1):  # the current (partial) line and the 40 before it
            start = text.rfind("\n", 0, start - 1) + 1 if start > 0 else 0
            if start == 0:
                break
        text = text[start:]
    return text


# -- the client ---------------------------------------------------------------------------------------------------


@dataclass
class Request:
    user: int
    index: int
    sent: float
    first: float | None = None  # seconds to the first token
    dropped: float | None = None  # seconds until the client dropped it
    gaps: list[float] = field(default_factory=list)  # between streamed chunks
    done: bool = False


async def complete(client, url: str, style: str, prompt: str, record: Request, stop: bool = True) -> None:
    path = "/v1/engines/codegen/completions" if style == "whole" else "/v1/completions"
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True} | ({"stop": ["\n\n"]} if stop else {})
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url + path, json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: {") or '"choices":[]' in line:
                    continue
                now = time.perf_counter()
                if record.first is None:
                    record.first = now - start
                elif last is not None:
                    record.gaps.append(now - last)
                last = now
        record.done = True
    except asyncio.CancelledError:
        record.dropped = time.perf_counter() - start
        raise


async def type_along(url: str, typist: Typist, user: int, style: str, records: list[Request]) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        cursor, previous = typist.cursor, None
        for index, (chars, typing, pause) in enumerate(typist.bursts):
            await asyncio.sleep(typing)
            cursor += chars
            await asyncio.sleep(0.3)  # the editor's debounce
            if previous is not None and not previous.done():
                previous.cancel()  # the person typed on: the plugin drops the request it no longer needs
            record = Request(user, index, time.perf_counter())
            records.append(record)
            previous = asyncio.ensure_future(complete(client, url, style, prompt_at(typist, cursor, style), record))
            if index == 0:  # the file was just opened: the person reads its suggestion before typing on
                await previous
            await asyncio.sleep(max(pause - 0.3, 0))
        try:
            await previous  # the last request is waited for
        except asyncio.CancelledError:
            pass


async def follow_ups_alone(url: str, typist: Typist, count: int = 3) -> list[float]:
    """Time to first token of ``count`` follow-ups on an otherwise idle server, each waited for to the end: the file up
    to the cursor (about 1500 tokens), then each time a burst of characters more, through FauxPilot's route. No
    request is dropped, so the figure without the cache is the whole prompt's prefill, not a lower bound."""
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        cursor, times = typist.cursor, []
        for index in range(count + 1):
            record = Request(0, index, time.perf_counter())
            await complete(client, url, "whole", prompt_at(typist, cursor, "whole"), record, stop=False)
            if index:
                times.append(record.first)
            cursor += typist.bursts[index][0]
    return times


PLAIN_TOKENS = 200  # long enough that every stream still decodes once the last has its prompt computed


async def plain_decode(url: str, typists: list[Typist]) -> list[float]:
    """Inter-token gaps of the same batch decoding with nothing arriving: one stream per user, its prompt the file up
    to the user's cursor; only the gaps while every stream decodes (after the last one's prompt is computed, before
    the first one ends)."""
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        arrivals: list[list[float]] = [[] for _ in typists]

        async def one(typist: Typist, times: list[float]) -> None:
            body = {"prompt": prompt_at(typist, typist.cursor, "whole"), "max_tokens": PLAIN_TOKENS, "temperature": 0,
                    "stream": True}
            async with client.stream("POST", url + "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"choices":[]' not in line:
                        times.append(time.perf_counter())

        await asyncio.gather(*(one(t, times) for t, times in zip(typists, arrivals)))
    all_decoding, first_done = max(times[0] for times in arrivals), min(times[-1] for times in arrivals)
    gaps = [b - a for times in arrivals for a, b in zip(times, times[1:]) if all_decoding <= a and b <= first_done]
    if not gaps:
        raise RuntimeError(f"the {len(typists)} plain streams never decoded together; raise PLAIN_TOKENS")
    return gaps


# -- the server -----------------------------------------------------------------------------------------------


def checkpoint(workdir: Path, shape: str) -> Path:
    folder = workdir / f"random-{shape}"
    if not any(folder.glob("*.safetensors")):
        import torch

        from codegen_lm import CodeGenConfig, CodeGenForCausalLM

        torch.manual_seed(0)
        CodeGenForCausalLM(CodeGenConfig(vocab_size=51200, n_positions=2048, **SHAPES[shape])).save_pretrained(folder)
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(DATA / name, folder / name)
    return folder


def start_server(model: Path, precision: str, cache: bool) -> ServerProcess:
    """`codegen-lm serve` on the random checkpoint, 2 threads, the prefix cache on or off."""
    port = free_port()
    args = [sys.executable, "-m", "codegen_lm.cli", "serve", "--model", str(model), "--port", str(port),
            "--max-batch", "16", "--log-level", "warning"] + (["--quantize", precision] if precision != "fp32" else [])
    return ServerProcess(args + ([] if cache else ["--no-prefix-cache"]), port,
                         env={**os.environ, "OMP_NUM_THREADS": "2", "CODEGEN_LM_API_KEYS": ""})


# -- one run and the summary ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


COUNTERS = ("codegen_prompt_tokens_cached_total", "codegen_prompt_tokens_computed_total")


def replay(server: ServerProcess, typists: list[Typist], style: str) -> dict:
    before = {name: server.metric(name) for name in COUNTERS}
    records: list[Request] = []

    async def everyone() -> None:
        await asyncio.gather(*(type_along(server.url, t, u, style, records) for u, t in enumerate(typists)))

    asyncio.run(everyone())
    after = {name: server.metric(name) for name in COUNTERS}
    follow_ups = [r for r in records if r.index > 0]
    ttfts = [r.first if r.first is not None else r.dropped for r in follow_ups if r.first is not None or r.dropped]
    return {"ttft_p50": percentile(ttfts, 50), "ttft_p95": percentile(ttfts, 95),
            "dropped_first": sum(r.first is None and r.dropped is not None for r in follow_ups) / max(len(follow_ups), 1),
            "empty": sum(r.first is None and r.done for r in follow_ups) / max(len(follow_ups), 1),
            "itl_p50": percentile([g for r in records for g in r.gaps], 50),
            "itl_p95": percentile([g for r in records for g in r.gaps], 95),
            "reused": after["codegen_prompt_tokens_cached_total"] - before["codegen_prompt_tokens_cached_total"],
            "computed": after["codegen_prompt_tokens_computed_total"] - before["codegen_prompt_tokens_computed_total"],
            "ttfts": ttfts, "gaps": [g for r in records for g in r.gaps]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="small,350M")
    parser.add_argument("--precisions", default="fp32,int8", help="for the 350M shape (small runs fp32 only)")
    parser.add_argument("--users", default="1,4")
    parser.add_argument("--styles", default="whole,window")
    parser.add_argument("--requests", type=int, default=10, help="requests per user (bursts of typing)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "editor_replay.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "editor_replay.png")
    args = parser.parse_args()
    from rich.progress import Progress

    print(f"cpu: {cpu_summary()}; load average {os.getloadavg()[0]:.1f}")
    users = [int(u) for u in args.users.split(",")]
    styles = args.styles.split(",")
    results: list[dict] = []
    alone: list[dict] = []  # follow-ups at about 1500 tokens on an idle server
    (probe,) = pick_typists(1, 4, seed=7, tokens=(1400, 1600))
    configs = [(shape, precision) for shape in args.shapes.split(",")
               for precision in (args.precisions.split(",") if shape == "350M" else ["fp32"])]
    with Progress() as progress:
        task = progress.add_task("editor replay", total=len(configs) * 2 * args.repeats * len(users) * len(styles))
        for shape, precision in configs:
            model = checkpoint(args.workdir, shape)
            runs: dict[tuple, list[dict]] = {}
            for cache in (True, False):
                with start_server(model, precision, cache) as server:
                    plain = {}  # the first round's users, decoding alone
                    for k in users:
                        gaps = asyncio.run(plain_decode(server.url, pick_typists(k, args.requests, seed=10 * k)))
                        plain[k] = statistics.median(gaps)
                    times = asyncio.run(follow_ups_alone(server.url, probe))
                    alone.append(dict(shape=shape, precision=precision, cache=cache, ttfts=times))
                    for repeat in range(args.repeats):  # rounds interleave user counts and styles
                        for k in users:
                            for style in styles:
                                typists = pick_typists(k, args.requests, seed=1000 * repeat + 10 * k)
                                run = replay(server, typists, style)
                                run.update(peak_rss_mb=server.peak_rss / 2**20, plain_step=plain[k])
                                runs.setdefault((k, style, cache), []).append(run)
                                progress.advance(task)
            for (k, style, cache), rs in runs.items():
                row = {key: statistics.median(run[key] for run in rs) for key in rs[0] if key not in ("ttfts", "gaps")}
                row.update(shape=shape, precision=precision, users=k, style=style, cache=cache,
                           ttfts=[t for r in rs for t in r["ttfts"]], gaps=[g for r in rs for g in r["gaps"]])
                results.append(row)
    print(f"\n{'shape':6} {'prec':5} {'users':>5} {'style':6} {'cache':5} {'ttft p50':>9} {'ttft p95':>9} {'dropped':>8} {'empty':>6} "
          f"{'itl p50':>8} {'itl p95':>8} {'/plain':>7} {'reused':>8} {'computed':>9} {'peak RSS':>9}")
    for r in results:
        print(f"{r['shape']:6} {r['precision']:5} {r['users']:5d} {r['style']:6} {'on' if r['cache'] else 'off':5} "
              f"{r['ttft_p50']:9.3f} {r['ttft_p95']:9.3f} {r['dropped_first']:8.0%} {r['empty']:6.0%} {r['itl_p50']:8.3f} "
              f"{r['itl_p95']:8.3f} {r['itl_p95'] / r['plain_step']:7.1f} {r['reused']:8.0f} {r['computed']:9.0f} "
              f"{r['peak_rss_mb']:7.0f}MB")
    for r in results:
        if r["cache"]:
            off = next(o for o in results if not o["cache"] and all(o[k] == r[k] for k in ("shape", "precision", "users", "style")))
            print(f"{r['shape']} {r['precision']} {r['users']} user(s), {r['style']}: time to first token p50 "
                  f"{off['ttft_p50'] / r['ttft_p50']:.1f}x sooner with the prefix cache (p95 {off['ttft_p95'] / r['ttft_p95']:.1f}x)")
    for on in (a for a in alone if a["cache"]):
        off = next(a for a in alone if not a["cache"] and a["shape"] == on["shape"] and a["precision"] == on["precision"])
        on_p50, off_p50 = statistics.median(on["ttfts"]), statistics.median(off["ttfts"])
        print(f"{on['shape']} {on['precision']}: a follow-up at ~1500 tokens on an idle server, not dropped: time to first "
              f"token p50 {on_p50:.3f} s with the prefix cache, {off_p50:.3f} s without ({off_p50 / on_p50:.1f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"replay": results, "alone": alone}, indent=1))
    plot(results, args.plot)
    print(f"wrote {args.out} and {args.plot}")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    groups = sorted({(r["shape"], r["precision"], r["style"]) for r in results})
    fig, axes = plt.subplots(2, len(groups), figsize=(4.5 * len(groups), 7.5), squeeze=False)
    for column, (shape, precision, style) in enumerate(groups):
        for r in (r for r in results if (r["shape"], r["precision"], r["style"]) == (shape, precision, style)):
            label = f"{r['users']} user{'s' * (r['users'] > 1)}, cache {'on' if r['cache'] else 'off'}"
            line = "-" if r["cache"] else ":"
            for row, key in ((0, "ttfts"), (1, "gaps")):
                values = sorted(r[key])
                if values:
                    axes[row][column].plot(values, [i / len(values) for i in range(1, len(values) + 1)], line,
                                           label=label)
        axes[0][column].set(title=f"{shape} {precision}, {style} prompt", xlabel="time to first token (s)",
                            ylabel="share of follow-up requests", xscale="log")
        axes[1][column].set(xlabel="inter-token latency (s)", ylabel="share of gaps", xscale="log")
        for row in (0, 1):
            axes[row][column].grid(True, which="both", alpha=0.3)
            axes[row][column].xaxis.set_minor_formatter(NullFormatter())
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Editor replay: people typing stdlib files (CDFs; random-weight models, 2 CPU threads)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
