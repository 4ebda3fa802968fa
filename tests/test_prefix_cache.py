"""The prefix cache and chunked prefill: what is reused and when, that results are the same with and without it
(greedy tokens identical, log-probabilities within 1e-4, measured below 1e-6), eviction under a budget, aborts
between chunks, and what the server reports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from codegen_lm.engine import Generator, PrefixCache, SamplingParams, Scheduler
from codegen_lm.engine.prefix_cache import common_length, kv_bytes_per_token
from codegen_lm.model import KVCache
from codegen_lm.session import Session
from conftest import build_model
from serving import MODEL, alone, metric, running, save_tiny_checkpoint, settle

LOGPROB_BOUND = 1e-4  # |log p with reuse - log p without|: float rounding of another batch shape (measured < 1e-6)


@pytest.fixture(scope="module")
def model():
    # Larger weights than the default 0.02, so that logits are informative and greedy text does not collapse.
    return build_model(vocab_size=1000, n_positions=256, n_layer=3, initializer_range=0.1, seed=1)


PROMPT = list(range(10, 130))  # 120 tokens


def generate(generator: Generator, prompt: list[int], **params) -> object:
    completion = generator.complete([prompt], SamplingParams(max_new_tokens=30, logprobs=True, ignore_eos=True,
                                                             **params))[0][0]
    return completion


@pytest.fixture(scope="module")
def reference(model):
    """Every prompt of these tests computed whole, nothing reused."""
    cold = Generator(model, None, prefix_cache_mb=0, prefill_chunk=1000)
    return lambda prompt, **params: generate(cold, prompt, **params)


def assert_same(got, expected) -> None:
    assert got.token_ids == expected.token_ids
    assert len(set(expected.token_ids)) > 5  # (not collapsed into one repeated token)
    assert max(abs(a - b) for a, b in zip(got.logprobs, expected.logprobs)) <= LOGPROB_BOUND


# -- the radix tree -------------------------------------------------------------------------------------------


def test_common_length():
    assert [common_length(a, b) for a, b in (([], [1]), ([1, 2, 3], [1, 2, 4]), ([1, 2], [1, 2, 3]), ([5], [6]),
                                             (list(range(1000)), list(range(999)) + [0]))] == [0, 2, 2, 0, 999]


def filled_row(model, tokens: list[int]) -> KVCache:
    """A cache whose row 0 holds ``tokens``' keys and values."""
    cache = KVCache(model.config, 2, 256, torch.float32, "cpu")
    with torch.inference_mode():
        model.logits_cached(torch.tensor([tokens]), torch.arange(len(tokens))[None], cache, slice(0, 1), len(tokens))
    return cache


def test_tree_matches_token_by_token_splits_edges_and_copies_only_what_is_new(model):
    budget = 1000 * kv_bytes_per_token(model.config, torch.float32)
    tree = PrefixCache(model.config, torch.float32, "cpu", budget)
    a, b = list(range(1, 41)), list(range(1, 21)) + list(range(500, 520))
    with torch.inference_mode():
        assert tree.insert(a, filled_row(model, a), 0) == 40 and tree.used_tokens == 40
        assert tree.insert(b, filled_row(model, b), 0) == 40 and tree.used_tokens == 60  # the 20 shared are kept once
        assert [len(c.tokens) for c in tree.root.children.values()] == [20]  # the edge was split where they part
        length, slots = tree.match(a[:30] + [999])
        assert length == 30 and len(slots) == 30
        cache = KVCache(model.config, 2, 256, torch.float32, "cpu")
        tree.load(slots, cache, 1)
        torch.testing.assert_close(cache.span(1, 0, 30), filled_row(model, a).span(0, 0, 30), rtol=0, atol=0)
        assert tree.match([7, 8])[0] == 0


def test_tree_evicts_least_recently_used_leaves_within_its_budget(model):
    per_token = kv_bytes_per_token(model.config, torch.float32)
    tree = PrefixCache(model.config, torch.float32, "cpu", 50 * per_token)
    seqs = [[i] + list(range(100, 120)) for i in range(1, 4)]  # three 21-token sequences, no shared prefix
    with torch.inference_mode():
        tree.insert(seqs[0], filled_row(model, seqs[0]), 0)
        tree.insert(seqs[1], filled_row(model, seqs[1]), 0)
        tree.match(seqs[0])  # the first is now the most recently used
        assert tree.insert(seqs[2], filled_row(model, seqs[2]), 0) == 21
        assert tree.used_bytes <= 50 * per_token and tree.evictions == 1
        assert tree.match(seqs[0])[0] == 21 and tree.match(seqs[1])[0] == 0 and tree.match(seqs[2])[0] == 21
        long = list(range(200, 260))  # more than the whole budget: what fits is kept, the rest is not
        assert tree.insert(long, filled_row(model, long), 0) == 50 and tree.used_tokens == 50


