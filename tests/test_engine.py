"""The inference engine's fast paths against the reference path: the preallocated cache, in-place rotary,
mask-free aligned attention, sort-free sampling, incremental detokenization and the scheduler."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
import transformers
from conftest import build_model

from codegen_lm import AutoTokenizer
from codegen_lm.engine import GenerationError, Generator, SamplingParams, Scheduler, TextStream
from codegen_lm.engine.sampling import draw_uniforms, nucleus_floor, sample
from faults import POISON, poisoned
from codegen_lm.model import KVCache, apply_rotary, rotate_
from codegen_lm.kernels import Fp32Plan, fp32_layouts
from codegen_lm.quantize import OneDNNLinear, prepare_for_inference


@pytest.fixture(scope="module")
def model():
    return build_model(vocab_size=1000, n_positions=256)


def plain_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """The reference: full recomputation with the plain forward, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


# --- model fast path --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_rotary_equals_reference(dtype):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 5, 3, 4, 16, generator=g).to(dtype)
    angles = torch.rand(2, 5, 4, generator=g) * 10
    sin, cos = angles.sin(), angles.cos()
    expected = [apply_rotary(qkv[:, :, i], sin[:, :, None], cos[:, :, None]) for i in range(2)]
    rotate_(qkv[:, :, :2], torch.stack([cos, sin], dim=-1)[:, :, None, None])
    for i in range(2):
        torch.testing.assert_close(qkv[:, :, i], expected[i], atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)


def test_in_place_rotary_with_odd_strides_takes_the_copy_path():
    x = torch.randn(1, 3, 2, 7)  # head size 7: pairs start at odd offsets in memory
    angles = torch.rand(1, 3, 2)
    expected = apply_rotary(x, angles.sin()[:, :, None], angles.cos()[:, :, None])
    rotate_(x, torch.stack([angles.cos(), angles.sin()], dim=-1)[:, :, None])
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)


def test_ragged_batch_through_the_cache_equals_the_plain_forward(model):
    """Rows of different lengths in rows 2..4 of a larger cache: prefill with right padding (masked), then decode
    steps where the rows sit at different positions; every real token's logits equal the plain forward's."""
    g = torch.Generator().manual_seed(3)
    lengths = [7, 12, 4]
    seqs = [torch.randint(0, 1000, (n + 3,), generator=g) for n in lengths]
    cache = KVCache(model.config, 5, 40, torch.float32, "cpu")
    rows = slice(2, 5)
    width = max(lengths)
    ids = torch.stack([torch.cat([s[:n], torch.zeros(width - n, dtype=torch.long)]) for s, n in zip(seqs, lengths)])
    with torch.no_grad():
        first = model.logits_cached(ids, torch.arange(width).expand(3, width), cache, rows, width, torch.tensor(lengths) - 1)
        steps = [first]
        for step in range(3):
            positions = torch.tensor([[n + step] for n in lengths])
            tokens = torch.stack([s[n + step : n + step + 1] for s, n in zip(seqs, lengths)])
            steps.append(model.logits_cached(tokens, positions, cache, rows, int(positions.max()) + 1))
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            full = model(s[None]).logits[0]
            for step, logits in enumerate(steps):
                torch.testing.assert_close(logits[i], full[n - 1 + step], atol=1e-5, rtol=1e-5)


def test_aligned_path_equals_masked_path(model):
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(4))
    results = []
    for aligned in (False, True):
        cache = KVCache(model.config, 2, 16, torch.float32, "cpu")
        with torch.no_grad():
            logits = [model.logits_cached(ids[:, :6], torch.arange(6).expand(2, 6), cache, slice(0, 2), 6, aligned=aligned)]
            for t in range(6, 9):
                positions = torch.full((2, 1), t)
                logits.append(model.logits_cached(ids[:, t : t + 1], positions, cache, slice(0, 2), t + 1, aligned=aligned))
        results.append(torch.stack(logits))
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=0)


