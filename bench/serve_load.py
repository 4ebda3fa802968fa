"""Load test of `codegen-lm serve`: N concurrent streaming clients (1, 8, 32) for a bounded time against a
random-weight model on loopback; requests/s, tokens/s, p50/p99 latency and time to first token, errors.

Each model shape is served in its own process with continuous batching (max batch 32); the small one also
without it (max batch 1: requests served one at a time, as by a server without a batching scheduler; 32
clients, one run). Every batching level runs ``--repeats`` times, the levels interleaved; figures are
medians. Clients stop sending after ``--duration`` seconds and the level ends when their last request does.

With ``--slow-clients N`` every level also runs (interleaved) while N slow-header clients hold connections open
(each sends a request line and one header, then nothing, and reconnects once the server closes it): the server's
peak memory and latency under that attack, against the same without it.

    python bench/serve_load.py                          # small + 350M shapes, 3 repeats
    python bench/serve_load.py --models small --duration 5 --repeats 1
    python bench/serve_load.py --models small --unbatched "" --clients 8 --slow-clients 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

from machine import cpu_flags
from server_process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # random weights; vocab 51200 like the released checkpoints, the real tokenizer
    "small": dict(n_embd=256, n_layer=4, n_head=8, rotary_dim=16),
    "350M": dict(n_embd=1024, n_layer=20, n_head=16, rotary_dim=32),
}
PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import os\n\ndef list_python_files(folder):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "# Read a CSV file and print the mean of each column.\nimport csv\n\n",
    "def is_prime(n: int) -> bool:\n",
    "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n",
]


# -- the server process ------------------------------------------------------------------------------------


def serve(shape: str, port: int, max_batch: int) -> None:
    import torch

    from codegen_lm import CodeGenConfig, CodeGenForCausalLM
    from codegen_lm.engine import Generator
    from codegen_lm.serve import Limits, ServerConfig, create_app
    from codegen_lm.serve.connections import DrainingServer, http_config
    from codegen_lm.tokenizer import AutoTokenizer

    torch.manual_seed(0)
    model = CodeGenForCausalLM(CodeGenConfig(vocab_size=51200, n_positions=2048, **SHAPES[shape])).eval()
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "src" / "codegen_lm" / "data")
    config = ServerConfig(f"random-{shape}", (), max_batch, max_queue=256, limits=Limits(request_timeout=600))
    app = create_app(Generator(model, tokenizer, max_batch).scheduler(), config)
    http = http_config(app, "127.0.0.1", port, log_level="warning")  # what `codegen-lm serve` runs
    http.access_log = False
    DrainingServer(http, lambda: app.state.server.engine.drain(30)).run()


def start_server(shape: str, max_batch: int) -> ServerProcess:
    """This script's own server mode (below) in a subprocess."""
    port = free_port()
    return ServerProcess([sys.executable, __file__, "--serve", shape, "--port", str(port), "--max-batch", str(max_batch)],
                         port)