# -- the same results with and without reuse --------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 32, 119, 120, 121, 1000])  # a prompt of 120: every boundary case
def test_chunked_prefill_and_hits_equal_computing_everything(model, reference, chunk):
    warm = Generator(model, None, prefill_chunk=chunk)
    partial = generate(warm, PROMPT[:60] + [5, 6, 7])  # leaves the first 60 tokens in the cache
    assert partial.cached_tokens == 0
    got = generate(warm, PROMPT)
    assert got.cached_tokens == 60  # a partial hit
    assert_same(got, reference(PROMPT))
    again = generate(warm, PROMPT)
    assert again.cached_tokens == 119  # a full hit: only the last token is computed (its logits start the sampling)
    assert_same(again, reference(PROMPT))
    longer = PROMPT + again.token_ids[:10]  # the generated tokens were kept too
    assert generate(warm, longer).cached_tokens == len(longer) - 1
    assert_same(generate(warm, longer), reference(longer))


def test_seeded_sampling_and_n_samples_are_unchanged(model, reference):
    warm = Generator(model, None, prefill_chunk=16)
    params = dict(temperature=0.9, top_k=20, seed=7)
    generate(warm, PROMPT[:100])
    expected = Generator(model, None, prefix_cache_mb=0).complete([PROMPT], SamplingParams(
        max_new_tokens=20, n=3, **params))[0]
    got = warm.complete([PROMPT], SamplingParams(max_new_tokens=20, n=3, **params))[0]
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert got[0].cached_tokens == 100 and len({tuple(c.token_ids) for c in got}) == 3


def test_a_hit_that_ends_mid_token_after_an_edit(tiny_checkpoint):
    """Typing one more character can change the last token or two of the tokenization: everything before is reused."""
    generator = Generator.from_pretrained(str(tiny_checkpoint))
    cold = Generator.from_pretrained(str(tiny_checkpoint), prefix_cache_mb=0)
    encode = generator.tokenizer.encode
    before = "import os\n\ndef list_files(folder):\n    names = sorted(os.listdir(folder))\n    return [n for n in nam"
    after = before + "es if n.endswith"
    shared = common_length(encode(before), encode(after))
    assert len(encode(before)) - 3 <= shared < len(encode(before)) - 1  # " n" + "am" became " names"
    params = SamplingParams(max_new_tokens=16, logprobs=True)
    generator.complete([before], params)
    [[got]] = generator.complete([after], params)
    [[expected]] = cold.complete([after], params)
    assert got.cached_tokens == shared
    assert got.token_ids == expected.token_ids and got.text == expected.text
    assert max(abs(a - b) for a, b in zip(got.logprobs, expected.logprobs)) <= LOGPROB_BOUND


def test_concurrent_requests_share_a_running_sequences_prefix(model, reference):
    """A request that arrives while another with the same start is running copies that sequence's row (its prompt
    and the tokens it has generated so far)."""
    scheduler = Scheduler(model, None, max_batch=4, prefix_cache=None, prefill_chunk=16)
    scheduler.prefix_cache = PrefixCache(model.config, model.dtype, model.device, 1 << 26)
    first = scheduler.add_request(PROMPT, SamplingParams(max_new_tokens=30, ignore_eos=True, logprobs=True))
    outputs: dict[str, list] = {}
    for _ in range(12):  # the prompt (8 chunks of 16) and 4 tokens
        for o in scheduler.step():
            outputs.setdefault(o.request_id, []).append(o)
    running = scheduler.running[0]
    follower = PROMPT + running.token_ids[:3] + [42]
    second = scheduler.add_request(follower, SamplingParams(max_new_tokens=30, ignore_eos=True, logprobs=True))
    while scheduler.has_unfinished():
        for o in scheduler.step():
            outputs.setdefault(o.request_id, []).append(o)
    done = {rid: next(o.completion for o in outs if o.completion) for rid, outs in outputs.items()}
    assert done[second].cached_tokens == len(PROMPT) + 3  # from the running row, not from the tree
    assert_same(done[first], reference(PROMPT))
    assert_same(done[second], reference(follower))