def test_cache_zeroes_unwritten_slots_before_reads_and_copies_what_rows_hold():
    config = build_model().config
    cache = KVCache(config, 4, 128, torch.float32, "cpu")
    cache.k.fill_(float("nan"))  # what the memory may hold: the cache is allocated empty
    cache.v.fill_(float("nan"))
    ones = torch.ones(config.n_layer, 5, config.n_head, config.head_dim)
    cache.put(1, ones, ones)
    cache.copy_rows(1, slice(2, 4), 3)
    assert cache.k[:, 2:4, :, :3].eq(1).all() and cache.clean == [0, 5, 3, 3]
    cache.ready(0, 4, 6)  # a step reading 6 slots of every row
    assert not cache.k[..., :6, :].isnan().any() and not cache.v[..., :6, :].isnan().any()
    assert cache.k[:, 1, :, :5].eq(1).all() and cache.k[:, 2:4, :, 3:6].eq(0).all() and cache.k[:, 0, :, :6].eq(0).all()
    assert cache.clean == [KVCache.ZERO_AHEAD] * 4 and cache.k[..., 64:, :].isnan().all()  # zeroed a little ahead only
    cache.k[:, 3, :, :2] = float("nan")  # a failed sequence's keys
    cache.forget(3)
    cache.ready(3, 1, 2)
    assert cache.k[:, 3, :, :2].eq(0).all()
    cache.holds[2] = [7, 8, 9]
    grown = cache.resized(6, 128)
    assert grown.clean == cache.clean + [0, 0] and grown.holds == {2: [7, 8, 9]}
    assert torch.equal(grown.k[:, :4, :, :2], cache.k[..., :2, :])
    keys, _ = grown.read(0, 1, 2, 6)
    assert keys.shape == (2, config.n_head, 6, config.head_dim)
    # put, span, write and read agree on which slot and head each value is: [n_layer, n, n_head, head_dim] in and out
    distinct = torch.arange(config.n_layer * 5 * config.n_head * config.head_dim, dtype=torch.float32)
    distinct = distinct.view(config.n_layer, 5, config.n_head, config.head_dim)
    cache.put(0, distinct, -distinct)
    assert torch.equal(cache.span(0, 0, 5)[0], distinct) and torch.equal(cache.read(1, 0, 1, 5)[1][0], -distinct[1].transpose(0, 1))
    cache.write(1, (torch.tensor([2, 0]), torch.tensor([7, 5])), distinct[1, :2], distinct[1, 2:4])
    assert torch.equal(cache.span(2, 7, 8)[0][1, 0], distinct[1, 0]) and torch.equal(cache.span(0, 5, 6)[1][1, 0], distinct[1, 3])


# --- greedy: engine vs plain loop vs transformers -----------------------------------------------------------


@pytest.mark.parametrize("shape", [dict(rotary_dim=8), dict(rotary_dim=16, n_layer=3), dict(n_head=8, rotary_dim=4)])
def test_greedy_ids_equal_plain_loop_and_transformers(shape, tmp_path):
    ours = build_model(vocab_size=1000, n_positions=128, **shape)
    ours.save_pretrained(tmp_path)
    theirs = transformers.CodeGenForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = list(range(30, 47))
    got = Generator(ours, None).complete([prompt], SamplingParams(max_new_tokens=20, ignore_eos=True))[0][0].token_ids
    assert len(set(got)) > 3  # the comparison is not between outputs collapsed into one repeated token
    assert got == plain_greedy(ours, prompt, 20)
    hf = theirs.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20, pad_token_id=0)
    assert got == hf[0, len(prompt):].tolist()


def test_batched_prompts_of_different_lengths_equal_each_alone(model):
    prompts = [list(range(5, 5 + n)) for n in (3, 11, 6)]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    together = Generator(model, None).complete(prompts, params)
    for prompt, result in zip(prompts, together):
        assert len(set(result[0].token_ids)) > 3  # not collapsed into one repeated token
        assert result[0].token_ids == plain_greedy(model, prompt, 8)