class SlowClients:
    """``count`` connections that send a request line and one header, then nothing; each is opened again once the
    server has closed it (checked every second, so the attack does not turn into a busy loop of reconnects)."""

    HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"

    def __init__(self, port: int, count: int):
        self.port, self.count, self.reopened = port, count, 0
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []

    def _open(self) -> socket.socket | None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock.sendall(self.HEAD)
            sock.setblocking(False)
            return sock
        except OSError:
            return None

    def _closed(self, sock: socket.socket) -> bool:
        try:
            return sock.recv(65536) == b"" or self._closed(sock)
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _hold(self) -> None:
        while not self._stop.is_set():
            alive = []
            for sock in self._sockets:
                if self._closed(sock):
                    sock.close()
                else:
                    alive.append(sock)
            missing = self.count - len(alive)
            self.reopened += missing
            alive += [s for s in (self._open() for _ in range(missing)) if s is not None]
            self._sockets = alive
            self._stop.wait(1.0)

    def __enter__(self) -> "SlowClients":
        self._sockets = [s for s in (self._open() for _ in range(self.count)) if s is not None]
        self._thread = threading.Thread(target=self._hold, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self._sockets:
            sock.close()


# -- the clients -------------------------------------------------------------------------------------------


async def one_request(client, url: str, body: dict) -> tuple[float, float | None, int]:
    """Stream one completion; (latency, time to first token, completion tokens). Raises on any error."""
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            # Parse only the events that matter (the client shares the CPU with the server it measures).
            if not line.startswith("data: ") or line == "data: [DONE]" or (first is not None and '"usage"' not in line
                                                                            and '"error"' not in line):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
    if not tokens:
        raise RuntimeError("no usage chunk at the end of the stream")
    return time.perf_counter() - start, first, tokens


async def run_level(url: str, clients: int, duration: float, max_tokens: int, model: str) -> dict:
    import httpx

    results: list[tuple[float, float | None, int]] = []
    errors: list[str] = []
    start = time.perf_counter()
    stop_at = start + duration

    async def client_loop(k: int) -> None:
        i = k
        async with httpx.AsyncClient(timeout=600) as client:
            while True:  # at least one request each, then until the time is up
                body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
                i += clients
                try:
                    results.append(await one_request(client, url, body))
                except Exception as e:  # counted, never fatal: the point is to see them
                    errors.append(f"{type(e).__name__}: {e}")
                if time.perf_counter() >= stop_at:
                    return

    await asyncio.gather(*(client_loop(k) for k in range(clients)))
    elapsed = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    ttfts = sorted(r[1] for r in results if r[1] is not None)
    return {
        "clients": clients, "requests": len(results), "errors": len(errors), "error_samples": errors[:3],
        "seconds": elapsed, "requests_per_s": len(results) / elapsed,
        "tokens_per_s": sum(r[2] for r in results) / elapsed,
        "latency_p50": percentile(latencies, 50), "latency_p99": percentile(latencies, 99),
        "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def median_of(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    out = dict(runs[0])
    out.update({k: statistics.median(r[k] for r in runs) for k in keys})
    out["errors"] = sum(r["errors"] for r in runs)
    out["requests"] = sum(r["requests"] for r in runs)
    out["error_samples"] = [e for r in runs for e in r["error_samples"]][:3]
    return out


def measure(shape: str, max_batch: int, levels: list[int], args: argparse.Namespace
            ) -> tuple[list[dict], int, list[dict]]:
    """Median rows per level, the server's peak RSS, and (with ``--slow-clients``) the rows measured under attack."""
    from contextlib import nullcontext

    from rich.progress import Progress

    with start_server(shape, max_batch) as server:
        model = f"random-{shape}"
        # Warm up: one full batch, so the KV cache has grown to its working size before anything is timed.
        asyncio.run(run_level(server.url, max_batch, 0.0, args.max_tokens, model))
        repeats = args.repeats if max_batch > 1 else 1  # one at a time is slow and steady: one run
        attacks = [0, args.slow_clients] if args.slow_clients and max_batch > 1 else [0]
        runs: dict[tuple[int, int], list[dict]] = {(clients, slow): [] for clients in levels for slow in attacks}
        with Progress() as progress:
            task = progress.add_task(f"{shape}, max batch {max_batch}", total=len(runs) * repeats)
            for _ in range(repeats):  # levels interleaved, so a change in the machine's load hits them alike
                for clients, slow in runs:
                    with SlowClients(server.port, slow) if slow else nullcontext():
                        server.peak_rss = 0  # (the sampler keeps the maximum from here on)
                        row = asyncio.run(run_level(server.url, clients, args.duration, args.max_tokens, model))
                        row["peak_rss_mb"] = server.peak_rss / 2**20
                    runs[(clients, slow)].append(row)
                    progress.advance(task)
        attacked = [median_of(runs[(clients, attacks[-1])]) for clients in levels] if len(attacks) > 1 else []
        return [median_of(runs[(clients, 0)]) for clients in levels], server.peak_rss, attacked


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for color, ((shape, batching), rows) in zip(("C0", "C1", "C2", "C3"), results.items()):
        x = [r["clients"] for r in rows]
        marker = "o" if batching else "x"
        label = f"{shape}, {'batching' if batching else 'one at a time'}"
        axes[0].plot(x, [r["tokens_per_s"] for r in rows], "-" + marker, color=color, label=label)
        for ax, key in ((axes[1], "latency"), (axes[2], "ttft")):
            ax.plot(x, [r[key + "_p50"] for r in rows], "-" + marker, color=color, label=label + ", p50")
            ax.plot(x, [r[key + "_p99"] for r in rows], ":" + marker, color=color, alpha=0.6, label=label + ", p99")
    for ax, title, unit in zip(axes, ("throughput", "request latency (64 tokens)", "time to first token"),
                               ("generated tokens / s", "seconds", "seconds")):
        ax.set(title=title, xlabel="concurrent clients", ylabel=unit, xscale="log", yscale="log")
        ax.set_xticks([1, 8, 32], ["1", "8", "32"])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=7)
    fig.suptitle("codegen-lm serve, random-weight models on loopback (streaming, greedy)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="small,350M", help="comma-separated shapes: " + ", ".join(SHAPES))
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--duration", type=float, default=None, help="seconds of sending per level "
                        "(default 10 for small, 30 for 350M)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64, help="per request (a typical completion length)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--unbatched", default="small", help="shapes also served one at a time (max batch 1) "
                        "to 32 clients; a 350M run of that takes 32 x 64 tokens at batch 1, minutes")
    parser.add_argument("--slow-clients", type=int, default=0, help="also run every level while this many slow-header "
                        "clients hold connections (the server's limit is 1024), and compare")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "serve_load.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "serve_latency.png")
    parser.add_argument("--replot", type=Path, help="only redraw --plot from a results JSON written by --out")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.port, args.max_batch)
    if args.replot:
        saved = json.loads(args.replot.read_text())
        return plot({(k.split("/")[0], k.endswith("/batching")): rows for k, rows in saved.items()}, args.plot)

    import torch

    levels = [int(c) for c in args.clients.split(",")]
    print(f"cpu: {platform.machine()}, {os.cpu_count()} cores, flags: {cpu_flags()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")
    results: dict[tuple[str, bool], list[dict]] = {}
    peaks: dict[tuple[str, bool], int] = {}
    attacked: dict[str, list[dict]] = {}
    for shape in args.models.split(","):
        duration = args.duration if args.duration is not None else (10.0 if shape == "small" else 30.0)
        level_args = argparse.Namespace(**{**vars(args), "duration": duration})
        for batching in (True, False) if shape in args.unbatched.split(",") else (True,):
            key = (shape, batching)
            results[key], peaks[key], under_attack = measure(shape, args.max_batch if batching else 1,
                                                             levels if batching else [levels[-1]], level_args)
            if under_attack:
                attacked[shape] = under_attack

    header = (f"{'model':6} {'server':14} {'clients':>7} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7} "
              f"{'ttft p50':>8} {'ttft p99':>8} {'errors':>6} {'peak RSS':>9}")
    print(header)
    for (shape, batching), rows in results.items():
        for r in rows:
            print(f"{shape:6} {'batch ' + str(args.max_batch) if batching else 'batch 1':14} {r['clients']:7d} "
                  f"{r['requests_per_s']:7.2f} {r['tokens_per_s']:8.1f} {r['latency_p50']:7.2f} {r['latency_p99']:7.2f} "
                  f"{r['ttft_p50']:8.2f} {r['ttft_p99']:8.2f} {r['errors']:6d} {peaks[(shape, batching)] / 2**20:7.0f}MB")
            for e in r["error_samples"]:
                print("   error:", e)
    for shape, rows in attacked.items():
        print(f"\n{shape}, batch {args.max_batch}: without / with {args.slow_clients} slow-header clients holding connections")
        print(f"{'clients':>7} {'p50 s':>13} {'p99 s':>13} {'ttft p99 s':>13} {'peak RSS MB':>13} {'errors':>9}")
        for clean, attack in zip(results[(shape, True)], rows):
            pair = lambda key, fmt: f"{format(clean[key], fmt)} / {format(attack[key], fmt)}"
            print(f"{clean['clients']:7d} {pair('latency_p50', '.2f'):>13} {pair('latency_p99', '.2f'):>13} "
                  f"{pair('ttft_p99', '.2f'):>13} {pair('peak_rss_mb', '.0f'):>13} "
                  f"{clean['errors']:>4d} / {attack['errors']:<4d}")
    ok = True
    for shape in args.models.split(","):
        rows = {r["clients"]: r for r in results[(shape, True)]}
        lo, hi = min(rows), max(rows)
        ratio = rows[hi]["tokens_per_s"] / rows[lo]["tokens_per_s"]
        errors = sum(r["errors"] for rs in (results.get((shape, b), []) for b in (True, False)) for r in rs)
        line = f"{shape}: tokens/s at {hi} clients / at {lo} client = {ratio:.1f}x"
        if (shape, False) in results:
            unbatched = results[(shape, False)][0]
            line += f"; vs {hi} clients without batching = {rows[hi]['tokens_per_s'] / unbatched['tokens_per_s']:.1f}x"
        print(line + f"; errors: {errors}")
        ok &= ratio >= 4 and errors == 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({f"{s}/{'batching' if b else 'unbatched'}": rows for (s, b), rows in results.items()},
                                   indent=1))
    plot(results, args.plot)
    print(f"wrote {args.out} and {args.plot}; throughput target (>= 4x at the most clients, zero errors): "
          f"{'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