def test_an_abort_mid_prefill_frees_its_row_and_keeps_what_was_computed(model, reference):
    generator = Generator(model, None, prefill_chunk=4)
    scheduler = generator.scheduler()
    doomed = scheduler.add_request(PROMPT, SamplingParams(max_new_tokens=5))
    scheduler.step()
    scheduler.step()  # with nobody decoding, a step computes 8 chunks: 2 x 8 x 4 tokens
    computed = scheduler.running[0].computed
    assert computed == 64
    scheduler.abort(doomed)
    assert not scheduler.running and not scheduler.has_unfinished()
    replacement = generate(generator, PROMPT)
    assert replacement.cached_tokens == computed
    assert_same(replacement, reference(PROMPT))


def test_a_hit_from_an_aborted_decode(model, reference):
    generator = Generator(model, None)
    scheduler = generator.scheduler()
    doomed = scheduler.add_request(PROMPT[:50], SamplingParams(max_new_tokens=40, ignore_eos=True))
    generated = []
    for _ in range(6):
        generated += [t for o in scheduler.step() for t in o.token_ids]
    scheduler.abort(doomed)
    prompt = PROMPT[:50] + generated + [3]
    got = generate(generator, prompt)
    assert got.cached_tokens == 50 + len(generated) - 1  # the last sampled token was never fed
    assert_same(got, reference(prompt))


@pytest.fixture
def copies(monkeypatch):
    """How many slots of keys and values each copy into a cache row moved (from another row or from the tree)."""
    moved: list[int] = []
    copy_rows, load = KVCache.copy_rows, PrefixCache.load

    def copying_rows(self, src, dst, length, start=0):
        moved.append(length - start)
        copy_rows(self, src, dst, length, start)

    def loading(self, slots, cache, row, start=0):
        moved.append(len(slots))
        load(self, slots, cache, row, start)

    monkeypatch.setattr(KVCache, "copy_rows", copying_rows)
    monkeypatch.setattr(PrefixCache, "load", loading)
    return moved


def test_a_follow_up_lands_in_its_predecessors_row_and_copies_nothing(model, reference, copies):
    """An editor drops its request when the person types on and sends the file again: the new request takes the
    row the old one left and keeps what it holds, without a copy (the tree holds it too)."""
    scheduler = Generator(model, None).scheduler()
    dropped = scheduler.add_request(PROMPT, SamplingParams(max_new_tokens=30, ignore_eos=True))
    for _ in range(5):
        scheduler.step()
    scheduler.abort(dropped)
    edited = PROMPT[:-2] + [7, 8, 9]
    follow_up = scheduler.add_request(edited, SamplingParams(max_new_tokens=30, ignore_eos=True, logprobs=True))
    outputs = [o for _ in range(40) for o in scheduler.step()]
    (got,) = [o.completion for o in outputs if o.request_id == follow_up and o.completion]
    assert got.cached_tokens == len(PROMPT) - 2 and not any(copies)
    assert_same(got, reference(edited))


def test_a_freed_row_is_refilled_copying_only_what_differs(model, reference, copies):
    """A row freed under running rows takes the last one, which copies only the slots where the two differ; the
    row left free remembers what it holds for the next request."""
    scheduler = Generator(model, None, prefill_chunk=1000).scheduler()
    params = SamplingParams(max_new_tokens=30, ignore_eos=True, logprobs=True)
    first = scheduler.add_request(PROMPT, params)
    scheduler.step()
    second = scheduler.add_request(PROMPT[:100] + [3, 4], params)
    scheduler.step()
    copies.clear()
    scheduler.abort(first)  # row 0 goes; the second moves into it
    assert len(scheduler.running) == 1 and copies == [2]  # its last two prompt tokens (its first sample not yet fed)
    assert scheduler.cache.holds == {1: PROMPT[:100] + [3, 4]}
    outputs = [o for _ in range(40) for o in scheduler.step()]
    (got,) = [o.completion for o in outputs if o.request_id == second and o.completion]
    assert_same(got, reference(PROMPT[:100] + [3, 4]))