# --- sampling -----------------------------------------------------------------------------------------------


def nucleus_by_sorting(probs: torch.Tensor, top_p: float) -> set[int]:
    """The definition: tokens whose strictly more probable tokens hold less than top_p of the mass."""
    return {i for i, p in enumerate(probs.tolist()) if probs[probs > p].sum() < top_p}


@pytest.mark.parametrize("temperature", [0.05, 1.0, 50.0])  # peaked (top candidates settle it) to flat (bisection)
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.999])
def test_nucleus_floor_matches_the_sorted_definition(temperature, top_p):
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(int(top_p * 100)))
    logits[2, :50] = logits[2, 0]  # a tie group
    probs = (logits / temperature).softmax(-1)
    floors = nucleus_floor(probs, torch.full((3,), top_p), candidates=16)
    for row in range(3):
        kept = set((probs[row] >= floors[row]).nonzero().squeeze(1).tolist())
        assert kept == nucleus_by_sorting(probs[row], top_p)


def test_sampling_frequencies_follow_the_truncated_distribution():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    params = [SamplingParams(temperature=1.0, top_p=0.8)]  # keeps 0.5, 0.2, 0.15 (0.7 before the third < 0.8)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.cat([sample(logits[None].clone(), params, draw_uniforms(params, [g])) for _ in range(4000)]), minlength=5)
    expected = torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85
    assert counts[3:].sum() == 0
    torch.testing.assert_close(counts.float() / 4000, expected, atol=0.03, rtol=0)
    top_k = [SamplingParams(temperature=1.0, top_k=2)]
    picks = torch.cat([sample(logits[None].clone(), top_k, draw_uniforms(top_k, [g])) for _ in range(500)])
    assert set(picks.tolist()) == {0, 1}


def test_mixed_batch_rows_sample_as_alone():
    logits = torch.randn(4, 200, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(), SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.3, top_k=5),
              SamplingParams(temperature=1.0, top_k=50, top_p=0.3)]
    batched = sample(logits.clone(), params, draw_uniforms(params, [torch.Generator().manual_seed(i) for i in range(4)]))
    alone = [int(sample(logits[i : i + 1].clone(), [params[i]], draw_uniforms([params[i]], [torch.Generator().manual_seed(i)])))
             for i in range(4)]
    assert batched.tolist() == alone
    assert batched[0] == logits[0].argmax()


def test_n_samples_with_shared_prefill_equal_each_alone(model):
    generator = Generator(model, None, max_batch=3)  # 5 samples through 3 rows: later ones copy the kept prefix
    prompt = list(range(200, 230))
    for params in (dict(temperature=2.0, top_p=0.95), dict(temperature=0.6, top_k=7)):  # flat nucleus; top-k
        together = generator.complete([prompt], SamplingParams(n=5, seed=40, max_new_tokens=6, **params))[0]
        for j, sample_j in enumerate(together):
            alone = generator.complete([prompt], SamplingParams(n=1, seed=40 + j, max_new_tokens=6, **params))[0][0]
            assert sample_j.token_ids == alone.token_ids, (params, j)
        assert len({tuple(c.token_ids) for c in together}) > 1


