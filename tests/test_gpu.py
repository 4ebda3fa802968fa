"""The engine on a GPU: half precision, quantized weights and the compiled (CUDA-graph) decode step against the
fp32 CPU engine. Skipped without CUDA; run on a lent device (`python -m pytest tests/test_gpu.py`)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_model

from codegen_lm.engine import Generator, SamplingParams
from codegen_lm.quantize import prepare_for_inference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [list(range(3, 19)), list(range(200, 209))]


@pytest.fixture(scope="module")
def reference():
    return build_model(seed=2, n_embd=256, n_head=8, n_layer=3, rotary_dim=16)


def on_gpu(model, dtype=torch.bfloat16, quantize=None):
    return prepare_for_inference(copy.deepcopy(model).to("cuda", dtype), quantize)


def greedy(model, compile=False, new=16):
    params = SamplingParams(max_new_tokens=new, ignore_eos=True, logprobs=True)
    return [r[0] for r in Generator(model, None, compile=compile).complete(PROMPTS, params)]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_gpu_logits_match_the_cpu_model(reference, dtype, tolerance):
    model = on_gpu(reference, dtype)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids.cuda()).logits.cpu()
    assert ((got - expected).abs().max() / expected.abs().max()).item() < tolerance


@pytest.mark.parametrize("quantize, bound", [("int8", 0.04), ("int4", 0.25)])
def test_gpu_quantized_logits_stay_close(reference, quantize, bound):
    model = on_gpu(reference, torch.bfloat16, quantize)
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids.cuda()).logits.cpu()
    assert ((got - expected).norm() / expected.norm()).item() < bound


def test_fp32_gpu_greedy_equals_the_cpu_engine(reference):
    assert [c.token_ids for c in greedy(on_gpu(reference, torch.float32))] == [c.token_ids for c in greedy(reference)]


@pytest.mark.slow
def test_cuda_graph_decode_equals_eager_decode(reference):
    model = on_gpu(reference, torch.float32)
    eager = greedy(model)
    compiled = greedy(model, compile=True)
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c.logprobs, e.logprobs, atol=1e-4, rtol=1e-4)
