"""Foundation baseline (issue 4): our generate against transformers', 350M shape, random weights, fp32,
batch 1, 64-token prompt, 128 new tokens (greedy, EOS ignored), 2 threads.

    python bench/generate.py [--rounds 3]

Tokens per second of each (end to end, prefill included), the ratio and each one's peak resident memory.
Each system runs in its own subprocess per round (so peak memory is per system) and the rounds interleave
them; figures are medians over rounds. It is the ``decode`` scenario of bench/engine.py, which has the
full engine comparison (CTranslate2, n=8 sampling, prefill, int8/int4).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine  # noqa: E402


def main() -> None:
    args = engine.arguments(sys.argv[1:], scenarios="decode", precisions="fp32", systems="ours,transformers")
    medians = engine.measure([("ours", "fp32"), ("transformers", "fp32")], args)
    engine.print_table(medians, ["fp32"])


if __name__ == "__main__":
    main()