def run_mixed_requests_joining_leaving_and_aborted(model, max_batch: int = 3, compile: bool = False):
    requests = {
        "greedy": (list(range(1, 9)), SamplingParams(max_new_tokens=6, ignore_eos=True)),
        "hot": (list(range(50, 70)), SamplingParams(max_new_tokens=11, temperature=1.1, top_p=0.9, seed=3, ignore_eos=True)),
        "pair": (list(range(9, 12)), SamplingParams(max_new_tokens=4, temperature=0.8, n=2, seed=8, ignore_eos=True)),
        "topk": (list(range(300, 340)), SamplingParams(max_new_tokens=7, temperature=0.5, top_k=3, seed=1, ignore_eos=True)),
    }

    def alone(name: str) -> dict[int, list[int]]:
        scheduler = Scheduler(model, None, max_batch=2)
        scheduler.add_request(*requests[name], request_id=name)
        out: dict[int, list[int]] = {}
        while scheduler.has_unfinished():
            for o in scheduler.step():
                out.setdefault(o.index, []).extend(o.token_ids)
        return out

    scheduler = Scheduler(model, None, max_batch=max_batch, compile=compile)
    scheduler.add_request(list(range(100, 125)), SamplingParams(max_new_tokens=50, ignore_eos=True), "doomed")
    got: dict[str, dict[int, list[int]]] = {}
    joining = list(requests)
    step = 0
    while joining or scheduler.has_unfinished():
        if joining and step % 2 == 0:
            name = joining.pop(0)
            scheduler.add_request(*requests[name], request_id=name)
        if step == 3:
            scheduler.abort("doomed")  # leaves mid-flight; the rows behind it move into its place
        for o in scheduler.step():
            got.setdefault(o.request_id, {}).setdefault(o.index, []).extend(o.token_ids)
        step += 1
    assert len(got["doomed"][0]) == 3  # one token per step: the first from its prompt, then two decoded
    for name in requests:
        assert got[name] == alone(name), name


def test_scheduler_mixed_requests_joining_leaving_and_aborted_get_what_they_get_alone(model):
    run_mixed_requests_joining_leaving_and_aborted(model)


# --- the compiled decode step ---------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_compiles(model):
    """dynamo's caches empty before; after, the model's compiled step and idle caches gone (tests share models)."""
    torch._dynamo.reset()
    try:
        yield
    finally:
        model.__dict__.pop("_idle_caches", None)
        model.__dict__.pop("_compiled_decode_step", None)
        torch._dynamo.reset()


@pytest.mark.parametrize("static", [True, False], ids=["static-shapes", "live-shapes"])
def test_compiled_decode_steps_give_each_request_what_it_gets_alone(model, monkeypatch, static):
    """The compiled path under the same joins, leaves and abort, with the static shapes of CUDA graphs (rows padded
    to a power of two, keys over the whole cache) and with the CPU's live shapes; dynamo traces the step
    (fullgraph), its eager backend runs it, so this is fast."""
    real_compile, shapes = torch.compile, set()

    def compile_eagerly(fn, mode=None, options=None, **kwargs):  # the backend takes neither mode nor options
        step = real_compile(fn, **kwargs, backend="eager")

        def recorded(tokens, positions, cache, rows, kv_len, **flags):
            shapes.add((tokens.shape[0], kv_len == cache.max_len))
            return step(tokens, positions, cache, rows, kv_len, **flags)
        return recorded

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    monkeypatch.setattr("codegen_lm.engine.scheduler.static_decode_shapes", lambda device: static)
    with fresh_compiles(model):
        run_mixed_requests_joining_leaving_and_aborted(model, max_batch=4, compile=True)
        rows = {r for r, _ in shapes}
        if static:  # rows padded to a power of two, keys over all slots
            assert all(r & (r - 1) == 0 for r in rows) and all(whole for _, whole in shapes)
        else:  # the running rows as they are, keys up to the longest row
            assert not any(whole for _, whole in shapes) and len(rows) > 1
        # A finished scheduler leaves its cache to the next one: graphs are bound to the cache's address.
        (cache,) = model.__dict__["_idle_caches"]
        generator = Generator(model, None, max_batch=4, compile=True)
        assert len(generator.complete([[1, 2, 3]], SamplingParams(max_new_tokens=3))[0][0].token_ids) == 3
        assert model.__dict__["_idle_caches"] == [cache]


@pytest.mark.slow
@pytest.mark.parametrize("plan", [Fp32Plan("row-major"), Fp32Plan("blocked-8", min_rows=5)],
                         ids=["row-major", "blocked-padded"])
