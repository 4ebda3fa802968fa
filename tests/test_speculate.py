"""Speculative decoding: the same outputs as without it (greedy token for token, seeded n-gram sampling seed for
seed, draft sampling exactly in distribution), for every proposer, precision and batch shape; EOS, stop strings and
max_new_tokens inside an accepted run; streams never take text back; the adaptive switch; bad settings."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch

from codegen_lm.engine import Generator, SamplingParams, Scheduler, SpeculativeConfig
from codegen_lm.engine.speculate import Speculator
from conftest import build_model

K = 4
LOGPROB_BOUND = 1e-4  # verify steps read several positions at once: another batch shape, float rounding only


@pytest.fixture(scope="module")
def target():
    return build_model(vocab_size=1000, n_positions=256, n_layer=3, initializer_range=0.1, seed=1)


@pytest.fixture(scope="module")
def draft():  # another random model of the same vocabulary: its proposals are mostly wrong
    return build_model(vocab_size=1000, n_positions=256, n_layer=2, n_embd=32, initializer_range=0.1, seed=7)


REPEATS = list(range(10, 60)) + list(range(10, 40))  # text that repeats: the n-gram proposer finds it
PROMPTS = [REPEATS, list(range(300, 320)), [5, 6, 7, 5, 6, 7, 5, 6]]


def run(generator: Generator, prompts: list[list[int]], **params):
    return [r[0] for r in generator.complete(prompts, SamplingParams(logprobs=True, ignore_eos=True, **params))]


def assert_same(got, expected) -> None:
    for g, e in zip(got, expected):
        assert g.token_ids == e.token_ids
        assert len(set(e.token_ids)) > 3  # (not collapsed into one repeated token)
        assert max(abs(a - b) for a, b in zip(g.logprobs, e.logprobs)) <= LOGPROB_BOUND


PROPOSERS = {
    "ngram": lambda target, draft: (SpeculativeConfig("ngram", K), None),
    "random draft": lambda target, draft: (SpeculativeConfig("draft", K, draft_model="random"), draft),
    "perfect draft": lambda target, draft: (SpeculativeConfig("draft", K, draft_model="itself"), target),
}


@pytest.mark.parametrize("proposer", PROPOSERS)
@pytest.mark.parametrize("batch", ["alone", "mixed"])
def test_greedy_output_is_the_same(target, draft, proposer, batch):
    config, draft_model = PROPOSERS[proposer](target, draft)
    plain = Generator(target, None)
    spec = Generator(target, None, speculative=config, draft=draft_model)
    prompts = PROMPTS if batch == "mixed" else PROMPTS[:1]
    expected = run(plain, prompts, max_new_tokens=41)
    got = run(spec, prompts, max_new_tokens=41)
    assert_same(got, expected)
    if proposer != "random draft":
        assert sum(c.accepted_tokens for c in got) > 0 and got[0].forward_passes < 41


def test_seeded_sampling_with_ngram_proposals_is_unchanged_seed_for_seed(target):
    plain = Generator(target, None)
    spec = Generator(target, None, speculative=SpeculativeConfig("ngram", K))
    params = dict(max_new_tokens=50, temperature=0.7, top_k=8, seed=3, n=3)
    expected = [c for r in plain.complete(PROMPTS, SamplingParams(ignore_eos=True, **params)) for c in r]
    got = [c for r in spec.complete(PROMPTS, SamplingParams(ignore_eos=True, **params)) for c in r]
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert sum(c.accepted_tokens for c in got) > 0


def test_eos_and_max_new_tokens_inside_an_accepted_run(target):
    """With a draft equal to the target every proposal is kept, so the sequence ends inside a run of kept tokens."""
    config = SpeculativeConfig("draft", K, draft_model="itself")
    free = Scheduler(target, None)
    free.add_request(REPEATS, SamplingParams(max_new_tokens=30, ignore_eos=True))
    tokens = [t for _ in range(40) for o in free.step() for t in o.token_ids]
    # A token first produced inside a run of K + 1 (the first token comes from the prompt, then runs of 5): as EOS,
    # it ends the sequence with kept proposals after it thrown away.
    at = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i] and (i - 1) % (K + 1) < K)
    for max_new_tokens, eos_token_id, length in ((30, tokens[at], at + 1), (13, None, 13), (7, None, 7)):
        got = {}
        for speculative in (None, config):
            scheduler = Scheduler(target, None, eos_token_id=eos_token_id, speculative=speculative,
                                  draft=target if speculative else None)
            scheduler.add_request(REPEATS, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=eos_token_id is None))
            outputs = [o for _ in range(60) for o in scheduler.step()]
            got[speculative is None] = ([t for o in outputs for t in o.token_ids], outputs[-1].finish_reason)
            assert not scheduler.has_unfinished()
        assert got[True] == got[False] and len(got[True][0]) == length


def test_stop_strings_inside_an_accepted_run_and_streams_never_take_text_back(tiny_checkpoint):
    plain = Generator.from_pretrained(str(tiny_checkpoint), prefix_cache_mb=0)
    spec = Generator(plain.model, plain.tokenizer, speculative=SpeculativeConfig("draft", K, draft_model="itself"),
                     draft=plain.model)
    prompt = "def f(x):\n    return x\n\ndef g(x):\n    return x\n\n"
    free = plain.complete([prompt], SamplingParams(max_new_tokens=40))[0][0].text
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    params = SamplingParams(max_new_tokens=40, stop=[stop])
    expected = plain.complete([prompt], params)[0][0]
    assert expected.finish_reason == "stop" and expected.text == free[: free.index(stop)]
    pieces = list(spec.stream(prompt, params))
    assert "".join(pieces) == expected.text  # each piece extends what was shown: nothing is taken back
    got = spec.complete([prompt], params)[0][0]
    assert (got.text, got.finish_reason) == (expected.text, "stop") and got.accepted_tokens > 0


def test_a_speculative_target_takes_the_fp32_layouts_made_for_verify_steps(tiny_checkpoint, monkeypatch):
    """Verify steps carry a few rows per sequence: the target's fp32 layouts are chosen for them; a plain
    generator's, and a draft model's (one row per step), for plain decoding."""
    from codegen_lm import kernels

    if not kernels.fp32_layouts():
        pytest.skip("oneDNN's fp32 matmul does not run here")
    asked: list[bool] = []
    monkeypatch.setattr(kernels, "fp32_plan", lambda n, k, head=False, several_rows=False:
                        asked.append(several_rows) or kernels.Fp32Plan(kernels.fp32_layouts()[0]))
    Generator.from_pretrained(str(tiny_checkpoint))
    assert asked and not any(asked)
    asked.clear()
    Generator.from_pretrained(str(tiny_checkpoint), speculative="ngram")
    assert asked and all(asked)
    asked.clear()
    Generator.from_pretrained(str(tiny_checkpoint), speculative=SpeculativeConfig("draft", draft_model=str(tiny_checkpoint)))
    assert asked[: len(asked) // 2] == [True] * (len(asked) // 2) and asked[len(asked) // 2 :] == [False] * (len(asked) // 2)
    # what the caller says the steps carry wins: n samples without speculation, or speculation kept to one row
    for several_rows, speculative in ((True, None), (False, "ngram")):
        asked.clear()
        Generator.from_pretrained(str(tiny_checkpoint), speculative=speculative, several_rows=several_rows)
        assert asked and all(a == several_rows for a in asked)


def test_int8_target_with_an_int8_self_draft_and_int4(tmp_path):
    """fp32 verified by its int8 self, and an int8 model verified by n-grams, give their plain outputs."""
    from conftest import save_checkpoint

    folder = save_checkpoint(tmp_path / "m", vocab_size=51200, n_embd=128, n_layer=2, n_head=4, rotary_dim=16,
                             n_positions=256, initializer_range=0.1)
    prompt = "def f(x):\n    return x + 1\n\ndef f(x):\n    return x + 1\n\ndef f(x):\n"
    params = SamplingParams(max_new_tokens=30, logprobs=True)
    for quantize, speculative in ((None, "self-int8"), (None, "self-int4"), ("int8", "ngram"), ("int8", "self-int4")):
        plain = Generator.from_pretrained(str(folder), quantize=quantize, prefix_cache_mb=0)
        spec = Generator.from_pretrained(str(folder), quantize=quantize, speculative=speculative)
        expected, got = plain.complete([prompt], params)[0][0], spec.complete([prompt], params)[0][0]
        assert got.token_ids == expected.token_ids, (quantize, speculative)
        if speculative != "ngram":  # (a random model's text may never repeat an n-gram; a draft always proposes)
            assert got.proposed_tokens > 0


def test_the_adaptive_switch_pauses_a_failing_proposer_and_a_full_batch(target, draft, monkeypatch):
    spec = Generator(target, None, speculative=SpeculativeConfig("draft", K, draft_model="random"), draft=draft)
    [completion] = run(spec, [PROMPTS[1]], max_new_tokens=100)
    # A draft's failed verify step pauses proposing for 4, 16, 64 steps: 4 tries in 100 tokens, not one per token;
    # after the first rejection the draft proposes one token at a time (each costs a draft step), so at most K + 3
    # tokens in all (K + 7 when two failures in a row made a pause, as for n-gram lookup; 8 * K with proposals of
    # fixed length).
    assert completion.accepted_tokens <= 2 and completion.proposed_tokens <= K + 3 + 2 * completion.accepted_tokens
    # n-gram proposals that never hold (each token off by one from what the model says): two failures in a row
    # pause the sequence for 4, 16, 64 steps: 8 tries of K tokens in 100 (free to propose, they keep probing twice).
    [truth] = run(Generator(target, None), [PROMPTS[1]], max_new_tokens=100)
    monkeypatch.setattr(Speculator, "_ngram", lambda self, seq, count: [
        (t + 1) % 1000 for t in truth.token_ids[len(seq.token_ids) : len(seq.token_ids) + count]])
    [completion] = run(Generator(target, None, speculative=SpeculativeConfig("ngram", K)), [PROMPTS[1]], max_new_tokens=100)
    assert completion.token_ids == truth.token_ids
    assert completion.accepted_tokens == 0 and completion.proposed_tokens == 8 * K
    perfect = Generator(target, None, speculative=SpeculativeConfig("draft", K, draft_model="itself"), draft=target)
    [completion] = run(perfect, [PROMPTS[1]], max_new_tokens=100)  # a draft that always holds keeps proposing K
    passes = 1 + -(-99 // (K + 1))  # the prefill's token, then K + 1 tokens per verify step
    assert completion.accepted_tokens == completion.proposed_tokens and completion.forward_passes == passes
    full = Generator(target, None, max_batch=16, speculative=SpeculativeConfig("ngram", K, max_step_tokens=16))
    short = PROMPTS[2]  # 16 of these are prefilled in one step, then decode together
    many = full.complete([short] * 16, SamplingParams(max_new_tokens=20, ignore_eos=True))
    assert sum(c.proposed_tokens for r in many for c in r) == 0  # 16 rows fill a step: no room to speculate
    few = full.complete([short] * 2, SamplingParams(max_new_tokens=20, ignore_eos=True))
    assert sum(c.proposed_tokens for r in few for c in r) > 0


# -- exact sampling: a statistical test ---------------------------------------------------------------------------


def test_draft_sampling_draws_exactly_from_the_target(monkeypatch):
    """A target and a very different draft over 6 tokens: the joint distribution of the first three sampled tokens
    (two of them verified against draft proposals) is the target's. Fixed seeds: the outcome cannot vary between
    runs; accepting every draft token (the classic mistake) would be far off (checked below)."""
    config = dict(vocab_size=6, n_embd=16, n_layer=1, n_head=4, rotary_dim=4, n_positions=16, initializer_range=0.6)
    target, draft = build_model(seed=3, **config), build_model(seed=4, **config)
    prompt, params = [1, 2], SamplingParams(max_new_tokens=3, temperature=1.0, seed=0, n=6000, ignore_eos=True)

    def sampled(generator: Generator) -> Counter:
        return Counter(tuple(c.token_ids) for c in generator.complete([prompt], params)[0])

    exact = exact_joint(target, prompt, 3)
    config = SpeculativeConfig("draft", 2, draft_model="d", max_step_tokens=1024)
    spec = Generator(target, None, max_batch=256, speculative=config, draft=draft)
    counts = sampled(spec)
    assert total_variation(counts, exact) < 0.04  # 0.019 (sampling noise of 6000 draws over 216 outcomes: ~0.02)
    assert total_variation(exact_joint(draft, prompt, 3), exact) > 0.2  # the draft alone is far from the target
    monkeypatch.setattr(Speculator, "verify", lambda self, seq, logits, proposal: proposal.tokens + [
        int(torch.distributions.Categorical(logits=logits[-1]).sample())])  # accept everything
    assert total_variation(sampled(spec), exact) > 0.3  # (0.80)


def exact_joint(model, prompt: list[int], steps: int) -> dict[tuple[int, ...], float]:
    vocab = model.config.vocab_size
    joint = {}
    with torch.no_grad():
        for tokens in itertools.product(range(vocab), repeat=steps):
            ids = torch.tensor([prompt + list(tokens)])
            logp = model(ids).logits[0].log_softmax(-1)
            joint[tokens] = float(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(tokens)).exp())
    return joint


def total_variation(counts: Counter, exact: dict) -> float:
    n = sum(counts.values())
    return 0.5 * sum(abs(counts.get(k, 0) / n - p) for k, p in exact.items())


# -- bad settings ---------------------------------------------------------------------------------------------------


def test_bad_settings_are_refused_in_one_line(target, draft, tmp_path, tiny_checkpoint):
    with pytest.raises(ValueError, match="number of speculative tokens must be at least 1"):
        SpeculativeConfig("ngram", 0)
    with pytest.raises(ValueError, match="unknown speculative method 'eagle'"):
        SpeculativeConfig("eagle")
    with pytest.raises(ValueError, match="needs --draft-model"):
        SpeculativeConfig("draft")
    with pytest.raises(ValueError, match="the draft model is on meta and the model on cpu"):
        Generator(target, None, speculative=SpeculativeConfig("draft", draft_model="x"), draft=draft.to("meta"))
    with pytest.raises(ValueError, match="self-int4 drafts with this model quantized to int4, and it already is int4"):
        Generator.from_pretrained(str(tiny_checkpoint), quantize="int4", speculative="self-int4")
    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_checkpoint, other)
    (other / "added_tokens.json").write_text(json.dumps({"<|extra|>": 50257}))  # one token more, ids shifted after it
    with pytest.raises(ValueError, match="has another tokenizer"):
        Generator.from_pretrained(str(tiny_checkpoint), speculative=SpeculativeConfig("draft", draft_model=str(other)))


@pytest.mark.parametrize("args, message", [
    (["--speculative", "ngram", "--num-speculative-tokens", "0"], "--num-speculative-tokens must be at least 1 (got 0)"),
    (["--speculative", "draft"], "--speculative draft needs --draft-model PATH"),
    (["--draft-model", "{ck}"], "--draft-model drafts for --speculative draft"),
    (["--speculative", "medusa"], "unknown speculative method 'medusa'"),
])
def test_cli_refuses_bad_speculative_settings(tiny_checkpoint, args, message):
    argv = [a.replace("{ck}", str(tiny_checkpoint)) for a in args]
    r = subprocess.run([sys.executable, "-m", "codegen_lm.cli", "complete", "x", "--model", str(tiny_checkpoint),
                        *argv], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr


def test_cli_complete_reports_acceptance(tiny_checkpoint):
    prompt = "x = [1, 2, 3]\ny = [1, 2, 3]\nz = [1, 2, 3]\nw = ["
    r = subprocess.run([sys.executable, "-m", "codegen_lm.cli", "complete", prompt, "--model", str(tiny_checkpoint),
                        "--json", "-n", "24", "--speculative", "ngram"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    plain = Generator.from_pretrained(str(tiny_checkpoint)).complete([prompt], SamplingParams(max_new_tokens=24))[0][0]
    assert out["token_ids"] == plain.token_ids
    assert out["proposed_tokens"] >= out["accepted_tokens"] >= 0 and out["forward_passes"] <= len(plain.token_ids)
    assert out["tokens_per_forward_pass"] == round(len(plain.token_ids) / out["forward_passes"], 3)


def test_with_the_prefix_cache_and_chunked_prefill_nothing_changes(target):
    """Speculation, reuse and chunking together: rejected proposals leave no trace in the prefix cache (a later request
    that reuses a speculating one's tokens gets what it would get computed cold)."""
    cold = Generator(target, None, prefix_cache_mb=0, prefill_chunk=1000)
    warm = Generator(target, None, prefill_chunk=7, speculative=SpeculativeConfig("draft", K, draft_model="random"),
                     draft=build_model(vocab_size=1000, n_positions=256, n_layer=1, n_embd=32, seed=9))
    first = run(warm, [REPEATS], max_new_tokens=30)[0]
    assert first.proposed_tokens > first.accepted_tokens  # proposals were rejected
    follow = REPEATS + first.token_ids[:20] + [1, 2]
    got, expected = run(warm, [follow, REPEATS[:40]], max_new_tokens=30), run(cold, [follow, REPEATS[:40]], max_new_tokens=30)
    assert got[0].cached_tokens >= len(REPEATS) + 19  # the first request's prompt and its kept tokens
    assert_same(got, expected)
