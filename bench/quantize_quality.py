"""int8 / int4 against fp32 on the 350M shape (the random checkpoint bench/engine.py saves): relative L2 error of
the logits over 4×128 random tokens, teacher-forced argmax agreement, and free-running greedy agreement.

    python bench/engine.py --rounds 1 --systems ours --precisions fp32   # once, to create the checkpoint
    python bench/quantize_quality.py [--checkpoint /tmp/codegen-lm-bench/codegen-350M-random]

Rows: int8 as loaded (kernels as chosen on this machine, embedding and LM head in int8); int8 with the fp32
embedding or the fp32 LM head put back (what each of those costs in accuracy); int8 with each kernel available here
forced for every layer (``CODEGEN_LM_INT8_KERNEL``: whichever the chooser picks, the error must stay the same);
int4 (LM head and embedding in int8).
"""

from __future__ import annotations

import argparse
import os

import torch

from codegen_lm import kernels
from codegen_lm.checkpoint import load_model
from codegen_lm.engine import Generator, SamplingParams
from codegen_lm.quantize import kernel_choices


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

    def fp32_embedding(model):
        model.transformer.wte = reference.transformer.wte

    def fp32_head(model):
        model.lm_head = reference.lm_head

    variants = [("int8", "int8", None, None), ("int8, fp32 embedding", "int8", None, fp32_embedding),
                ("int8, fp32 LM head", "int8", None, fp32_head)]
    variants += [(f"int8, {name} forced", "int8", name, None) for name in kernels.available_kernels()]
    variants += [("int4", "int4", None, None)]
    print("| weights | kernels | relative logit error | teacher-forced argmax agreement | greedy: first token that differs (4 prompts, of 32) |")
    print("|---|---|---|---|---|")
    for label, mode, kernel, change in variants:
        os.environ.pop(kernels.FORCE_ENV, None)
        if kernel:
            os.environ[kernels.FORCE_ENV] = kernel
        model = load_model(args.checkpoint, quantize=mode, inference=True)
        if change:
            change(model)
        with torch.inference_mode():
            out = model(ids).logits
        error = float((out - base).norm() / base.norm())
        agreement = float((out.argmax(-1) == base.argmax(-1)).float().mean())
        got = [r[0].token_ids for r in Generator(model, None).complete(prompts, params)]
        diverge = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(got, gold)]
        used = ", ".join(sorted(set(kernel_choices(model).values())))
        print(f"| {label} | {used} | {error:.4f} | {agreement:.3f} | {diverge} |", flush=True)
        del model


if __name__ == "__main__":
    main()
