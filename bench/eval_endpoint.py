"""HumanEval sample generation in-process vs through an endpoint (`codegen-lm serve` of the same checkpoint, in a
process of its own, over loopback): samples/s at equal concurrency, on random-weight checkpoints.

In-process, `Generator.complete` takes `--batch` problems at a time (what `codegen-lm eval humaneval --model`
does), called from the main thread as the command does, and from a worker thread as the server's engine runs
(on a loaded machine the two differ, see docs/benchmarks.md); through the endpoint, `--batch` requests are in
flight (`--concurrency`) at a server decoding up to `--batch` sequences per step (`--max-batch`). Greedy, so
all produce the same samples (checked). Rounds alternate between the three; figures are medians. Model
loading and server start are not timed.

    python bench/eval_endpoint.py                                  # tiny and 350M shapes, 3 rounds
    python bench/eval_endpoint.py --shapes tiny --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine import cpu_summary

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # random weights (std 0.02), the real tokenizer's 50295 rows
    "tiny": dict(n_embd=32, n_layer=1, n_head=4, rotary_dim=8),
    "350M": dict(n_embd=1024, n_layer=20, n_head=16, rotary_dim=32),
}


def checkpoint(shape: str, folder: Path) -> Path:
    import shutil

    import torch

    from codegen_lm import CodeGenConfig, CodeGenForCausalLM

    path = folder / f"random-{shape}"
    torch.manual_seed(0)
    model = CodeGenForCausalLM(CodeGenConfig(vocab_size=50295, n_positions=2048, **SHAPES[shape]))
    with torch.no_grad():  # std 0.02 everywhere: greedy output that does not collapse into one token at once
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.zero_()
    model.save_pretrained(path)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ROOT / "src" / "codegen_lm" / "data" / name, path / name)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, batch: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "codegen_lm.cli", "serve", "--model", str(model), "--port", str(port),
                             "--max-batch", str(batch), "--max-queue", "1024", "--dtype", "fp32", "--device", "cpu",
                             "--log-level", "warning"], env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)


def in_thread(fn, *args) -> None:
    error = []
    worker = threading.Thread(target=lambda: _catch(error, fn, *args))
    worker.start()
    worker.join()
    if error:
        raise error[0]


def _catch(error: list, fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as e:  # re-raised in the caller
        error.append(e)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,350M")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="in-process batch = endpoint concurrency = server max batch")
    parser.add_argument("--problems", default="tiny:64,350M:16", help="HumanEval problems per shape")
    parser.add_argument("--max-new-tokens", default="tiny:128,350M:64")
    args = parser.parse_args()

    import torch

    from codegen_lm.evaluate import humaneval
    from codegen_lm.evaluate.endpoint import connect
    from codegen_lm.engine import Generator

    torch.set_num_threads(os.cpu_count())
    print(f"machine: {cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f}")
    count = dict(item.split(":") for item in args.problems.split(","))
    tokens = dict(item.split(":") for item in args.max_new_tokens.split(","))
    problems = humaneval.load_problems()
    for shape in args.shapes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model = checkpoint(shape, tmp)
            table = dict(list(problems.items())[: int(count[shape])])
            settings = humaneval.Settings(problems="bench", n=1, temperature=0.0, max_new_tokens=int(tokens[shape]))
            print(f"\n{shape}: {len(table)} HumanEval prompts x 1 greedy sample, {settings.max_new_tokens} new tokens "
                  f"at most, batch/concurrency {args.batch}")
            generator = Generator.from_pretrained(str(model), max_batch=args.batch, dtype="fp32", device="cpu")
            server, url = start_server(model, args.batch)
            try:
                endpoints = connect([url], concurrency=args.batch)
                runs = {
                    "in-process": lambda path: humaneval.generate_samples(generator, table, settings, path),
                    "in-process, worker thread": lambda path: in_thread(humaneval.generate_samples, generator, table,
                                                                        settings, path),
                    "endpoint": lambda path: humaneval.generate_samples_from_endpoints(endpoints, table, settings, path),
                }
                rates: dict[str, list[float]] = {how: [] for how in runs}
                outputs = {}
                for round_ in range(args.rounds):
                    for how, run in runs.items():
                        path = tmp / f"{round_}-{how.replace(' ', '-')}.jsonl"
                        start = time.perf_counter()
                        run(path)
                        seconds = time.perf_counter() - start
                        rates[how].append(len(table) / seconds)
                        outputs[how] = {(r["task_id"], r["completion_id"]): r["completion"]
                                        for r in map(json.loads, path.read_text().splitlines())}
                        print(f"  round {round_ + 1} {how:26s} {seconds:7.2f} s  {rates[how][-1]:7.2f} samples/s")
                same = all(out == outputs["endpoint"] for out in outputs.values())
                medians = {how: statistics.median(r) for how, r in rates.items()}
                print("  median samples/s: " + ", ".join(f"{how} {m:.2f}" for how, m in medians.items())
                      + f"; samples identical: {same}")
                for how in ("in-process", "in-process, worker thread"):
                    ratio = medians["endpoint"] / medians[how]
                    print(f"  endpoint / {how}: {ratio:.3f}x ({100 * (1 - ratio):+.1f}% slower)")
                print(f"  peak RSS: this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
                      f"(model + client), server {peak_rss_mb(server.pid):.0f} MB")
            finally:
                server.terminate()
                server.wait()
            del generator
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
