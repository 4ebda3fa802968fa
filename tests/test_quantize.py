"""int8 / int4 linear layers and models prepared for inference: close to fp32 within stated bounds, and
batch-invariant (bit for bit within a kernel), so the scheduler gives a quantized request what it would get alone."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import build_model
from torch import nn

from codegen_lm.checkpoint import load_model
from codegen_lm.engine import Generator, SamplingParams, Scheduler
from codegen_lm.quantize import Int4Linear, Int8Linear, OneDNNLinear, _onednn_int8_available, prepare_for_inference

# Relative L2 error of a layer's output on Gaussian weights and inputs. int8: 1/127 steps on weights and
# (per row) on activations; int4: 1/15 steps per group of 128 weights, activations in bf16.
LINEAR_BOUNDS = {"int8": 0.02, "int4": 0.13}
# The same for a whole (tiny, random) model's logits, where errors add up over the layers.
LOGIT_BOUNDS = {"int8": 0.04, "int4": 0.25}


def make_linear(k: int = 256, n: int = 384, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=bias)
    nn.init.normal_(linear.weight, std=0.02)
    if bias:
        nn.init.normal_(linear.bias, std=0.02)
    return linear


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


LAYERS = {
    "int8 fbgemm": lambda lin: Int8Linear(lin),
    "int8 dequant": lambda lin: Int8Linear(lin, backend="dequant"),
    "int4 int4pack": lambda lin: Int4Linear(lin, 128),
    "int4 dequant": lambda lin: Int4Linear(lin, 128, backend="dequant"),
}


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [5, 20, 300])  # int8 on CPU: fbgemm for a few rows, oneDNN for many (16 or 256 on)
def test_layers_are_close_to_fp32(name, bias, rows):
    linear = make_linear(bias=bias)
    layer = LAYERS[name](linear)
    x = torch.randn(2, rows, 256)
    with torch.no_grad():
        assert relative_error(layer(x), linear(x)) < LINEAR_BOUNDS[name.split()[0]]
        assert layer(x).shape == (2, rows, 384) and layer(x).dtype == torch.float32


@pytest.mark.parametrize("name", ["int8 fbgemm", "int4 int4pack"])
def test_fast_kernels_are_batch_invariant_bit_for_bit(name):
    layer = LAYERS[name](make_linear())
    x = torch.randn(7, 256) * torch.logspace(-3, 2, 7)[:, None]  # rows of very different sizes
    x[3] = 0  # and an all-zero row
    with torch.no_grad():
        together = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(7)])
    assert torch.equal(together, alone)
    assert torch.isfinite(together).all()


@pytest.mark.skipif(not _onednn_int8_available(), reason="this PyTorch has no oneDNN int8 ops")
def test_int8_prefill_kernel_is_batch_invariant_and_agrees_with_the_decode_kernel_to_rounding():
    layer = Int8Linear(make_linear())
    least = layer.onednn_min_rows
    x = torch.randn(least + 24, 256) * torch.logspace(-3, 2, least + 24)[:, None]
    x[3] = 0
    with torch.no_grad():
        many = layer(x)  # oneDNN
        fewer = layer(x[:least])  # oneDNN, another batch shape
        alone = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])  # fbgemm
    assert torch.equal(many[:least], fewer)
    # Same integer products; only the final float scaling may round differently (1 ulp of the row's scale).
    assert ((many - alone).abs() <= 1e-6 * alone.abs().amax(dim=-1, keepdim=True)).all()


def test_fast_kernels_agree_with_the_portable_path():
    linear = make_linear()
    x = torch.randn(4, 256)
    with torch.no_grad():
        # Same quantized weights; the fast int8 kernel also quantizes the activations, the portable path does not.
        # Without VNNI they get 7 bits instead of 8 (see _reduce_range), which doubles their step: measured
        # 0.006 with VNNI (AVX-512) and 0.015 without (AVX2).
        fast = Int8Linear(linear)
        assert relative_error(fast(x), Int8Linear(linear, backend="dequant")(x)) < (0.02 if fast.reduce_range else 0.01)
        # The int4 kernel differs from the portable path only by the bf16 activations.
        assert relative_error(Int4Linear(linear, 128)(x), Int4Linear(linear, 128, backend="dequant")(x)) < 0.01


@pytest.fixture(scope="module")
def fp32_model():
    return build_model(n_embd=128, n_head=8, rotary_dim=8, n_layer=2, vocab_size=1000, n_positions=256)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_logits_within_bound_and_greedy_agreement(fp32_model, mode):
    quantized = prepare_for_inference(copy.deepcopy(fp32_model), mode)
    kinds = {type(m).__name__ for m in quantized.modules()}
    assert "Linear" not in kinds
    assert isinstance(quantized.lm_head, Int8Linear)  # int4 keeps the head in int8
    ids = torch.randint(0, 1000, (4, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = fp32_model(ids).logits, quantized(ids).logits
    error = relative_error(out, ref)
    agreement = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    print(f"{mode}: relative logit error {error:.4f}, argmax agreement {agreement:.3f}")
    assert error < LOGIT_BOUNDS[mode]
    assert agreement > {"int8": 0.9, "int4": 0.6}[mode]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_scheduler_gives_each_request_what_it_gets_alone(fp32_model, mode):
    model = prepare_for_inference(copy.deepcopy(fp32_model), mode)
    prompts = [list(range(10, 10 + n)) for n in (5, 17, 9)]
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True),
              SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.9, seed=1, ignore_eos=True),
              SamplingParams(max_new_tokens=10, temperature=0.5, n=2, seed=4, ignore_eos=True)]

    def run(requests: list[int], max_batch: int) -> dict[tuple[str, int], list[int]]:
        scheduler = Scheduler(model, None, max_batch=max_batch)
        out: dict[tuple[str, int], list[int]] = {}
        for i in requests:
            scheduler.add_request(prompts[i], params[i], str(i))
        while scheduler.has_unfinished():
            for o in scheduler.step():
                out.setdefault((o.request_id, o.index), []).extend(o.token_ids)
        return out

    together = run([0, 1, 2], max_batch=4)
    for i in range(3):
        alone = run([i], max_batch=1)
        assert {k: v for k, v in together.items() if k[0] == str(i)} == alone


def test_load_model_quantizes_and_misuse_is_refused(tmp_path, fp32_model):
    fp32_model.save_pretrained(tmp_path / "m")
    model = load_model(tmp_path / "m", quantize="int8")
    assert model.quantization == "int8" and isinstance(model.transformer.h[0].in_proj, Int8Linear)
    tokens = Generator(model, None).complete([[1, 2, 3]], SamplingParams(max_new_tokens=4))[0][0].token_ids
    assert len(tokens) == 4
    with pytest.raises(ValueError, match="unknown quantization 'int3'; use one of int8, int4"):
        load_model(tmp_path / "m", quantize="int3")
    with pytest.raises(ValueError, match="already prepared for inference"):
        prepare_for_inference(model, "int4")
    with pytest.raises(ValueError, match="cannot be saved"):
        model.save_pretrained(tmp_path / "q")


def test_int4_keeps_int8_for_shapes_its_kernel_cannot_take():
    model = prepare_for_inference(build_model(n_embd=40, n_head=4, rotary_dim=4, n_inner=72), "int4")  # 40 % 32 != 0
    assert isinstance(model.transformer.h[0].in_proj, Int8Linear)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_complete_command_takes_quantize(tiny_checkpoint, mode):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "codegen_lm.cli", "complete", "def f():", "--model", str(tiny_checkpoint), "-n", "6",
         "--json", "--quantize", mode],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["token_ids"]) == 6


def test_packed_fp32_model_matches_the_plain_one(fp32_model, tmp_path):
    packed = prepare_for_inference(copy.deepcopy(fp32_model))
    assert all(not isinstance(m, nn.Linear) for m in packed.modules())
    assert isinstance(packed.lm_head, OneDNNLinear) and isinstance(packed.transformer.h[0].in_proj, OneDNNLinear)
    ids = torch.randint(0, 1000, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, fp32_model(ids).logits, atol=1e-5, rtol=1e-5)
    prompt = list(range(40, 60))
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    assert (Generator(packed, None).complete([prompt], params)[0][0].token_ids
            == Generator(fp32_model, None).complete([prompt], params)[0][0].token_ids)
    with pytest.raises(ValueError, match="cannot be saved"):
        packed.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="already prepared for inference"):
        prepare_for_inference(packed, "int8")


@pytest.mark.parametrize("packed", [True, False])
def test_onednn_weight_layouts_compute_what_f_linear_does(packed):
    linear = make_linear()
    x = torch.randn(70, 256)
    with torch.no_grad():
        for rows in (1, 8, 70):  # oneDNN picks other kernels for few and many rows
            torch.testing.assert_close(OneDNNLinear(linear, packed=packed)(x[:rows]), linear(x[:rows]), atol=1e-5, rtol=1e-5)


def test_fused_projections_compute_what_the_four_do(fp32_model):
    """Fusing alone (what a GPU or half-precision model gets): the same logits, and no trainable leftovers."""
    block = copy.deepcopy(fp32_model.transformer.h[0])
    x = torch.randn(2, 7, 128)
    sin, cos = fp32_model.transformer._rotary(torch.arange(7).expand(2, 7))
    with torch.no_grad():
        before = block(x, sin, cos, None)[0]
        block.fuse_projections()
        after = block(x, sin, cos, None)[0]
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert {name for name, _ in block.named_parameters()} == {
        "ln_1.weight", "ln_1.bias", "in_proj.weight", "in_proj.bias", "out_proj.weight", "out_proj.bias"}
    with pytest.raises(ValueError, match="cannot be saved"):
        block.state_dict()


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_loading_for_inference_equals_preparing_after_loading(tmp_path, fp32_model, mode):
    """load_model converts block by block while reading; the result is the same model, for sharded files too."""
    fp32_model.save_pretrained(tmp_path / "m", max_shard_size="200KB")
    assert len(list((tmp_path / "m").glob("*.safetensors"))) > 1
    streamed = load_model(tmp_path / "m", quantize=mode, inference=True)
    after = prepare_for_inference(load_model(tmp_path / "m"), mode)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, after(ids).logits)
    assert streamed.quantization == mode
    assert [type(m).__name__ for m in streamed.modules()] == [type(m).__name__ for m in after.modules()]


LOAD_MEMORY = """
import sys, codegen_lm
from codegen_lm.checkpoint import load_model
def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
load_model(sys.argv[2], quantize=sys.argv[3] or None, inference=True)  # imports and kernel set-up, once
peak, resident = status("VmHWM"), status("VmRSS")
model = load_model(sys.argv[1], quantize=sys.argv[3] or None, inference=True)
print(status("VmHWM") - peak, status("VmRSS") - resident)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from Linux's /proc")
@pytest.mark.parametrize("mode", ["", "int8"])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_loading_for_inference_peaks_near_the_final_size(tmp_path, mode, safe):
    """Converting block by block while reading: a safetensors load adds little beyond the fp32 weights at its
    peak (measured 1.07× for fp32, 0.86× for int8; converting after a plain load held the fp32 model and its
    converted copy at once: 2.2×). A .bin file is one mapping, read whole by the end of the load; afterwards no
    tensor may still view it, or every page of it would stay resident beside the converted weights."""
    # Embeddings and head of 16 MB each: read in slices (checkpoint._COPY_SLICE_BYTES).
    build_model(n_embd=512, n_head=8, n_layer=8, vocab_size=8192).save_pretrained(tmp_path / "m", safe_serialization=safe)
    build_model().save_pretrained(tmp_path / "tiny")
    weights = sum(f.stat().st_size for f in (tmp_path / "m").glob("*model*"))  # 135 MB
    peak, resident = map(int, subprocess.run(
        [sys.executable, "-c", LOAD_MEMORY, str(tmp_path / "m"), str(tmp_path / "tiny"), mode], capture_output=True,
        text=True, check=True).stdout.split())
    print(f"{mode or 'fp32'}: load peak +{peak / 1e6:.0f} MB, resident +{resident / 1e6:.0f} MB, weights {weights / 1e6:.0f} MB")
    if safe:
        assert peak < 1.3 * weights
    assert resident < 1.2 * weights


def test_importing_codegen_lm_first_asks_torch_for_huge_pages():
    code = "import os, codegen_lm; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.strip() == "1"
    env["THP_MEM_ALLOC_ENABLE"] = "0"  # a user's own setting wins
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.strip() == "0"
