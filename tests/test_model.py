"""Parity of our network with transformers' CodeGen on the same random weights (the foundation of trust)."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import build_model, randomize_, relative_error

from codegen_lm import AutoModelForCausalLM, CodeGenConfig, CodeGenForCausalLM, CodeGenModel
from codegen_lm.model import qkv_official_to_plain, qkv_plain_to_official

SHAPES = {
    "rotary<head_dim,2 layers": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "rotary=head_dim,1 layer": dict(n_embd=64, n_layer=1, n_head=4, rotary_dim=16),
    "8 heads,3 layers,vocab 51200": dict(n_embd=128, n_layer=3, n_head=8, rotary_dim=8, vocab_size=51200),
    "relu,n_inner": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, activation_function="relu", n_inner=96),
}


def hf_twin(model: CodeGenForCausalLM, folder, cls=transformers.CodeGenForCausalLM):
    model.save_pretrained(folder)
    return cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def left_padded_batch(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :9] = 0
    return ids, mask


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_against_hf_logits_hidden_states_attentions(shape, tmp_path):
    ours = randomize_(build_model(**shape))  # biases and norms that are not 0 and 1, so each one's mapping shows
    theirs = hf_twin(ours, tmp_path)
    ids, mask = left_padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        b = theirs(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    real = mask.bool()  # positions of left padding carry no meaning in either implementation
    torch.testing.assert_close(a.logits[real], b.logits.float()[real], atol=1e-4, rtol=1e-4)
    assert len(a.hidden_states) == len(b.hidden_states) == ours.config.n_layer + 1
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x[real], y[real], atol=1e-4, rtol=1e-4)
    assert len(a.attentions) == len(b.attentions) == ours.config.n_layer
    for x, y in zip(a.attentions, b.attentions):
        torch.testing.assert_close(x.transpose(1, 2)[real], y.transpose(1, 2)[real], atol=1e-4, rtol=1e-4)


def test_against_hf_base_model_hidden_state(tmp_path):
    ours = randomize_(build_model())
    hf_twin(ours, tmp_path)
    body = CodeGenModel.from_pretrained(tmp_path)
    theirs = transformers.CodeGenModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask = left_padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        a, b = body(ids, attention_mask=mask).last_hidden_state, theirs(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-4, rtol=1e-4)


def test_against_hf_loss_with_labels(tmp_path):
    ours = randomize_(build_model())
    theirs = hf_twin(ours, tmp_path)
    ids = torch.randint(0, 1000, (2, 12))
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, labels=labels).loss, theirs(ids, labels=labels).loss, atol=1e-5, rtol=1e-5)


def test_cached_forward_equals_full_recomputation():
    model = build_model()
    ids = torch.randint(0, 1000, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :12], use_cache=True)
        pieces = [out.logits]
        past = out.past_key_values
        for t in range(12, 20):
            out = model(ids[:, t : t + 1], past_key_values=past, use_cache=True)
            pieces.append(out.logits)
            past = out.past_key_values
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_preallocated_cache_path_equals_plain_forward():
    from codegen_lm.model import KVCache

    model = build_model()
    ids = torch.randint(0, 1000, (1, 16))
    cache = KVCache(model.config, 1, 32, torch.float32, "cpu")
    with torch.no_grad():
        full = model(ids).logits[0]
        logits = [model.logits_cached(ids[:, :10], torch.arange(10)[None], cache, slice(0, 1), 10)]
        for t in range(10, 16):
            logits.append(model.logits_cached(ids[:, t : t + 1], torch.tensor([[t]]), cache, slice(0, 1), t + 1))
    torch.testing.assert_close(torch.cat(logits), full[9:], atol=1e-5, rtol=1e-5)


def test_qkv_layout_round_trip_and_state_dict_is_official(tmp_path):
    weight = torch.randn(3 * 64, 64)
    assert torch.equal(qkv_plain_to_official(qkv_official_to_plain(weight)), weight)
    model = build_model()
    theirs = hf_twin(model, tmp_path)
    key = "transformer.h.0.attn.qkv_proj.weight"
    assert torch.equal(model.state_dict()[key], theirs.state_dict()[key])
    assert not torch.equal(model.transformer.h[0].attn.qkv_proj.weight, theirs.state_dict()[key])


def test_bf16_and_fp16_forward_close_to_fp32():
    """Within each precision's rounding (measured: bf16 0.8 %, fp16 0.1 % relative error), on weights whose logits
    spread ~1, so that a 10 % error (a norm weight off by 10 %, say) is far outside the bound."""
    model = randomize_(build_model())
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        reference = model(ids).logits
        assert reference.std() > 0.5
        for dtype, bound in ((torch.bfloat16, 0.025), (torch.float16, 0.005)):
            logits = randomize_(build_model()).to(dtype)(ids).logits
            assert logits.dtype == torch.float32  # logits are always returned in fp32, like the original
            assert relative_error(logits, reference) < bound


def test_inputs_embeds_token_type_ids_and_tuple_outputs():
    model = build_model()
    ids = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        by_ids = model(ids).logits
        by_embeds = model(inputs_embeds=model.transformer.wte(ids)).logits
        torch.testing.assert_close(by_ids, by_embeds)
        with_types = model(ids, token_type_ids=torch.zeros_like(ids)).logits
        assert not torch.allclose(with_types, by_ids)  # token types are embedded with wte and added
        logits, past = model(ids, return_dict=False)
    torch.testing.assert_close(logits, by_ids)
    assert len(past) == model.config.n_layer
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_positions_beyond_n_positions_are_an_error():
    model = build_model(n_positions=16)
    with pytest.raises(ValueError, match="only 16 positions"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_config_defaults_presets_and_validation(tmp_path):
    config = CodeGenConfig()
    assert (config.vocab_size, config.n_positions, config.n_embd, config.n_layer, config.rotary_dim) == (50400, 2048, 4096, 28, 64)
    assert (config.activation_function, config.layer_norm_epsilon, config.tie_word_embeddings) == ("gelu_new", 1e-5, False)
    assert config.bos_token_id == config.eos_token_id == 50256
    assert CodeGenConfig.preset("codegen-350M-mono").n_layer == 20
    assert CodeGenConfig.from_pretrained("codegen-16B-nl").n_embd == 6144
    assert CodeGenConfig.preset("Salesforce/codegen-16B-nl").n_layer == 34
    for name in ("codegen-2B-multi", "codegen-6B-mono"):
        preset = CodeGenConfig.preset(name)
        hf = transformers.CodeGenConfig(**{k: v for k, v in preset.to_dict().items() if k != "architectures"})
        assert hf.n_layer == preset.n_layer and hf.rotary_dim == preset.rotary_dim
    with pytest.raises(ValueError, match="activation_function"):
        CodeGenConfig(activation_function="swish")
    with pytest.raises(ValueError, match="unknown preset"):
        CodeGenConfig.preset("codegen-1B-mono")
    # transformers reads what we write, and we read what it writes.
    CodeGenConfig.preset("codegen-350M-mono").save_pretrained(tmp_path)
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (theirs.n_layer, theirs.n_embd, theirs.vocab_size) == (20, 1024, 51200)
    theirs.save_pretrained(tmp_path / "hf")
    assert CodeGenConfig.from_pretrained(tmp_path / "hf").n_embd == 1024


def test_auto_model_returns_causal_lm(tmp_path):
    build_model().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(model, CodeGenForCausalLM) and not model.training
