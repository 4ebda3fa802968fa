"""Checkpoints: official layout in and out, .bin/.safetensors, sharded, and every error path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import ISOLATED, build_model, randomize_, relative_error
from safetensors.torch import load_file, save_file

from codegen_lm import CodeGenForCausalLM
from codegen_lm.checkpoint import load_model
from codegen_lm.hub import CheckpointNotFoundError

IDS = torch.arange(0, 960, 40)[None]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.mark.parametrize(
    "save_kwargs",
    [dict(safe_serialization=True), dict(safe_serialization=False), dict(safe_serialization=True, max_shard_size="100KB"),
     dict(safe_serialization=False, max_shard_size="100KB")],
    ids=["safetensors", "bin", "sharded-safetensors", "sharded-bin"],
)
def test_transformers_checkpoint_loads_in_ours(save_kwargs, tmp_path):
    torch.manual_seed(0)
    theirs = randomize_(transformers.CodeGenForCausalLM(
        transformers.CodeGenConfig(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256)
    ).eval())  # biases and norms that are not 0 and 1, so a mis-mapped one shows
    theirs.save_pretrained(tmp_path, **save_kwargs)
    if "max_shard_size" in save_kwargs:
        assert any("index.json" in p.name for p in tmp_path.iterdir())
    ours = CodeGenForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shard", [None, "60KB"])
def test_our_checkpoint_loads_in_transformers_and_back(shard, tmp_path):
    ours = randomize_(build_model())
    ours.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert ("model.safetensors.index.json" in names) == bool(shard)
    theirs = transformers.CodeGenForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=1e-5)
    again = CodeGenForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(again), logits(ours))


def test_dtype_and_old_buffers(tmp_path):
    ours = randomize_(build_model())  # logits spread ~1: bf16's rounding (0.8 %) is far from a real error
    state = ours.state_dict()
    state["transformer.h.0.attn.causal_mask"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e9)
    ours.config.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    half = load_model(tmp_path, torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.transformer.rotary.dtype == torch.float32
    assert logits(ours).std() > 0.5 and relative_error(logits(half), logits(ours)) < 0.025
    assert load_model(tmp_path, dtype="fp16").dtype == torch.float16


@pytest.mark.parametrize("before, after", [(None, None), ("60KB", None), (None, "60KB")],
                         ids=["single over single", "single over shards", "shards over single"])
def test_a_save_that_fails_part_way_leaves_the_earlier_checkpoint(before, after, tmp_path, monkeypatch):
    """The final model of a training run is saved over the previous one (a resumed run): a full disk part way
    through must leave the previous weights loadable, and the next save must leave no stale shard behind."""
    from codegen_lm.checkpoint import save_model

    first, second = randomize_(build_model(seed=0)), randomize_(build_model(seed=1))
    save_model(first, tmp_path, **({"max_shard_size": before} if before else {}))
    listing = sorted(p.name for p in tmp_path.iterdir())
    written = []

    def fail(tensors, path, *args, **kwargs):
        written.append(path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(OSError, match="No space left"):
        save_model(second, tmp_path, **({"max_shard_size": after} if after else {}))
    monkeypatch.undo()
    assert written and sorted(p.name for p in tmp_path.iterdir()) == listing
    assert torch.equal(logits(load_model(tmp_path)), logits(first))
    save_model(second, tmp_path, **({"max_shard_size": after} if after else {}))
    assert torch.equal(logits(load_model(tmp_path)), logits(second))
    weights = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("model"))
    assert weights == (["model.safetensors"] if not after else
                       [*(f"model-{i:05d}-of-{len(weights) - 1:05d}.safetensors" for i in range(1, len(weights))),
                        "model.safetensors.index.json"])


def test_errors_name_the_problem(tmp_path):
    build_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        load_model(tmp_path, dtype="int3")

    wrong = dict(state, **{"lm_head.bias": torch.zeros(7)})
    save_file(wrong, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'lm_head.bias' has shape \(7,\).*expects \(1000,\)"):
        load_model(tmp_path)

    missing = {k: v for k, v in state.items() if k != "transformer.ln_f.weight"}
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'transformer.ln_f.weight' \(shape \(64,\)\) is missing"):
        load_model(tmp_path)

    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(tmp_path)

    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="no weights"):
        load_model(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        load_model(tmp_path)


def test_the_hub_cache_is_the_test_session_s_own():
    """What a developer downloaded (Salesforce/codegen-350M-mono after the README's first command) must not change
    outcomes, such as the next test's: conftest points the hub cache at a temporary folder."""
    from huggingface_hub import constants

    assert Path(constants.HF_HUB_CACHE).is_relative_to(ISOLATED) and Path(constants.HF_HOME).is_relative_to(ISOLATED)
    assert not Path(constants.HF_HUB_CACHE).is_relative_to(Path.home())


def test_offline_hub_id_gives_one_line_message():
    with pytest.raises(CheckpointNotFoundError, match="no network and not in the hub cache") as info:
        load_model("Salesforce/codegen-350M-mono")
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointNotFoundError, match="neither an existing folder nor a valid hub id"):
        load_model("no such/folder/here")


def test_cuda_requested_without_cuda_is_clear(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    build_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_model(tmp_path, device="cuda")


def test_large_tensors_are_copied_in_slices(tmp_path, monkeypatch):
    """Each slice is read under its own mapping of the file; the pieces must join into the exact tensor."""
    from codegen_lm import checkpoint

    tensors = {"rows": torch.randn(1001, 37), "flat": torch.randn(5003), "small": torch.randn(3), "int": torch.arange(7)}
    save_file(tensors, tmp_path / "t.safetensors")
    monkeypatch.setattr(checkpoint, "_COPY_SLICE_BYTES", 4096)  # 27 rows of 37 floats, 1024 of the flat ones
    for key, tensor in tensors.items():
        copy = checkpoint._copy_tensor(tmp_path / "t.safetensors", key)
        assert copy.dtype == tensor.dtype and torch.equal(copy, tensor)