def test_compiled_decode_equals_eager_decode(monkeypatch, plan):
    """inductor's compiled step (frozen, C++ wrapper, oneDNN fp32 weights in either layout, few rows padded) against the eager
    engine: same greedy tokens, logits within float rounding; and the step writes its keys into the cache in place,
    without copying a layer of the cache (which a write through a view of the cache cost: one full-layer copy
    kernel per layer and step)."""
    from torch._inductor.utils import run_and_get_code

    if plan.layout not in fp32_layouts():
        pytest.skip(f"oneDNN's {plan.layout} layout does not run here")
    monkeypatch.setattr("codegen_lm.kernels.fp32_plan", lambda n, k, head=False, several_rows=False: plan)
    model = prepare_for_inference(build_model(seed=5))
    assert {m.plan for m in model.modules() if isinstance(m, OneDNNLinear)} == {plan}
    prompts = [list(range(3, 13)), list(range(40, 50))]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=True)
    with fresh_compiles(model):
        compiled, sources = run_and_get_code(lambda: Generator(model, None, compile=True).complete(prompts, params))
        (cache,) = model.__dict__["_idle_caches"]
        layer_numel = cache.k[0].numel()
        assert sources and not any(re.search(rf"<static_cast<int64_t>\({layer_numel}L\)", s) for s in sources)
    eager = Generator(model, None).complete(prompts, params)
    for c, e in zip(compiled, eager):
        assert len(set(e[0].token_ids)) > 3  # not outputs collapsed into one repeated token
        assert c[0].token_ids == e[0].token_ids
        torch.testing.assert_close(c[0].logprobs, e[0].logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_int8_decode_agrees_with_eager_int8():
    """int8 through the compiled step (fbgemm's GEMM behind a custom op, the small ops around it fused by inductor)
    against eager int8, each step from identical caches: the same computation up to float rounding, except where
    that rounding moves an activation across a quantization boundary, which stays within int8's own error bound."""
    import copy

    from codegen_lm.engine.compiled import compiled_decode_step

    model = prepare_for_inference(build_model(seed=7, n_embd=128, n_head=8), "int8")
    cache = KVCache(model.config, 1, 32, torch.float32, "cpu")
    errors = []
    with fresh_compiles(model):
        step = compiled_decode_step(model)
        with torch.inference_mode():
            model.logits_cached(torch.tensor([list(range(3, 15))]), torch.arange(12)[None], cache, slice(0, 1), 12, aligned=True)
            for position in range(12, 20):
                token, where = torch.tensor([[position * 7]]), torch.tensor([[position]])
                shadow = copy.deepcopy(cache)
                eager = model.logits_cached(token, where, shadow, slice(0, 1), position + 1, aligned=True)
                compiled = step(token, where, cache, slice(0, 1), position + 1, aligned=True)
                errors.append(float((compiled - eager).abs().max() / eager.abs().max()))
    print("compiled vs eager int8, relative logit error per step:", [f"{e:.1e}" for e in errors])
    assert max(errors) < 0.04 and sorted(errors)[len(errors) // 2] < 1e-5


@pytest.mark.slow
def test_warm_up_compiles_every_graph_that_later_batches_need(monkeypatch):
    """After ``Generator.warm_up`` the compiled CPU step takes requests joining, leaving and aborted, more rows, one
    row of a larger cache and a longer cache without compiling again (each compile stalls every running request),
    and still gives each request what it gets alone."""
    from torch._dynamo.utils import counters

    if fp32_layouts():  # few rows padded: the padding must not tie the graphs to a row count
        monkeypatch.setattr("codegen_lm.kernels.fp32_plan", lambda n, k, head=False, several_rows=False: Fp32Plan(fp32_layouts()[0], min_rows=5))
    model = prepare_for_inference(build_model(seed=5))
    with fresh_compiles(model):
        assert Generator(model, None, max_batch=4, compile=True).warm_up() >= 3
        compiled_before = counters["stats"]["unique_graphs"]
        run_mixed_requests_joining_leaving_and_aborted(model, max_batch=4, compile=True)
        long_prompt, params = list(range(60)), SamplingParams(max_new_tokens=30, ignore_eos=True)
        alone_in_larger_cache = Generator(model, None, max_batch=4, compile=True).complete([long_prompt], params)
        assert counters["stats"]["unique_graphs"] == compiled_before
        assert alone_in_larger_cache == Generator(model, None).complete([long_prompt], params)


def test_compile_refuses_int4_weights_packed_for_the_cpu():
    model = prepare_for_inference(build_model(n_embd=128, n_head=8), "int4")
    with pytest.raises(ValueError, match="compile needs weights that torch.compile can trace.*Linear"):
        Generator(model, None, compile=True)


def test_cpu_cache_spans_every_row_but_a_request_touches_only_its_own(monkeypatch):
    """On CPU the first cache has every row and position, so it never grows (a copy of all it holds) in the middle
    of a request; its pages take memory only once written, and a batch-1 request writes and zeroes only the first
    slots of its row. Where the whole cache would take more than half the memory, it holds what the batch needs."""
    import psutil

    model = build_model(n_layer=4, n_embd=256, n_head=8, n_positions=2048)  # a whole cache of 16 rows: 256 MiB
    resident = psutil.Process().memory_info().rss
    scheduler = Scheduler(model, None, max_batch=16)
    scheduler.add_request([1, 2, 3], SamplingParams(max_new_tokens=5))
    scheduler.step()
    cache = scheduler.cache
    assert (cache.batch_size, cache.max_len) == (16, 2048)
    assert cache.clean == [KVCache.ZERO_AHEAD] + [0] * 15
    whole = cache.k.nbytes + cache.v.nbytes
    # Eight rows of 64 slots are 4 MiB; on 2 MB pages (torch's THP allocations) each layer's touched row would take
    # 2 MB: 128 MiB. The cache asks for small pages.
    scheduler.add_request([1, 2, 3], SamplingParams(max_new_tokens=5, n=8, temperature=1.0, seed=0))
    while scheduler.has_unfinished():
        scheduler.step()
    assert whole == 256 * 2**20 and psutil.Process().memory_info().rss - resident < 32 * 2**20
    monkeypatch.setattr("codegen_lm.engine.scheduler.device_memory", lambda device: whole)
    model.__dict__.pop("_idle_caches")  # (the finished scheduler left its cache for the next)
    scheduler = Scheduler(model, None, max_batch=16)
    scheduler.add_request([1, 2, 3], SamplingParams(max_new_tokens=5))
    scheduler.step()
    assert scheduler.cache.batch_size == 1 and scheduler.cache.max_len == 8


# --- requests that must fail before any work --------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], {}, "prompt is empty"),
        ([1] * 250, dict(max_new_tokens=10), "exceeds the model's 256 positions"),
        ([1, 2], dict(n=0), "n must be at least 1"),
        ([1, 2], dict(temperature=-0.5), "temperature must be a finite number >= 0"),
        ([1, 2], dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
        ([1, 2], dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        ([1, 2], dict(top_p=float("nan")), r"top_p must be in \(0, 1\]"),
        ([1, 2], dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        ([1, 2], dict(top_p=1.01), r"top_p must be in \(0, 1\]"),
        ([1, 2], dict(top_k=-1), "top_k must be >= 0"),
    ],
)
def test_bad_requests_raise_before_any_work(model, prompt, params, message):
    scheduler = Scheduler(model, None)
    with pytest.raises(ValueError, match=message):
        scheduler.add_request(prompt, SamplingParams(**params))
    assert not scheduler.has_unfinished() and scheduler.cache is None


# --- streaming ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


TEXTS = ["print('héllo wörld') # 你好，世界 🙂🚀 done", "x = '🐍' * 3\n\tdef f():\n        return '日本語'"]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_never_splits_a_character_and_adds_up(tokenizer, text):
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.encode()) // 4  # multi-byte characters span several tokens
    stream = TextStream(tokenizer, [])
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text == stream.text


@pytest.mark.parametrize("stop", ["世界", "🚀 d", "\n\tdef", "return"])
def test_stream_cuts_before_stop_strings_spanning_tokens(tokenizer, stop):
    text = next(t for t in TEXTS if stop in t)
    stream = TextStream(tokenizer, [stop])
    pieces = []
    for i in tokenizer.encode(text):
        pieces.append(stream.add(i))
        if stream.stopped:
            break
    assert stream.stopped
    assert "".join(pieces) + stream.flush() == text[: text.index(stop)] == stream.text


def test_stream_flushes_an_incomplete_character_at_the_end_like_decode(tokenizer):
    ids = tokenizer.encode("🙂")[:-1]  # the emoji's bytes cut short
    stream = TextStream(tokenizer, [])
    assert "".join(stream.add(i) for i in ids) == ""
    assert stream.flush() == tokenizer.decode(ids)


def test_generator_stream_pieces_join_to_the_completion(tiny_checkpoint, tokenizer):
    model = build_model(vocab_size=51200, n_positions=256, seed=2)
    generator = Generator(model, tokenizer)
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=5)
    pieces = list(generator.stream("s = '你好", params))
    completion = generator.complete(["s = '你好"], params)[0][0]
    assert "".join(pieces) == completion.text == tokenizer.decode(completion.token_ids)
    assert all("\ufffd" not in p for p in pieces[:-1])


# --- extreme settings, and one request's failure ---------------------------------------------------------


@pytest.mark.parametrize("temperature,top_p", [(1e-40, 1.0), (2e-38, 1.0), (9e-6, 1.0), (0.8, 5e-324), (0.8, 1e-46),
                                               (1.5, 1e-12), (2e-38, 7e-46)])
def test_temperatures_and_top_p_that_underflow_pick_the_top_token(temperature, top_p):
    """What the server's fuzzer found: in fp32 these underflowed (a padding row or index -1 was picked). Below 1e-5 a
    temperature is greedy; a top_p below the top token's probability keeps that token alone."""
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0))
    logits[:, 900:] = float("-inf")  # padding rows, as the scheduler masks them
    params = [SamplingParams(temperature=temperature, top_p=top_p, seed=i) for i in range(6)]
    draws = draw_uniforms(params, [torch.Generator().manual_seed(i) for i in range(6)])
    assert sample(logits.clone(), params, draws).tolist() == logits.argmax(-1).tolist()


