"""int8 / int4 linear layers and models prepared for inference: close to fp32 within stated bounds whichever kernel
runs them, batch-invariant (bit for bit within a kernel), so the scheduler gives a quantized request what it would get
alone; the int8 kernel chooser and its cache; the fallbacks where x86's kernels are missing (aarch64)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import build_model
from torch import nn

from codegen_lm import kernels
from codegen_lm.checkpoint import load_model
from codegen_lm.engine import Generator, SamplingParams, Scheduler
from codegen_lm.quantize import (
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    OneDNNLinear,
    kernel_choices,
    prepare_for_inference,
    quantize_per_channel_int8,
)

# Relative L2 error of a layer's output on Gaussian weights and inputs. int8: 1/127 steps on weights and
# (per row) on activations; int4: 1/15 steps per group of 128 weights, activations in bf16.
LINEAR_BOUNDS = {"int8": 0.02, "int4": 0.13}
# The same for a whole (tiny, random) model's logits, where errors add up over the layers (int8 and int4 models
# also hold the token embedding in int8).
LOGIT_BOUNDS = {"int8": 0.04, "int4": 0.25}
# The int8 embedding's rows: one scale per row, 1/127 of its largest entry (measured 0.007 on Gaussian rows).
EMBEDDING_BOUND = 0.01


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path_factory, monkeypatch):
    """Every test times (or reads) int8 kernels in a folder of its module, never the user's cache; nothing forced."""
    monkeypatch.setenv("CODEGEN_LM_CACHE", str(tmp_path_factory.getbasetemp() / "codegen-lm-cache"))
    monkeypatch.delenv(kernels.FORCE_ENV, raising=False)
    monkeypatch.delenv("CODEGEN_LM_INT4_KERNEL", raising=False)


def make_linear(k: int = 256, n: int = 384, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=bias)
    nn.init.normal_(linear.weight, std=0.02)
    if bias:
        nn.init.normal_(linear.bias, std=0.02)
    return linear


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def kernel_param(name: str):
    """A forced int8 kernel, skipped where this machine lacks it (fbgemm on aarch64, oneDNN's int8 ops in some builds)."""
    return pytest.param(name, marks=pytest.mark.skipif(name not in kernels.available_kernels(), reason=f"no {name} here"))


INT8_KERNELS = [kernel_param(name) for name in kernels.KERNELS]
U8_KERNELS = [kernel_param(name) for name, k in kernels.KERNELS.items() if kernels.STORAGES[k.storage].scaled_rows]
LAYERS = {
    "int8 chosen": lambda lin: Int8Linear(lin),
    **{f"int8 {name}": (lambda lin, name=name: Int8Linear(lin, kernel=name)) for name in kernels.KERNELS},
    "int4 int4pack": lambda lin: Int4Linear(lin, 128),
    "int4 dequant": lambda lin: Int4Linear(lin, 128, backend="dequant"),
}


def layer_param(name: str):
    kernel = name.split()[1]
    return kernel_param(kernel) if kernel in kernels.KERNELS else name


@pytest.mark.parametrize("name", [layer_param(name) for name in LAYERS])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 20, 100, 600])  # one row count in each of the chooser's buckets
def test_layers_are_close_to_fp32_whichever_kernel_runs_them(name, bias, rows):
    name = name if name in LAYERS else f"int8 {name}"
    linear = make_linear(bias=bias)
    layer = LAYERS[name](linear)
    x = torch.randn(2, rows, 256)
    with torch.no_grad():
        assert relative_error(layer(x), linear(x)) < LINEAR_BOUNDS[name.split()[0]]
        assert layer(x).shape == (2, rows, 384) and layer(x).dtype == torch.float32


@pytest.mark.parametrize("name", U8_KERNELS + ["int4pack"])
def test_fast_kernels_are_batch_invariant_bit_for_bit(name):
    layer = Int4Linear(make_linear(), 128) if name == "int4pack" else Int8Linear(make_linear(), kernel=name)
    x = torch.randn(7, 256) * torch.logspace(-3, 2, 7)[:, None]  # rows of very different sizes
    x[3] = 0  # and an all-zero row
    with torch.no_grad():
        together = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(7)])
    assert torch.equal(together, alone)
    assert torch.isfinite(together).all()


