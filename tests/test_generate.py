"""generate(): transformers' contract and token-identical greedy output; the engine's front ends."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import build_model

from codegen_lm import AutoModelForCausalLM, AutoTokenizer, CodeGenForCausalLM
from codegen_lm.engine import Generator, SamplingParams, Scheduler
from codegen_lm.tokenizer import CODEGEN_TOKENS, truncate_before_pattern


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen")
    ours = build_model(vocab_size=51200, n_positions=512)
    ours.save_pretrained(folder)
    theirs = transformers.CodeGenForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, theirs


def left_padded(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    mask[2, :11] = 0
    return ids.masked_fill(mask == 0, 50256), mask


def test_against_hf_greedy_generate_batched_and_alone(pair):
    ours, theirs = pair
    ids, mask = left_padded(ours.config.vocab_size)
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=32)
    # Ours never picks the 905 padding rows past the tokenizer's 50295 tokens; transformers must be told.
    b = theirs.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=50256,
                        suppress_tokens=list(range(CODEGEN_TOKENS, ours.config.vocab_size)))
    assert a.shape == b.shape == (3, 48)
    assert all(len(set(row[16:].tolist())) > 3 for row in a)  # not outputs collapsed into one repeated token
    assert torch.equal(a, b)
    for row in range(3):
        alone = ours.generate(ids[row : row + 1, mask[row].bool()], max_new_tokens=32)
        assert torch.equal(alone[0], a[row, mask[row].bool().nonzero()[0, 0] :])


def test_generate_length_arguments_and_eos_padding(pair):
    ours, _ = pair
    ids = torch.tensor([[10, 20, 30]])
    assert ours.generate(ids).shape == (1, 20)  # transformers' default max_length
    assert ours.generate(ids, max_length=8).shape == (1, 8)
    with pytest.raises(ValueError, match="leaves nothing to generate"):
        ours.generate(ids, max_length=3)
    # Force an early EOS by making it the argmax everywhere: the row ends with EOS, then padding.
    model = build_model(vocab_size=51200, n_positions=512)
    with torch.no_grad():
        model.lm_head.bias[50256] = 100.0
    out = model.generate(torch.tensor([[1, 2, 3], [4, 5, 6]]), max_new_tokens=5, pad_token_id=7)
    assert out.tolist() == [[1, 2, 3, 50256], [4, 5, 6, 50256]]


def test_positions_beyond_the_model_are_an_error(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        ours.generate(torch.zeros(1, 500, dtype=torch.long), max_new_tokens=20)


def test_seeded_sampling_is_reproducible_and_seeds_differ(pair):
    ours, _ = pair
    ids = torch.tensor([[5, 6, 7, 8]])
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.9, num_return_sequences=3)
    first, again, other = (ours.generate(ids, seed=s, **kwargs) for s in (1, 1, 2))
    assert first.shape == (3, 16)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert len({tuple(r) for r in first.tolist()}) == 3  # each sample draws on its own generator


def test_seed_example_runs_verbatim(tiny_checkpoint):
    checkpoint = str(tiny_checkpoint)  # in place of "Salesforce/codegen-350M-mono"
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    completion = model.generate(**tokenizer("def hello_world():", return_tensors="pt"))
    text = tokenizer.decode(completion[0], truncate_before_pattern=[r"\n\n^#", "^'''", "\n\n\n"])
    prompt = tokenizer.encode("def hello_world():")  # transformers' default max_length 20 includes the prompt
    greedy = Generator(model, tokenizer).complete([prompt], SamplingParams(max_new_tokens=20 - len(prompt)))[0][0]
    assert completion.shape == (1, 20) and completion[0].tolist() == prompt + greedy.token_ids
    assert text == truncate_before_pattern(tokenizer.decode(completion[0]), [r"\n\n^#", "^'''", "\n\n\n"])


def test_stop_strings_and_streaming(tiny_checkpoint):
    model = CodeGenForCausalLM.from_pretrained(tiny_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    generator = Generator(model, tokenizer)
    free = generator.complete(["def f(x):"], SamplingParams(max_new_tokens=24))[0][0]
    assert free.finish_reason == "length" and len(free.token_ids) == 24
    assert tokenizer.decode(free.token_ids) == free.text
    # A stop string taken from the middle of the free-running text cuts it exactly there.
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    cut = generator.complete(["def f(x):"], SamplingParams(max_new_tokens=24, stop=[stop]))[0][0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]
    pieces = list(generator.stream("def f(x):", SamplingParams(max_new_tokens=24, stop=[stop])))
    assert "".join(pieces) == cut.text
    # transformers' stop_strings argument.
    ids = tokenizer("def f(x):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=24, stop_strings=stop, tokenizer=tokenizer)
    assert stop in tokenizer.decode(out[0, ids.shape[1] :])
    assert out.shape[1] - ids.shape[1] == len(cut.token_ids)


def test_n_samples_share_a_prefill_and_match_single_runs(pair):
    ours, _ = pair
    generator = Generator(ours, tokenizer=None, max_batch=4)  # id prompts need no tokenizer for the samples' ids
    prompt = list(range(100, 140))
    params = dict(max_new_tokens=10, temperature=0.8, top_k=40)
    together = generator.complete([prompt], SamplingParams(n=6, seed=11, **params), )[0]
    for j, sample in enumerate(together):
        alone = generator.complete([prompt], SamplingParams(n=1, seed=11 + j, **params))[0][0]
        assert sample.token_ids == alone.token_ids


def test_scheduler_requests_joining_and_leaving_get_what_they_get_alone(pair):
    ours, _ = pair
    prompts = [list(range(10, 10 + 3 * k)) for k in range(1, 7)]
    lengths = [3, 9, 5, 12, 2, 7]

    def alone(i: int) -> list[int]:
        scheduler = Scheduler(ours, tokenizer=None, max_batch=1)
        scheduler.add_request(prompts[i], SamplingParams(max_new_tokens=lengths[i]), "x")
        tokens = []
        while scheduler.has_unfinished():
            tokens += [t for out in scheduler.step() for t in out.token_ids]
        return tokens

    scheduler = Scheduler(ours, tokenizer=None, max_batch=3)
    got: dict[str, list[int]] = {}
    pending = list(range(6))
    while pending or scheduler.has_unfinished():
        if pending:  # one new request joins every step, while others finish and leave
            i = pending.pop(0)
            scheduler.add_request(prompts[i], SamplingParams(max_new_tokens=lengths[i]), str(i))
        for out in scheduler.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
    assert sorted(got) == [str(i) for i in range(6)]
    for i in range(6):
        assert got[str(i)] == alone(i), f"request {i}"


@pytest.mark.parametrize(
    "params, message",
    [(dict(n=0), "n must be"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
     (dict(top_p=1.5), "top_p"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(top_k=-2), "top_k")],
)
def test_bad_sampling_params_are_rejected(params, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**params)


def test_bad_requests_fail_before_work(pair):
    ours, _ = pair
    scheduler = Scheduler(ours, tokenizer=None)
    with pytest.raises(ValueError, match="prompt is empty"):
        scheduler.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="token ids must be in"):
        scheduler.add_request([60000], SamplingParams())
    assert not scheduler.has_unfinished()