def test_a_draw_at_the_top_of_the_range_stays_in_the_nucleus():
    logits = torch.randn(256, 1000, generator=torch.Generator().manual_seed(1)) * 3
    logits[:, 900:] = float("-inf")
    params = [SamplingParams(temperature=1.0, top_p=p) for p in torch.linspace(0.05, 1.0, 256).tolist()]
    picked = sample(logits.clone(), params, torch.full((256,), 1 - 2**-24))  # the largest fp32 draw below 1
    probs = logits.softmax(-1)
    floors = nucleus_floor(probs, torch.tensor([p.top_p for p in params]))
    assert (probs.gather(1, picked[:, None]).squeeze(1) >= floors).all() and (picked < 900).all()


FAILING_POSITION = 43  # a row decoding this position gets NaN logits (only the 40-token prompt reaches it)


@pytest.fixture
def failing_model(model, monkeypatch):
    monkeypatch.setattr(model, "logits_packed", poisoned(model.logits_packed, FAILING_POSITION))
    return model


def collect(scheduler: Scheduler) -> dict[str, dict[int, list[int]] | str]:
    got: dict = {}
    while scheduler.has_unfinished():
        for o in scheduler.step():
            if o.error is not None:
                got[o.request_id] = o.error
            elif not isinstance(got.get(o.request_id, {}), str):
                got.setdefault(o.request_id, {}).setdefault(o.index, []).extend(o.token_ids)
    return got