@pytest.mark.skipif(not {"fbgemm", "onednn"} <= set(kernels.available_kernels()), reason="needs fbgemm and oneDNN int8")
def test_u8_kernels_compute_the_same_integer_products():
    """fbgemm and oneDNN take rows on the same activation grid, so whichever the chooser picks (it may differ between
    machines and thread counts) a result differs only in the rounding of the final float scaling."""
    linear = make_linear()
    x = torch.randn(40, 256) * torch.logspace(-3, 2, 40)[:, None]
    x[3] = 0
    with torch.no_grad():
        fbgemm, onednn = Int8Linear(linear, kernel="fbgemm")(x), Int8Linear(linear, kernel="onednn")(x)
    assert ((fbgemm - onednn).abs() <= 1e-6 * fbgemm.abs().amax(dim=-1, keepdim=True)).all()


@pytest.mark.parametrize("name", INT8_KERNELS)
def test_kernels_agree_with_the_exact_product_of_the_int8_weights(name):
    linear = make_linear()
    x = torch.randn(4, 256)
    q, scale = quantize_per_channel_int8(linear.weight)
    with torch.no_grad():
        exact = nn.functional.linear(x, q.float() * scale[:, None], linear.bias)
        # The u8 kernels also quantize the activations (7 bits without VNNI, which doubles their step: measured 0.006
        # with VNNI, 0.015 without); the weight-only ones differ by summation order.
        bound = 0.02 if kernels.reduce_range() else 0.01
        bound = bound if kernels.STORAGES[kernels.KERNELS[name].storage].scaled_rows else 1e-5
        assert relative_error(Int8Linear(linear, kernel=name)(x), exact) < bound
        # The int4 kernel differs from the portable path only by the bf16 activations.
        assert relative_error(Int4Linear(linear, 128)(x), Int4Linear(linear, 128, backend="dequant")(x)) < 0.01


