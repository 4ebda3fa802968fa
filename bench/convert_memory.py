"""Peak memory of ``codegen-lm convert --to gptj`` on a full-size shape, against the transformers route.

Random weights of the chosen shape (default: CodeGen-2B, fp16, as pytorch_model.bin like the released
checkpoints) are written once to a temporary folder. Each conversion then runs in its own fresh process,
which reports its peak resident set size (VmHWM, which includes the memory-mapped file pages it touched)
and its wall time:

* ours: ``codegen_lm.convert.convert(src, dst, "gptj")``, streaming tensor by tensor into 2 GiB shards;
* transformers: ``CodeGenForCausalLM.from_pretrained`` (fp16), q/k/v split of its state dict, a GPT-J model
  built on the meta device and filled with ``load_state_dict(assign=True)``, ``save_pretrained`` (the
  route of fauxpilot's converter, without its second full allocation).

Usage: python bench/convert_memory.py [--size 2B] [--dtype fp16] [--repeat 3] [--format bin|safetensors]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from codegen_lm.config import CodeGenConfig
from codegen_lm.convert import DTYPES, codegen_shapes, gptj_config, split_qkv
from machine import cpu_flags


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def write_source(folder: Path, size: str, dtype: torch.dtype, fmt: str) -> int:
    """Random weights in the official layout; returns their size in bytes."""
    config = CodeGenConfig.preset(f"codegen-{size}-mono")
    config.extra["torch_dtype"] = str(dtype).removeprefix("torch.")
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.empty(shape, dtype=dtype).normal_(0, 0.02, generator=generator) for name, shape in codegen_shapes(config).items()}
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return sum(t.nbytes for t in state.values())


def child_ours(src: str, dst: str) -> None:
    from codegen_lm.convert import convert

    convert(src, dst, "gptj")


def child_transformers(src: str, dst: str) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.CodeGenForCausalLM.from_pretrained(src, dtype=torch.float16)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("qkv_proj.weight"):
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), split_qkv(tensor)):
                state[name.replace("qkv_proj", proj)] = part
        elif not name.endswith(("causal_mask", "masked_bias")):
            state[name] = tensor
    del model
    config = CodeGenConfig.from_pretrained(src)
    with torch.device("meta"):
        gptj = transformers.GPTJForCausalLM(transformers.GPTJConfig(**gptj_config(config, torch.float16)))
    gptj.load_state_dict(state, strict=True, assign=True)
    gptj.save_pretrained(dst, max_shard_size="2GB")


def run_child(which: str, src: Path, dst: Path) -> dict:
    """One conversion in a fresh interpreter; returns its peak RSS, its RSS before converting, and seconds."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", which, str(src), str(dst)], check=True, capture_output=True, text=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    written = sum(p.stat().st_size for p in dst.iterdir() if p.suffix == ".safetensors")
    shutil.rmtree(dst)
    return result | {"written": written}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2B", choices=["350M", "2B", "6B", "16B"])
    parser.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    parser.add_argument("--format", default="bin", choices=["bin", "safetensors"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-transformers", action="store_true", help="only ours (the peer needs about one more copy of RAM)")
    parser.add_argument("--workdir", default=None, help="where the temporary checkpoints go (default: the system temp dir)")
    parser.add_argument("--child", nargs=3, metavar=("WHICH", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        which, src, dst = args.child
        before = status_bytes("VmRSS")
        start = time.perf_counter()
        {"ours": child_ours, "transformers": child_transformers}[which](src, dst)
        seconds = time.perf_counter() - start
        # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec, so it would report
        # the parent's size if that were larger.
        peak = status_bytes("VmHWM")
        print(json.dumps({"peak": peak, "before": before, "seconds": seconds}))
        return

    import transformers

    print(f"machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; "
          f"cpu flags: {cpu_flags()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="convert-bench-") as tmp:
        src = Path(tmp) / "src"
        start = time.perf_counter()
        weights = write_source(src, args.size, DTYPES[args.dtype], args.format)
        print(f"source: codegen-{args.size} shape, random {args.dtype} weights, {args.format}, "
              f"{weights / 2**30:.2f} GiB (written in {time.perf_counter() - start:.0f} s; "
              f"this process now holds {status_bytes('VmRSS') / 2**30:.2f} GiB)")

        systems = ["ours"] + ([] if args.skip_transformers else ["transformers"])
        results: dict[str, list[dict]] = {name: [] for name in systems}
        for i in range(args.repeat):
            for name in systems:
                r = run_child(name, src, Path(tmp) / f"out-{name}")
                results[name].append(r)
                print(f"  run {i + 1} {name:12s} peak RSS {r['peak'] / 2**30:6.2f} GiB "
                      f"(before converting {r['before'] / 2**30:.2f} GiB)  {r['seconds']:6.1f} s  wrote {r['written'] / 2**30:.2f} GiB")

    print(f"\nmedian of {args.repeat} runs; weights {weights / 2**30:.2f} GiB, two copies {2 * weights / 2**30:.2f} GiB")
    print(f"{'system':14s}{'peak RSS GiB':>14s}{'x weights':>11s}{'seconds':>10s}")
    medians = {}
    for name, runs in results.items():
        peak = statistics.median(r["peak"] for r in runs)
        seconds = statistics.median(r["seconds"] for r in runs)
        medians[name] = (peak, seconds)
        print(f"{name:14s}{peak / 2**30:14.2f}{peak / weights:11.2f}{seconds:10.1f}")
    if "transformers" in medians:
        (ours_peak, ours_s), (peer_peak, peer_s) = medians["ours"], medians["transformers"]
        print(f"ours / transformers: peak RSS {ours_peak / peer_peak:.2f}x, time {ours_s / peer_s:.2f}x")


if __name__ == "__main__":
    main()