HEALTHY = {"greedy": (list(range(1, 9)), SamplingParams(max_new_tokens=12, ignore_eos=True)),
           "sampled": (list(range(20, 30)), SamplingParams(max_new_tokens=10, temperature=0.9, top_k=5, seed=1, n=2,
                                                           ignore_eos=True))}


def test_a_request_with_nan_logits_fails_alone(model, failing_model):
    alone = {}
    for name, request in HEALTHY.items():
        scheduler = Scheduler(model, None)
        scheduler.add_request(*request, request_id=name)
        alone[name] = collect(scheduler)[name]
    scheduler = Scheduler(failing_model, None, max_batch=4)
    scheduler.add_request([5, 6, POISON, 7], SamplingParams(max_new_tokens=10, n=2), "poisoned")  # at its prefill
    scheduler.add_request(list(range(200, 240)), SamplingParams(max_new_tokens=20, ignore_eos=True), "late")  # mid-way
    for name, request in HEALTHY.items():
        scheduler.add_request(*request, request_id=name)
    got = collect(scheduler)
    assert got["poisoned"] == got["late"] == "the model's logits hold NaN or inf"
    assert {name: got[name] for name in HEALTHY} == alone  # the samples waiting for a row went too: n=2 > max_batch
    assert not scheduler.requests and not scheduler.has_unfinished()
    scheduler.add_request(*HEALTHY["greedy"], request_id="after")  # the scheduler goes on
    assert collect(scheduler)["after"] == alone["greedy"]
    with pytest.raises(GenerationError, match="generating for prompt 1 failed: the model's logits hold NaN"):
        Generator(failing_model, None).complete([[1, 2, 3], [4, POISON]], SamplingParams(max_new_tokens=3))