@pytest.mark.parametrize("name", INT8_KERNELS)
def test_every_kernel_runs_in_a_compiled_graph(name):
    """A compiled decode step traces each int8 layer whole (fullgraph): the u8 kernels' packed weights through the
    custom op ``codegen_lm::int8_gemm``, the weight-only ones directly, row counts symbolic. dynamo's eager backend
    runs the graph, so this is fast; inductor's code is tested in test_engine.py."""
    layer = Int8Linear(make_linear(), kernel=name)
    compiled = torch.compile(layer, backend="eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for rows in (3, 70):
            x = torch.randn(rows, 256)
            torch.testing.assert_close(compiled(x), layer(x), atol=1e-6, rtol=1e-5)


def test_a_plan_runs_each_row_count_with_its_bucket_s_kernel(monkeypatch):
    """Kernels of one storage may split the row counts between them (here the two that read the plain int8 matrix):
    the layer dispatches by rows, and both give the same numbers up to summation order."""
    plan = kernels.Plan("plain", ("int8pack", "int8pack", "dequant", "dequant"))
    assert plan.describe() == "int8pack (1-63 rows), dequant (64+ rows)"
    assert kernels.Plan.single("fbgemm").describe() == "fbgemm"
    monkeypatch.setattr(kernels, "int8_plan", lambda n, k, head=False: plan)
    layer = Int8Linear(make_linear())
    ran = []
    for name in ("int8pack", "dequant"):
        run = kernels.KERNELS[name].run
        monkeypatch.setitem(kernels.KERNELS, name, kernels.Int8Kernel(name, "plain", lambda w, x, run=run, name=name: ran.append(name) or run(w, x)))
    x = torch.randn(100, 256)
    with torch.no_grad():
        many, few = layer(x), torch.cat([layer(x[i : i + 10]) for i in range(0, 100, 10)])
    assert ran == ["dequant"] + ["int8pack"] * 10
    torch.testing.assert_close(many, few, atol=1e-5, rtol=1e-5)


def test_int8_embedding_is_close_to_the_fp32_table():
    torch.manual_seed(0)
    table = nn.Embedding(500, 64)
    quantized = Int8Embedding(table)
    ids = torch.randint(0, 500, (3, 40))
    with torch.no_grad():
        assert relative_error(quantized(ids), table(ids)) < EMBEDDING_BOUND
    assert quantized(ids).dtype == torch.float32 and quantized.weight_int8.dtype == torch.int8


# --- the chooser and its cache --------------------------------------------------------------------------------


def fake_kernel(name: str, run, present=lambda: True) -> kernels.Int8Kernel:
    return kernels.Int8Kernel(name, "plain", run, present)


def zeros(w, x):
    return x.new_zeros(x.shape[0], w.packed.shape[0])


def _raise(w, x):
    raise RuntimeError("illegal instruction")


def fails_from_64_rows(w, x):
    if x.shape[0] >= 64:
        raise RuntimeError("unsupported shape")
    return kernels.KERNELS["dequant"].run(w, x)


@pytest.fixture
def fresh_chooser(monkeypatch, tmp_path):
    """A chooser with its own cache folder and no plans or availability checks from earlier tests."""
    monkeypatch.setenv("CODEGEN_LM_CACHE", str(tmp_path / "cache"))
    kernels.available_kernels.cache_clear()
    yield
    kernels.available_kernels.cache_clear()


def test_chooser_picks_a_working_kernel_when_candidates_are_missing_wrong_or_raise(monkeypatch, fresh_chooser):
    """Each fake kernel would be the fastest (it returns at once), so each must be ruled out for what it is: absent
    from this build, raising, wrong, or raising only for many rows (then kept only where it works)."""
    monkeypatch.setattr(kernels, "KERNELS", {
        "missing": fake_kernel("missing", zeros, present=lambda: False),
        "raises": fake_kernel("raises", _raise),
        "wrong": fake_kernel("wrong", zeros),
        "dequant": kernels.KERNELS["dequant"],
        "small_only": fake_kernel("small_only", fails_from_64_rows),
    })
    assert kernels.available_kernels() == ("dequant", "small_only")
    layer = Int8Linear(make_linear())
    assert set(layer.plan.kernels) <= {"dequant", "small_only"} and layer.plan.kernel(600).name == "dequant"
    linear = make_linear()
    with torch.no_grad():
        for rows in (1, 20, 100, 600):
            x = torch.randn(rows, 256)
            assert relative_error(layer(x), linear(x)) < LINEAR_BOUNDS["int8"]


def count_measurements(monkeypatch) -> list[tuple[int, int]]:
    calls = []
    real = kernels.measure

    def measure(n, k, head=False):
        calls.append((n, k))
        return real(n, k, head)
    monkeypatch.setattr(kernels, "measure", measure)
    return calls


def test_kernel_choices_are_cached_and_rebuilt_when_corrupt_or_foreign(monkeypatch, fresh_chooser):
    monkeypatch.setattr(kernels, "busy_cpus", lambda: 0.0)  # however busy this machine is (tested below)
    calls = count_measurements(monkeypatch)
    plan = kernels.int8_plan(96, 64)
    path = kernels.cache_file()
    assert calls == [(96, 64)] and path.parent == kernels.cache_root() / "kernels"
    entry = json.loads(path.read_text())["plans"][kernels.plan_key(96, 64)]
    assert entry["storage"] == plan.storage and entry["kernels"] == list(plan.kernels)

    def new_process() -> kernels.Plan:
        monkeypatch.setattr(kernels, "_PLANS", {})  # what a new process starts with
        return kernels.int8_plan(96, 64)

    assert new_process() == plan and len(calls) == 1  # read, not timed again
    # A cached plan is what runs, whatever it says (here one the timings would not pick).
    data = json.loads(path.read_text())
    data["plans"][kernels.plan_key(96, 64)] |= {"storage": "plain", "kernels": ["dequant"] * 4}
    path.write_text(json.dumps(data))
    assert new_process() == kernels.Plan.single("dequant") and len(calls) == 1

    # Timed while other processes kept the CPUs busy: kept while the machine stays busy, timed again once it is quiet.
    monkeypatch.setattr(kernels, "busy_cpus", lambda: 0.5)
    data["plans"][kernels.plan_key(96, 64)]["busy"] = 0.9
    path.write_text(json.dumps(data))
    assert new_process() == kernels.Plan.single("dequant") and len(calls) == 1
    monkeypatch.setattr(kernels, "busy_cpus", lambda: 0.1)
    new_process()
    assert len(calls) == 2 and json.loads(path.read_text())["plans"][kernels.plan_key(96, 64)]["busy"] == 0.1
    data["plans"][kernels.plan_key(96, 64)]["busy"] = 0.0  # what follows is timed again for other reasons

    foreign = {"another CPU": dict(data, cpu=f"x86_64 Intel(R) Xeon(R) Platinum 8480+ flags 0123456789ab; torch {torch.__version__}"),
               "another torch": dict(data, cpu=kernels.cpu_identity().replace(torch.__version__, "2.0.0")),
               "a kernel unknown here": {**data, "plans": {kernels.plan_key(96, 64): {**entry, "busy": 0.0, "kernels": ["amx"] * 4}}},
               "an old format": dict(data, format=0)}
    for what, content in [("not JSON", "{not json"), ("empty", ""), ("a list", "[]")] + [(k, json.dumps(v)) for k, v in foreign.items()]:
        path.write_text(content)
        before = len(calls)
        new_process()
        assert len(calls) == before + 1, what  # timed again
        assert json.loads(path.read_text())["cpu"] == kernels.cpu_identity(), what  # and rewritten, readable


def test_cache_folder_follows_xdg_and_an_unwritable_one_only_costs_time(monkeypatch, tmp_path, fresh_chooser, caplog):
    monkeypatch.delenv("CODEGEN_LM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernels.cache_file().parent == tmp_path / "xdg" / "codegen_lm" / "kernels"
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("CODEGEN_LM_CACHE", str(tmp_path / "file"))  # a file where the folder should be
    with caplog.at_level(logging.WARNING, logger="codegen_lm.kernels"):
        plan = kernels.int8_plan(48, 64)
    assert plan.kernels[0] in kernels.available_kernels() and "timed again next time" in caplog.text


def test_a_forced_kernel_runs_every_layer_and_a_wrong_one_is_refused(monkeypatch, fp32_model):
    monkeypatch.setenv(kernels.FORCE_ENV, "dequant")
    model = prepare_for_inference(copy.deepcopy(fp32_model), "int8")
    assert set(kernel_choices(model).values()) == {"dequant"}
    monkeypatch.setenv(kernels.FORCE_ENV, "int3mm")
    with pytest.raises(ValueError, match="CODEGEN_LM_INT8_KERNEL=int3mm is not an int8 kernel; use one of fbgemm, onednn"):
        prepare_for_inference(copy.deepcopy(fp32_model), "int8")
    monkeypatch.setattr(kernels, "available_kernels", lambda: ("int8pack", "dequant"))
    monkeypatch.setenv(kernels.FORCE_ENV, "fbgemm")
    with pytest.raises(ValueError, match="fbgemm: that kernel does not run on this machine; use one of int8pack, dequant"):
        prepare_for_inference(copy.deepcopy(fp32_model), "int8")


@pytest.fixture(scope="module")
def fp32_model():
    return build_model(n_embd=128, n_head=8, rotary_dim=8, n_layer=2, vocab_size=1000, n_positions=256)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_logits_within_bound_and_greedy_agreement(fp32_model, mode):
    quantized = prepare_for_inference(copy.deepcopy(fp32_model), mode)
    kinds = {type(m).__name__ for m in quantized.modules()}
    assert "Linear" not in kinds
    assert isinstance(quantized.lm_head, Int8Linear)  # int4 keeps the head in int8
    assert isinstance(quantized.transformer.wte, Int8Embedding)
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


def test_tied_embeddings_give_the_int8_head_and_embedding_one_table(tmp_path):
    """A tied head is made from the embedding table before the table itself turns int8 (load_model does it last)."""
    model = build_model(n_embd=128, n_head=8, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "tied")
    for quantized in (load_model(tmp_path / "tied", quantize="int8"), prepare_for_inference(copy.deepcopy(model), "int8")):
        assert isinstance(quantized.lm_head, Int8Linear) and isinstance(quantized.transformer.wte, Int8Embedding)
        ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert relative_error(quantized(ids).logits, model(ids).logits) < LOGIT_BOUNDS["int8"]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_without_x86_kernels_int8_and_int4_fall_back_and_stay_within_bounds(monkeypatch, fresh_chooser, fp32_model, mode, caplog):
    """What aarch64 gets, forced here: no fbgemm, no oneDNN int8, and PyTorch's packed int4 CPU kernel failing. The
    chooser picks among the weight-only kernels, int4 says once that it falls back, and both stay within bounds."""
    for name in ("fbgemm", "onednn"):
        monkeypatch.setitem(kernels.KERNELS, name, dataclasses.replace(kernels.KERNELS[name], present=lambda: False))
    monkeypatch.setattr("codegen_lm.quantize._int4pack_runs", lambda: "RuntimeError: no int4 kernel for this CPU")
    with caplog.at_level(logging.WARNING, logger="codegen_lm.quantize"):
        model = prepare_for_inference(copy.deepcopy(fp32_model), mode)
    choices = kernel_choices(model)
    assert {c.split()[0].rstrip(",") for c in choices.values()} <= {"int8pack", "dequant"}, choices
    if mode == "int4":
        assert {b for k, b in choices.items() if k.startswith("int4")} == {"dequant"}
        assert "packed int4 CPU kernel does not run here (RuntimeError: no int4 kernel for this CPU)" in caplog.text
    ids = torch.randint(0, 1000, (4, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(model(ids).logits, fp32_model(ids).logits) < LOGIT_BOUNDS[mode]
    assert len(Generator(model, None).complete([[1, 2, 3]], SamplingParams(max_new_tokens=4))[0][0].token_ids) == 4


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_complete_command_takes_quantize(tiny_checkpoint, mode):
    """``--quantize`` reaches the model: the command's kernels and tokens are those of ``load_model(quantize=...)``
    in this process (the two share the kernel cache and thread count); a flag that was dropped would run fp32."""
    from codegen_lm import AutoTokenizer

    model = load_model(tiny_checkpoint, quantize=mode, inference=True)
    expected = Generator(model, AutoTokenizer.from_pretrained(tiny_checkpoint)).complete(["def f():"], SamplingParams(max_new_tokens=24))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    result = subprocess.run(
        [sys.executable, "-m", "codegen_lm.cli", "complete", "def f():", "--model", str(tiny_checkpoint), "-n", "24",
         "--json", "--quantize", mode],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["kernels"] == kernel_choices(model) and not any(k.startswith("fp32") for k in output["kernels"])
    assert output["token_ids"] == expected[0][0].token_ids


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


@pytest.mark.parametrize("layout", list(kernels.FP32_LAYOUTS))
def test_onednn_weight_layouts_compute_what_f_linear_does_padded_or_not(layout):
    if layout not in kernels.fp32_layouts():
        pytest.skip(f"oneDNN's {layout} layout does not run here")
    linear = make_linear()
    x = torch.randn(70, 256)
    as_is = OneDNNLinear(linear, kernels.Fp32Plan(layout))
    padded = OneDNNLinear(linear, kernels.Fp32Plan(layout, min_rows=5))
    with torch.no_grad():
        for rows in (*range(1, 10), 64, 70):  # oneDNN picks other kernels for one, few and many rows
            torch.testing.assert_close(as_is(x[:rows]), linear(x[:rows]), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(padded(x[:rows]), linear(x[:rows]), atol=1e-5, rtol=1e-5)
            if rows >= 2:  # from two rows on, the rows beside a row change none of its bits: padding changes nothing
                assert torch.equal(padded(x[:rows]), as_is(x[:rows])) and torch.equal(as_is(x[:rows])[:2], as_is(x[:2]))
        y = padded(x[:1, None].expand(1, 3, 256))  # leading dimensions kept
    assert y.shape == (1, 3, 384)


def test_few_rows_run_padded_to_the_plans_fewest(monkeypatch):
    if not kernels.fp32_layouts():
        pytest.skip("oneDNN's fp32 matmul does not run here")
    run_rows = []
    real = kernels.fp32_gemm
    monkeypatch.setattr(kernels, "fp32_gemm", lambda x, w, b=None: run_rows.append(x.shape[0]) or real(x, w, b))
    layer = OneDNNLinear(make_linear(), kernels.Fp32Plan(kernels.fp32_layouts()[0], min_rows=5))
    with torch.no_grad():
        for rows in (1, 4, 5, 9):
            assert layer(torch.randn(rows, 256)).shape == (rows, 384)
    assert run_rows == [5, 5, 5, 9]


def test_fp32_plan_pads_few_rows_only_where_that_gains_and_picks_the_layout_that_loses_least():
    rows = kernels.FP32_ROWS
    big = [100.0, 800.0]
    # "a": fastest at one row, slow from two; "b": slower at one row, fast from three
    times = {"a": [10.0] + [20.0] * 7 + big, "b": [13.0, 12.0] + [11.0] * 6 + big}
    plan = kernels.choose_fp32(times, rows, several_rows=True)
    assert plan == kernels.Fp32Plan("b", min_rows=3) and plan.describe() == "b; 1-2 rows run as 3"
    # the smallest count within 5 % of the fastest; none when it gains under 5 % on one row
    times["b"][4] = 10.6
    assert kernels.choose_fp32(times, rows, several_rows=True).min_rows == 3
    times["b"][4] = 10.0
    assert kernels.choose_fp32(times, rows, several_rows=True).min_rows == 5
    assert kernels.choose_fp32({"a": [10.0] * 8 + big, "b": [10.4] + [10.0] * 7 + big}, rows) == kernels.Fp32Plan("a")
    assert kernels.choose_fp32({"b": [10.4] + [10.0] * 7 + big}, rows) == kernels.Fp32Plan("b")
    # an equal score goes to the layout listed first
    assert kernels.choose_fp32({"a": [5.0] * 10, "b": [5.0] * 10}, rows).layout == "a"
    # many rows count too: a layout fast at few rows but 3x slower at 64 and 512 loses
    assert kernels.choose_fp32({"a": [10.0] * 8 + big, "b": [9.0] * 8 + [300.0, 2400.0]}, rows, several_rows=True).layout == "a"
    # steps of one row (one sequence decoding plainly) keep the layout fastest at one row, within 5 %, whatever the
    # other rows say; steps of several rows (n samples, verify steps) let every layout compete
    times = {"a": [10.0] + [20.0] * 7 + big, "b": [12.0] * 8 + big}
    assert kernels.choose_fp32(times, rows) == kernels.Fp32Plan("a")
    assert kernels.choose_fp32(times, rows, several_rows=True) == kernels.Fp32Plan("b")
    # a one-row plan pads nothing: padding would let "b" run one row as 2 at 10.4, within 5 % of 10, but that figure is
    # the best of several row counts' timings, which noise flatters
    times["b"][1:8] = [10.4] * 7
    assert kernels.choose_fp32(times, rows) == kernels.Fp32Plan("a")
    assert kernels.choose_fp32(times, rows, several_rows=True) == kernels.Fp32Plan("b", min_rows=2)
    times["b"][0] = 10.4  # within 5 % at one row itself, and faster at every other count
    assert kernels.choose_fp32(times, rows) == kernels.Fp32Plan("b")
    # an LM head is timed and judged at the few-row counts only
    assert kernels.choose_fp32({"a": [10.0] * 8, "b": [9.0] * 8}, rows[:8]).layout == "b"
    assert kernels.Fp32Plan("x", 2).describe() == "x; 1 row run as 2" and kernels.Fp32Plan("x").describe() == "x"


def test_fp32_plans_are_measured_once_cached_forced_and_refused(monkeypatch, fresh_chooser):
    if not kernels.fp32_layouts():
        pytest.skip("oneDNN's fp32 matmul does not run here")
    monkeypatch.setattr(kernels, "busy_cpus", lambda: 0.0)
    calls = []
    real = kernels.measure_fp32
    monkeypatch.setattr(kernels, "measure_fp32", lambda n, k, head=False: calls.append((n, k, head)) or real(n, k, head))
    plan = kernels.fp32_plan(96, 64)
    assert calls == [(96, 64, False)] and plan.layout in kernels.fp32_layouts()
    assert 1 <= plan.min_rows <= kernels.FP32_FEW_ROWS
    path, key = kernels.cache_file(), kernels.plan_key(96, 64, precision="fp32")
    data = json.loads(path.read_text())
    assert data["plans"][key]["layout"] == plan.layout and data["plans"][key]["min_rows"] == plan.min_rows
    assert set(data["plans"][key]["microseconds"]) == set(kernels.fp32_layouts())
    # the plan for steps of several rows comes from the same timing: kept beside the one-row plan, not timed again
    several = kernels.fp32_plan(96, 64, several_rows=True)
    assert len(calls) == 1 and data["plans"][key]["several_rows"] == {"layout": several.layout, "min_rows": several.min_rows}

    def new_process() -> kernels.Fp32Plan:
        monkeypatch.setattr(kernels, "_PLANS", {})
        return kernels.fp32_plan(96, 64)

    assert new_process() == plan and len(calls) == 1  # read, not timed again
    data["plans"][key] |= {"layout": "row-major", "min_rows": 4, "several_rows": {"layout": "row-major", "min_rows": 5}}
    path.write_text(json.dumps(data))  # whatever the file says runs
    assert new_process() == kernels.Fp32Plan("row-major", 4) and len(calls) == 1
    assert kernels.fp32_plan(96, 64, several_rows=True) == kernels.Fp32Plan("row-major", 5) and len(calls) == 1
    for broken in ({"min_rows": 0}, {"min_rows": 9}, {"min_rows": "4"}, {"layout": "blocked-64"}, {"rows": [1, 8]},
                   {"several_rows": {"layout": "row-major", "min_rows": 0}}, {"several_rows": None}):
        path.write_text(json.dumps({**data, "plans": {key: {**data["plans"][key], **broken}}}))
        before = len(calls)
        new_process()
        assert len(calls) == before + 1, broken  # timed again
    kernels.fp32_plan(96, 64, head=True)
    assert calls[-1] == (96, 64, True)  # the head is its own plan

    monkeypatch.setenv(kernels.FP32_FORCE_ENV, kernels.fp32_layouts()[-1])
    assert new_process() == kernels.Fp32Plan(kernels.fp32_layouts()[-1])  # forced: that layout, unpadded
    monkeypatch.setenv(kernels.FP32_FORCE_ENV, "blocked-3")
    with pytest.raises(ValueError, match="CODEGEN_LM_FP32_LAYOUT=blocked-3 is not an fp32 layout; use one of blocked-1"):
        new_process()
    monkeypatch.setattr(kernels, "fp32_layouts", lambda: ("row-major",))
    monkeypatch.setenv(kernels.FP32_FORCE_ENV, "blocked-8")
    with pytest.raises(ValueError, match="blocked-8 does not run on this machine; use one of row-major, or unset it"):
        new_process()


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


def int8_bytes(model: nn.Module) -> int:
    """What a model's tensors take once quantized: matrices (the linear layers and the embedding) one byte per
    weight plus an fp32 scale per row, vectors (biases, norms) in fp32."""
    return sum(t.numel() + 4 * t.shape[0] if t.dim() == 2 else 4 * t.numel() for t in model.state_dict().values())


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from Linux's /proc")
@pytest.mark.parametrize("mode", ["", "int8"])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_loading_for_inference_peaks_near_the_final_size(tmp_path, mode, safe):
    """Converting block by block while reading: a safetensors load adds little beyond the fp32 weights at its
    peak (measured 1.07× for fp32; converting after a plain load held the fp32 model and its converted copy at
    once: 2.2×). A .bin file is one mapping, read whole by the end of the load; afterwards no tensor may still view
    it, or every page of it would stay resident beside the converted weights. int8 keeps one copy of each weight, the
    embedding included: what stays resident is the int8 size (measured 1.0-1.03× of it; two packings of each matrix
    and an fp32 embedding were 2.85×), and a safetensors load peaks at 0.51-0.61× the fp32 weights (before: 0.85×)."""
    # Embeddings and head of 16 MB each: read in slices (checkpoint._COPY_SLICE_BYTES).
    model = build_model(n_embd=512, n_head=8, n_layer=8, vocab_size=8192)
    model.save_pretrained(tmp_path / "m", safe_serialization=safe)
    build_model().save_pretrained(tmp_path / "tiny")
    weights = sum(f.stat().st_size for f in (tmp_path / "m").glob("*model*"))  # 135 MB
    # One kernel and one fp32 layout forced, so that no timing of kernels (a first load's) counts: every storage
    # holds one copy.
    env = dict(os.environ, **{kernels.FORCE_ENV: kernels.available_kernels()[0]},
               **{kernels.FP32_FORCE_ENV: layouts[0] for layouts in [kernels.fp32_layouts()] if layouts})
    command = [sys.executable, "-c", LOAD_MEMORY, str(tmp_path / "m"), str(tmp_path / "tiny"), mode]
    peak, resident = map(int, subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout.split())
    print(f"{mode or 'fp32'}: load peak +{peak / 1e6:.0f} MB, resident +{resident / 1e6:.0f} MB, weights {weights / 1e6:.0f} MB"
          f" ({int8_bytes(model) / 1e6:.0f} MB in int8)")
    if mode == "int8":
        assert resident < 1.15 * int8_bytes(model)
        if safe:
            assert peak < 0.7 * weights
    else:
        assert resident < 1.2 * weights
        if safe:
            assert peak < 1.3 * weights


def test_importing_codegen_lm_first_asks_torch_for_huge_pages():
    code = "import os, codegen_lm; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.strip() == "1"
    env["THP_MEM_ALLOC_ENABLE"] = "0"  # a user's own setting wins
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.strip() == "0"
