"""Training throughput: our loop (``codegen_lm.train.train``) against transformers' ``Trainer``.

Same CodeGen-shaped model (random init), same packed blocks of real code (tokenized once by our data
pipeline), same batch, sequence length, optimizer (AdamW, weight decay 0.1, clip 1.0, warmup + cosine) and
precision. Each run is a fresh child process (so peak RSS is its own); systems alternate over the repeats and
the median of each is reported. Tokens/s is measured over windows of ``--window`` steps, the first window
(allocation, warm-up) left out.

    python bench/train.py                       # CPU defaults: 4 layers x 256, seq 128, batch 4
    python bench/train.py --device cuda --n-layer 20 --n-embd 1024 --seq-len 2048 --batch-size 8 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from machine import cpu_flags


def model_config(args: argparse.Namespace) -> dict:
    return {"vocab_size": 50304, "n_embd": args.n_embd, "n_layer": args.n_layer, "n_head": args.n_head,
            "rotary_dim": args.rotary_dim, "n_positions": max(2048, args.seq_len)}


def steady_tokens_per_s(step_times: list[float], tokens_per_step: int, window: int) -> float:
    """Median tokens/s over consecutive windows of ``window`` steps, leaving out the first window (allocation,
    warm-up) and the last step (which also runs the final evaluation and checkpoint)."""
    rates = [window * tokens_per_step / (step_times[i + window] - step_times[i])
             for i in range(window, len(step_times) - 1 - window, window)]
    return statistics.median(rates)


def run_ours(args: argparse.Namespace, workdir: str, queue: mp.Queue) -> None:
    import torch

    from codegen_lm.train.loop import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    out = tempfile.mkdtemp(dir=workdir)
    times: list[float] = []
    cfg = TrainConfig(
        out=out, data=[args.data], config=json.dumps(model_config(args)), seq_len=args.seq_len, batch_size=args.batch_size,
        steps=args.steps, lr=3e-4, warmup_steps=2, val_fraction=0.01, log_interval=args.steps, eval_interval=10**9,
        save_interval=10**9, cache_dir=args.cache_dir, device=args.device, precision=args.precision, progress=False,
    )
    times.append(time.perf_counter())
    train(cfg, on_step=lambda step, metrics: times.append(time.perf_counter()))
    queue.put(("ours", steady_tokens_per_s(times, args.batch_size * args.seq_len, args.window), _peak_mb(args.device)))


def run_trainer(args: argparse.Namespace, workdir: str, queue: mp.Queue) -> None:
    import torch
    import transformers

    from codegen_lm.tokenizer import CodeGenTokenizerFast
    from codegen_lm.train.data import DataSpec, PackedBlocks, prepare

    if args.threads:
        torch.set_num_threads(args.threads)
    data = prepare(DataSpec((args.data,), val_fraction=0.01), CodeGenTokenizerFast(), args.cache_dir, progress=False)
    blocks = PackedBlocks(data.train, args.seq_len)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict:
            ids, labels = blocks.block(i)
            return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}

    torch.manual_seed(0)
    model = transformers.CodeGenForCausalLM(transformers.CodeGenConfig(**model_config(args)))
    times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *a, **k) -> None:
            times.append(time.perf_counter())

    training_args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(dir=workdir), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=3e-4, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, lr_scheduler_type="cosine",
        warmup_steps=2, bf16=args.precision == "bf16", save_strategy="no", eval_strategy="no", report_to=[],
        logging_strategy="no", dataloader_num_workers=0, use_cpu=args.device == "cpu", disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=Blocks(), callbacks=[Clock()])
    times.append(time.perf_counter())
    trainer.train()
    queue.put(("transformers Trainer", steady_tokens_per_s(times, args.batch_size * args.seq_len, args.window), _peak_mb(args.device)))


def _peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(sysconfig.get_paths()["stdlib"]) / "email"),
                        help="Folder of .py files (default: the stdlib's email package)")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=8)
    parser.add_argument("--rotary-dim", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="bench-train-")
    args.cache_dir = args.cache_dir or os.path.join(workdir, "cache")
    import torch
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")
    print(f"cpu: {platform.machine()}, {os.cpu_count()} cores, flags: {cpu_flags()}")
    if args.device.startswith("cuda"):
        print(f"gpu: {torch.cuda.get_device_name()}")
    print(f"model {model_config(args)}, seq_len {args.seq_len}, batch {args.batch_size}, {args.precision}, "
          f"{args.steps} steps x {args.repeats} repeats, data {args.data}")

    ctx = mp.get_context("spawn")
    results: dict[str, list[tuple[float, float]]] = {}
    for repeat in range(args.repeats):
        for runner in (run_ours, run_trainer):
            queue = ctx.Queue()
            proc = ctx.Process(target=runner, args=(args, workdir, queue))
            proc.start()
            name, tps, peak = queue.get()
            proc.join()
            results.setdefault(name, []).append((tps, peak))
            print(f"  repeat {repeat + 1}: {name:22s} {tps:9.1f} tok/s   peak {peak:7.0f} MB")

    print(f"\n{'system':22s} {'tokens/s (median)':>18s} {'peak MB':>9s}")
    medians = {name: statistics.median(t for t, _ in runs) for name, runs in results.items()}
    for name, runs in results.items():
        print(f"{name:22s} {medians[name]:18.1f} {max(p for _, p in runs):9.0f}")
    print(f"\nratio ours / Trainer: {medians['ours'] / medians['transformers Trainer']:.2f}x")


if __name__ == "__main__":
    main()