def test_a_request_whose_sampling_raises_fails_alone(model, monkeypatch):
    import codegen_lm.engine.scheduler as engine

    def alone(name):
        scheduler = Scheduler(model, None)
        scheduler.add_request(*HEALTHY[name], request_id=name)
        return collect(scheduler)[name]

    expected = {name: alone(name) for name in HEALTHY}
    clean = engine.sample

    def sample(logits, params, draws):  # top_k 7 marks the request whose sampling breaks
        if any(p.top_k == 7 for p in params):
            raise IndexError("index -1 is out of bounds")
        return clean(logits, params, draws)

    monkeypatch.setattr(engine, "sample", sample)
    scheduler = Scheduler(model, None)
    scheduler.add_request([3, 4], SamplingParams(max_new_tokens=5, temperature=1.0, top_k=7), "broken")
    for name, request in HEALTHY.items():
        scheduler.add_request(*request, request_id=name)
    got = collect(scheduler)
    assert got["broken"] == "sampling failed (IndexError: index -1 is out of bounds)"
    assert {name: got[name] for name in HEALTHY} == expected


def test_a_request_whose_text_fails_fails_alone(tiny_checkpoint, tokenizer, monkeypatch):
    generator = Generator.from_pretrained(str(tiny_checkpoint))
    prompts = {"greedy": "def f(x):\n", "sampled": "import os\n"}
    params = {"greedy": SamplingParams(max_new_tokens=15), "sampled": SamplingParams(max_new_tokens=15, temperature=0.8,
                                                                                       top_k=5, seed=2)}
    expected = {name: generator.complete([prompts[name]], params[name])[0][0].token_ids for name in prompts}
    clean = TextStream.add

    def add(self, token_id):
        if "@@" in self.stop and len(self.ids) >= 4:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return clean(self, token_id)

    monkeypatch.setattr(TextStream, "add", add)
    scheduler = generator.scheduler()
    scheduler.add_request("x = 1\n", SamplingParams(max_new_tokens=15, stop=["@@"]), "broken")
    for name in prompts:
        scheduler.add_request(prompts[name], params[name], name)
    got = collect(scheduler)
    assert got["broken"].startswith("processing its text failed (UnicodeDecodeError")
    assert {name: got[name][0] for name in prompts} == expected
    with pytest.raises(GenerationError, match="generation failed: processing its text failed"):
        list(generator.stream("x = 1\n", SamplingParams(max_new_tokens=15, stop=["@@"])))
