"""int8 / int4 against fp32 on the 350M shape (the random checkpoint bench/engine.py saves): relative L2 error of
the logits over 4×128 random tokens, teacher-forced argmax agreement, and free-running greedy agreement.

    python bench/engine.py --rounds 1 --systems ours --precisions fp32   # once, to create the checkpoint
    python bench/quantize_quality.py [--checkpoint /tmp/codegen-lm-bench/codegen-350M-random]
"""

from __future__ import annotations

import argparse

import torch

from codegen_lm.checkpoint import load_model
from codegen_lm.engine import Generator, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="/tmp/codegen-lm-bench/codegen-350M-random")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference = load_model(args.checkpoint)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50000, (4, 128), generator=g)
    with torch.inference_mode():
        base = reference(ids).logits
    prompts = [torch.randint(0, 50000, (32,), generator=g).tolist() for _ in range(4)]
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    gold = [r[0].token_ids for r in Generator(reference, None).complete(prompts, params)]
    for mode in ("int8", "int4"):
        model = load_model(args.checkpoint, quantize=mode)
        with torch.inference_mode():
            out = model(ids).logits
        error = float((out - base).norm() / base.norm())
        agreement = float((out.argmax(-1) == base.argmax(-1)).float().mean())
        got = [r[0].token_ids for r in Generator(model, None).complete(prompts, params)]
        diverge = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(got, gold)]
        print(f"{mode}: relative logit error {error:.4f}; teacher-forced argmax agreement {agreement:.3f}; "
              f"free-running greedy first differs from fp32 at token {diverge} (of 32)")


if __name__ == "__main__":
    main()