def test_nothing_an_empty_cache_held_reaches_the_outputs(model, reference):
    """Caches are allocated empty: unwritten slots that a shorter row reads (masked) are zeroed first, or the NaN
    the memory may hold would spread through attention (0 x NaN)."""
    from codegen_lm.engine.compiled import idle_caches

    dirty = KVCache(model.config, 4, model.config.n_positions, model.dtype, model.device)
    dirty.k.fill_(float("nan"))
    dirty.v.fill_(float("nan"))
    idle_caches(model)[:] = [dirty]
    prompts = [PROMPT[:30], PROMPT, PROMPT[:70]]
    got = Generator(model, None, prefill_chunk=1000).complete(
        prompts, SamplingParams(max_new_tokens=30, ignore_eos=True, logprobs=True))
    assert idle_caches(model) == [dirty]  # (the steps above ran in it)
    for prompt, (completion,) in zip(prompts, got):
        assert_same(completion, reference(prompt))


def test_a_tiny_budget_evicts_without_changing_outputs(model, reference):
    per_token = kv_bytes_per_token(model.config, torch.float32)
    generator = Generator(model, None, prefix_cache_mb=40 * per_token / 2**20, prefill_chunk=8)
    prompts = [[p] + PROMPT[:50] for p in range(1, 5)] + [PROMPT[:50]]
    for prompt in prompts:
        assert_same(generate(generator, prompt), reference(prompt))
        assert generator.prefix_cache.used_bytes <= 40 * per_token
    assert generator.prefix_cache.evictions > 0


def test_without_the_prefix_cache_nothing_is_reused(model, reference):
    generator = Generator(model, None, prefix_cache_mb=0)
    assert generator.prefix_cache is None
    generate(generator, PROMPT)
    assert generate(generator, PROMPT).cached_tokens == 0
    with pytest.raises(ValueError, match="prefix cache budget must be >= 0 MB"):
        Generator(model, None, prefix_cache_mb=-1)
    with pytest.raises(ValueError, match="the prefill chunk must be at least 1 token"):
        Generator(model, None, prefill_chunk=0)


def test_a_session_reuses_its_history(tiny_checkpoint):
    generator = Generator.from_pretrained(str(tiny_checkpoint))
    session = Session(generator, params=SamplingParams(max_new_tokens=12))
    session.say("Assign the list [3, 1, 2] to xs.")
    before = generator.prefix_cache.used_tokens
    session.say("Sort xs in place.")
    encode = generator.tokenizer.encode
    second = encode(session.prompt_for("Sort xs in place.", session.turns[:1])[0])
    third = encode(session.prompt_for("Print xs.", session.turns)[0])
    cached, _ = generator.prefix_cache.match(third)
    # The third turn's prompt holds the second's whole prompt, then its code: all of that prompt is reused, and the
    # code's tokens too except where the cut code, re-encoded, parts from the tokens generated.
    assert before > 0 and common_length(second, third) >= len(second) - 1 and cached > len(second)


# -- the server reports it ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("pc") / MODEL)


def test_server_reports_cached_tokens_and_metrics(server_checkpoint):
    server_generator = Generator.from_pretrained(str(server_checkpoint), prefill_chunk=16)
    cold = Generator.from_pretrained(str(server_checkpoint), prefix_cache_mb=0)
    prompt = "import os\n\ndef walk(folder):\n    for root, dirs, files in os.walk(folder):\n        for name in files:\n"
    with running(server_generator) as s:
        first = s.client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        second = s.client.completions.create(model=MODEL, prompt=prompt + "            if", max_tokens=8, temperature=0)
        prompt_tokens = len(server_generator.tokenizer.encode(prompt))
        assert second.usage.prompt_tokens_details.cached_tokens >= prompt_tokens - 1
        assert second.choices[0].text == alone(cold, prompt + "            if", max_new_tokens=8)[0].text
        chunks = list(s.client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, stream=True,
                                                  stream_options={"include_usage": True}))
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == prompt_tokens - 1
        chat = s.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Print 1."}],
                                                max_tokens=4, temperature=0)
        again = s.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Print 1."}],
                                                 max_tokens=4, temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
        assert chat.choices[0].message.content == again.choices[0].message.content
        settle(s.state)
        reused, computed = metric(s, "codegen_prompt_tokens_cached_total"), metric(s, "codegen_prompt_tokens_computed_total")
        usages = [first.usage, second.usage, chunks[-1].usage, chat.usage, again.usage]
        assert reused == sum(u.prompt_tokens_details.cached_tokens for u in usages)
        assert computed == sum(u.prompt_tokens - u.prompt_tokens_details.cached_tokens for u in usages)
        assert 0 < metric(s, "codegen_prefix_cache_bytes") <= metric(s, "codegen_prefix_cache_capacity_bytes")
