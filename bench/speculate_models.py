"""The trained models the speculative-decoding benchmark measures acceptance on (bench/speculate_trained.py): a target
and a smaller draft, both trained from scratch on this machine's Python standard library with the README's recipe
("A small CodeGen trained from scratch on this machine's Python standard library"), a few modules held out.

    python bench/speculate_models.py              # trains what is missing in bench/out/speculate/ (resumes a run)
    python bench/speculate_models.py --print      # only prints the two commands

target  the README's recipe exactly (4 layers x 256, 600 steps of 8 x 256 tokens), plus --exclude of HELD_OUT
draft   the same data and recipe at 2 layers x 128 and half the steps (300): a draft only has to guess the easy
        tokens, and CPU time is scarce

The models are cached in bench/out/speculate/{target,draft} (git ignores bench/out/); each folder's metrics.jsonl
and run.json say how it was made. Interrupting is safe: running this again resumes the run (--resume).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "speculate"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
RECIPE_EXCLUDE = ("site-packages", "test", "tests", "idlelib", "lib2to3", "encodings")
# Modules neither model sees in training: the held-out completions and edits come from these.
HELD_OUT = ("argparse.py", "configparser.py", "csv.py", "difflib.py", "fractions.py", "shlex.py", "statistics.py",
            "textwrap.py")
SHAPES = {
    "target": {"n_layer": 4, "n_embd": 256, "n_head": 8, "rotary_dim": 32, "n_positions": 512, "vocab_size": 50304},
    "draft": {"n_layer": 2, "n_embd": 128, "n_head": 4, "rotary_dim": 32, "n_positions": 512, "vocab_size": 50304},
}
STEPS = {"target": 600, "draft": 300}
RECIPE = ["--seq-len", "256", "--batch-size", "8", "--lr", "2e-3", "--warmup", "50", "--val-fraction", "0.02",
          "--eval-interval", "100", "--save-interval", "100", "--log-interval", "10"]


def model_path(name: str) -> Path:
    return OUT / name


def ready(name: str) -> bool:
    return (model_path(name) / "config.json").exists() and any(model_path(name).glob("*.safetensors"))


def train_command(name: str) -> list[str]:
    command = [sys.executable, "-m", "codegen_lm.cli", "train", "--data", str(STDLIB)]
    for pattern in RECIPE_EXCLUDE + HELD_OUT:
        command += ["--exclude", pattern]
    command += ["--out", str(model_path(name)), "--config", json.dumps(SHAPES[name], separators=(", ", ": ")),
                "--steps", str(STEPS[name]), *RECIPE]
    return command


def build(names: list[str], progress: bool = True) -> None:
    """Train the models in ``names`` that are not finished; a run interrupted before resumes."""
    for name in names:
        if ready(name):
            print(f"{name}: {model_path(name)} (cached)")
            continue
        command = train_command(name) + ([] if progress else ["--no-progress"])
        if (model_path(name) / "run.json").exists():
            command.append("--resume")
        print(f"{name}: training ({shlex.join(command)})", flush=True)
        if subprocess.run(command).returncode != 0:
            sys.exit(f"training the {name} model failed (see above); run this script again to resume it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print", action="store_true", help="print the training commands, train nothing")
    parser.add_argument("--models", default="target,draft")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    names = args.models.split(",")
    if args.print:
        for name in names:
            print(shlex.join(train_command(name)))
        return
    build(names, progress=not args.no_progress)


if __name__ == "__main__":
    main()
