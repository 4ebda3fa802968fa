"""Conversions to GPT-J, back to CodeGen and to CTranslate2, each checked against the source model.

References: transformers' GPTJForCausalLM runs the GPT-J export; our CodeGenForCausalLM and transformers'
CodeGenForCausalLM run the source. Weights are random but with non-trivial layer norms and biases, so a
wrongly mapped tensor shows in the logits.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import randomize_
from safetensors.torch import load_file

from codegen_lm import CodeGenConfig, CodeGenForCausalLM
from codegen_lm import convert as conv
from codegen_lm.checkpoint import save_model, weight_files
from codegen_lm.convert import ConversionError, convert
from codegen_lm.hub import CheckpointNotFoundError
from codegen_lm.quantize import _has_vnni
from codegen_lm.tokenizer import CODEGEN_TOKENS

transformers.logging.set_verbosity_error()

SHAPES = {
    "rotary<head_dim-1layer": dict(n_layer=1, n_embd=64, n_head=4, rotary_dim=8),
    "rotary=head_dim-3layers": dict(n_layer=3, n_embd=64, n_head=4, rotary_dim=16),
    "8heads-n_inner": dict(n_layer=2, n_embd=96, n_head=8, rotary_dim=4, n_inner=200),
}


def random_model(seed: int = 0, **overrides) -> CodeGenForCausalLM:
    fields = dict(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128) | overrides
    torch.manual_seed(seed)
    return randomize_(CodeGenForCausalLM(CodeGenConfig(**fields)).eval())


def save_source(folder: Path, fmt: str = "safetensors", seed: int = 0, **overrides) -> Path:
    """A random CodeGen checkpoint in the official layout: safetensors or .bin, single, sharded or legacy pickle."""
    model = random_model(seed, **overrides)
    if fmt == "legacy-bin":
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    else:
        save_model(model, folder, safe_serialization="bin" not in fmt, max_shard_size=60_000 if "sharded" in fmt else "5GB")
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        out |= load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    return out


def load_gptj(folder: Path, **kwargs) -> transformers.GPTJForCausalLM:
    model, info = transformers.GPTJForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
    # A weight the export failed to write would be initialised at random: the load must account for all of them.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return save_source(tmp_path_factory.mktemp("src") / "codegen")


@pytest.fixture(scope="module")
def export(source: Path, tmp_path_factory) -> Path:
    return convert(source, tmp_path_factory.mktemp("gptj") / "gptj", "gptj")


# --- GPT-J export: logits and greedy generations ------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_gptj_export_logits_and_greedy_match_source(shape: str, tmp_path: Path) -> None:
    src = save_source(tmp_path / "src", seed=1, **SHAPES[shape])
    out = convert(src, tmp_path / "gptj", "gptj")

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gptj" and config["architectures"] == ["GPTJForCausalLM"]
    assert config["tie_word_embeddings"] is False and config["rotary_dim"] == SHAPES[shape]["rotary_dim"]

    gptj = load_gptj(out)
    ours = CodeGenForCausalLM.from_pretrained(src)
    reference = transformers.CodeGenForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = gptj(ids).logits
        assert (exported - ours(ids).logits).abs().max() < 1e-4
        assert (exported - reference(ids).logits).abs().max() < 1e-4

    prompt = ids[:, :6]
    greedy_gptj = gptj.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    greedy_ours = ours.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy_gptj, greedy_ours)
    assert len(set(greedy_ours[0, 6:].tolist())) > 3  # the comparison is not between two collapsed outputs


def test_round_trip_is_bit_identical(source: Path, export: Path, tmp_path: Path) -> None:
    back = convert(export, tmp_path / "codegen", "codegen")
    before, after = tensors(source), tensors(back)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype == torch.float32
        assert torch.equal(after[name], tensor), name
    assert CodeGenConfig.from_pretrained(back).to_dict() == CodeGenConfig.from_pretrained(source).to_dict()
    assert set(tensors(export)) == set(before) - {k for k in before if "qkv_proj" in k} | {
        k.replace("qkv_proj", p) for k in before if "qkv_proj" in k for p in ("q_proj", "k_proj", "v_proj")
    }


@pytest.mark.parametrize("fmt", ["safetensors-sharded", "bin", "bin-sharded", "legacy-bin"])
def test_every_source_format_gives_the_same_export(fmt: str, export: Path, tmp_path: Path) -> None:
    src = save_source(tmp_path / "src", fmt)
    files = {p.name for p in src.iterdir()}
    assert ("model.safetensors.index.json" in files) == (fmt == "safetensors-sharded")
    assert ("pytorch_model.bin.index.json" in files) == (fmt == "bin-sharded")
    out = tensors(convert(src, tmp_path / "gptj", "gptj"))
    expected = tensors(export)
    assert out.keys() == expected.keys()
    assert all(torch.equal(out[k], expected[k]) for k in expected)


def test_sharded_export_loads_in_transformers(source: Path, export: Path, tmp_path: Path) -> None:
    out = convert(source, tmp_path / "gptj", "gptj", max_shard_size=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in out.glob("model-*.safetensors"))
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors(export).values())
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert torch.equal(load_gptj(out)(ids).logits, load_gptj(export)(ids).logits)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dtype_casts_every_tensor_and_round_trips(dtype: str, source: Path, tmp_path: Path) -> None:
    torch_dtype = conv.DTYPES[dtype]
    out = convert(source, tmp_path / "gptj", "gptj", dtype=dtype)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(torch_dtype).removeprefix("torch.")
    assert {t.dtype for t in tensors(out).values()} == {torch_dtype}
    assert load_gptj(out, dtype="auto").dtype == torch_dtype
    back = tensors(convert(out, tmp_path / "codegen", "codegen"))
    for name, tensor in tensors(source).items():
        assert torch.equal(back[name], tensor.to(torch_dtype)), name
    # and an fp16/bf16 GPT-J export converts back to fp32 exactly (every half value is a float)
    back32 = tensors(convert(out, tmp_path / "codegen32", "codegen", dtype="fp32"))
    assert all(torch.equal(back32[k], back[k].float()) for k in back)


def test_tokenizer_and_generation_files_travel_along(tmp_path: Path) -> None:
    src = save_source(tmp_path / "src")
    data = Path(conv.__file__).parent / "data"
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(data / name, src / name)
    (src / "generation_config.json").write_text('{"bos_token_id": 50256}\n')
    out = convert(src, tmp_path / "gptj", "gptj")
    for name in ("vocab.json", "merges.txt", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    back = convert(out, tmp_path / "codegen", "codegen")
    assert (back / "vocab.json").read_bytes() == (src / "vocab.json").read_bytes()


# --- CTranslate2 --------------------------------------------------------------------------------------------


def ct2_greedy(folder: Path, prompts: list[list[int]], steps: int, compute_type: str) -> list[list[int]]:
    import ctranslate2

    generator = ctranslate2.Generator(str(folder), device="cpu", compute_type=compute_type)
    vocab = json.loads((folder / "vocabulary.json").read_text())
    results = generator.generate_batch(
        [[vocab[i] for i in p] for p in prompts], max_length=steps, sampling_topk=1, include_prompt_in_result=False
    )
    return [r.sequences_ids[0] for r in results]


def ct2_logits(folder: Path, ids: list[int], compute_type: str) -> torch.Tensor:
    import ctranslate2
    import numpy as np

    generator = ctranslate2.Generator(str(folder), device="cpu", compute_type=compute_type)
    vocab = json.loads((folder / "vocabulary.json").read_text())
    return torch.from_numpy(np.array(generator.forward_batch([[vocab[i] for i in ids]])))[0]


PROMPTS = [[15496, 995, 50284, 87, 796], [4299, 23748, 62, 6894, 33529, 198]]


@pytest.fixture(scope="module")
def ct2_source(tiny_checkpoint: Path, tmp_path_factory) -> Path:
    """The conftest checkpoint's shape and tokenizer (real vocabulary), with weights that do not collapse, and padding
    logit rows that never win, as in the released checkpoints (ours never samples them; CTranslate2 does not know them)."""
    torch.manual_seed(0)
    model = randomize_(CodeGenForCausalLM.from_pretrained(tiny_checkpoint))
    with torch.no_grad():
        model.lm_head.bias[CODEGEN_TOKENS:] = -30.0  # (the real rows' logits spread about 1)
    folder = tmp_path_factory.mktemp("ct2src") / "codegen"
    model.save_pretrained(folder)
    for name in conv.SIDE_FILES:
        if (tiny_checkpoint / name).is_file():
            shutil.copy(tiny_checkpoint / name, folder / name)
    return folder


@pytest.mark.slow
def test_ctranslate2_fp32_matches_source(ct2_source: Path, tmp_path: Path) -> None:
    ours = CodeGenForCausalLM.from_pretrained(ct2_source)
    expected = [ours.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist() for p in PROMPTS]
    assert all(len(set(e)) > 3 for e in expected)

    out = convert(ct2_source, tmp_path / "ct2", "ctranslate2", quantization="float32")
    assert {"model.bin", "vocabulary.json", "config.json"} <= {p.name for p in out.iterdir()}
    assert ct2_greedy(out, PROMPTS, 12, "float32") == expected
    with torch.no_grad():
        reference = ours(torch.tensor([PROMPTS[1]])).logits[0]
    assert (ct2_logits(out, PROMPTS[1], "float32") - reference).abs().max() < 1e-4

    # from the GPT-J export too (CTranslate2's GPT-J loader), with the tokenizer files carried along
    gptj = convert(ct2_source, tmp_path / "gptj", "gptj")
    out2 = convert(gptj, tmp_path / "ct2-from-gptj", "ctranslate2", dtype="fp32")
    assert ct2_greedy(out2, PROMPTS, 12, "float32") == expected


@pytest.mark.slow
def test_ctranslate2_int8_agreement_is_reported(ct2_source: Path, tmp_path: Path, record_property) -> None:
    ours = CodeGenForCausalLM.from_pretrained(ct2_source)
    out = convert(ct2_source, tmp_path / "ct2", "ctranslate2", quantization="int8")
    assert json.loads((out / "config.json").read_text())  # written by CTranslate2
    ids = list(range(1000, 1064))
    with torch.no_grad():
        reference = ours(torch.tensor([ids])).logits[0]
    int8 = ct2_logits(out, ids, "int8")
    top1 = (int8.argmax(-1) == reference.argmax(-1)).float().mean().item()
    greedy_ours = [ours.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False)[0, len(p):].tolist() for p in PROMPTS]
    greedy_int8 = ct2_greedy(out, PROMPTS, 16, "int8")
    same = sum(a == b for g, h in zip(greedy_ours, greedy_int8) for a, b in zip(g, h)) / sum(map(len, greedy_ours))
    error = ((int8 - reference).abs().max() / reference.abs().max()).item()
    print(f"\nCTranslate2 int8 vs fp32 source: top-1 agreement {top1:.1%} over {len(ids)} positions, "
          f"greedy tokens equal {same:.1%}, max |logit diff| / max |logit| {error:.3f}")
    record_property("ct2_int8_top1_agreement", top1)
    record_property("ct2_int8_greedy_token_agreement", same)
    # int8 rounding, not a broken conversion (that gives a top-1 agreement near 0). CTranslate2's own int8 kernels
    # are less exact on CPUs without VNNI: max error 0.33 and top-1 69 % on an AVX2-only EPYC, 0.035 and 91 % with
    # AVX-512 VNNI.
    assert error < (0.1 if _has_vnni() else 0.5) and top1 > 0.5


def test_ctranslate2_needs_its_packages(source: Path, tmp_path: Path, monkeypatch) -> None:
    real = conv.importlib.util.find_spec
    monkeypatch.setattr(conv.importlib.util, "find_spec", lambda name: None if name == "ctranslate2" else real(name))
    with pytest.raises(ConversionError, match=r"needs the ctranslate2 package.*pip install"):
        convert(source, tmp_path / "ct2", "ctranslate2")
    assert not (tmp_path / "ct2").exists()


def test_ctranslate2_needs_tokenizer_files(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="no tokenizer files"):
        convert(source, tmp_path / "ct2", "ctranslate2")


# --- errors and atomic writes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(to="onnx"), "unknown format 'onnx'; choose one of gptj, codegen, ctranslate2"),
        (dict(to="gptj", dtype="int4"), "unknown dtype 'int4'"),
        (dict(to="gptj", quantization="int8"), "--quantization applies to --to ctranslate2 only"),
        (dict(to="ctranslate2", quantization="int3"), "unknown quantization 'int3'"),
        (dict(to="ctranslate2", quantization="int8", dtype="fp16"), "either --dtype or --quantization"),
        (dict(to="codegen"), "already in the CodeGen layout"),
    ],
)
def test_bad_options(kwargs: dict, message: str, source: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=message.replace("(", r"\(")):
        convert(source, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_gptj_source_cannot_go_to_gptj(export: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="already a GPT-J checkpoint; use --to codegen"):
        convert(export, tmp_path / "out", "gptj")


@pytest.mark.parametrize("to", ["gptj", "codegen", "ctranslate2"])
def test_other_architectures_are_refused(to: str, tmp_path: Path) -> None:
    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ConversionError, match="is a 'llama' model"):
        convert(src, tmp_path / "out", to)


def test_missing_files(tmp_path: Path, source: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="neither an existing folder nor a valid hub id"):
        convert(tmp_path / "nowhere" / "x", tmp_path / "out", "gptj")
    with pytest.raises(CheckpointNotFoundError, match="not in the hub cache"):
        convert("Salesforce/not-a-cached-model", tmp_path / "out", "gptj")  # tests run offline

    no_config = tmp_path / "no-config"
    no_config.mkdir()
    with pytest.raises(CheckpointNotFoundError, match="config.json not found"):
        convert(no_config, tmp_path / "out", "gptj")

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(source / "config.json", no_weights)
    with pytest.raises(CheckpointNotFoundError, match="no weights"):
        convert(no_weights, tmp_path / "out", "gptj")

    (no_weights / "adapter_config.json").write_text("{}")
    with pytest.raises(ConversionError, match="LoRA adapter, not full weights; merge it"):
        convert(no_weights, tmp_path / "out", "gptj")

    missing_shard = save_source(tmp_path / "missing-shard", "safetensors-sharded")
    next(missing_shard.glob("model-00002-*")).unlink()
    with pytest.raises(CheckpointNotFoundError, match="model-00002"):
        convert(missing_shard, tmp_path / "out", "gptj")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["config.json", "model.safetensors", "pytorch_model.bin"])
def test_unreadable_files(damage: str, tmp_path: Path) -> None:
    src = save_source(tmp_path / "src", "bin" if damage.endswith(".bin") else "safetensors")
    (src / damage).write_bytes(b"\x00garbage{")
    with pytest.raises(ConversionError) as error:
        convert(src, tmp_path / "out", "gptj")
    message = str(error.value)
    assert damage in message and "re-download" in message and "\n" not in message, message
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_weights_that_do_not_fit_the_config(source: Path, tmp_path: Path) -> None:
    state = tensors(source)
    config = json.loads((source / "config.json").read_text())

    def variant(name: str, state: dict, **config_changes) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config | config_changes))
        torch.save(state, folder / "pytorch_model.bin")
        return folder

    deeper = variant("deeper", state, n_layer=config["n_layer"] + 1)
    with pytest.raises(ConversionError, match=r"lacks \d+ tensor\(s\).*transformer.h.2.ln_1.weight"):
        convert(deeper, tmp_path / "out", "gptj")
    wider = variant("wider", state, n_inner=4 * config["n_embd"] + 8)
    with pytest.raises(ConversionError, match=r"mlp.fc_in.weight .* has shape \[256, 64\] but config.json implies \[264, 64\]"):
        convert(wider, tmp_path / "out", "gptj")
    lora = variant("lora", state | {"transformer.h.0.attn.out_proj.lora_A.weight": torch.zeros(4, 64)})
    with pytest.raises(ConversionError, match="merge LoRA adapters first"):
        convert(lora, tmp_path / "out", "gptj")
    buffers = variant("buffers", state | {"transformer.h.0.attn.causal_mask": torch.ones(1, 1, 8, 8, dtype=torch.bool)})
    assert tensors(convert(buffers, tmp_path / "out", "gptj")).keys() == tensors(convert(source, tmp_path / "ref", "gptj")).keys()


def test_existing_destination_needs_force(source: Path, export: Path, tmp_path: Path) -> None:
    dst = tmp_path / "gptj"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists; pass --force"):
        convert(source, dst, "gptj")
    assert (dst / "keep.txt").read_text() == "mine"
    convert(source, dst, "gptj", force=True)
    assert not (dst / "keep.txt").exists()
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in export.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["gptj"]  # no temporary folders left beside it

    with pytest.raises(ConversionError, match="would replace the source"):
        convert(source, source, "gptj", force=True)
    with pytest.raises(ConversionError, match="would replace the source"):
        convert(source, source.parent, "gptj", force=True)


def test_failed_conversion_leaves_destination_untouched(source: Path, tmp_path: Path, monkeypatch) -> None:
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real_save(tensors, path, metadata=metadata)

    real_save = conv.save_file
    monkeypatch.setattr(conv, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        convert(source, tmp_path / "new", "gptj", max_shard_size=100_000)
    assert list(tmp_path.iterdir()) == []

    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    calls.clear()
    with pytest.raises(OSError):
        convert(source, old, "gptj", max_shard_size=100_000, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (old / "keep.txt").read_text() == "mine"


# --- command line -------------------------------------------------------------------------------------------


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from codegen_lm import cli

    monkeypatch.setattr(sys, "argv", ["codegen-lm", *args])
    with pytest.raises(SystemExit) as exit:
        cli.main()
    out = capsys.readouterr()
    return exit.value.code, out.out, out.err


def test_cli_converts_and_reports_errors_in_one_line(source: Path, export: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    code, out, err = run_cli(monkeypatch, capsys, "convert", str(source), str(tmp_path / "gptj"), "--to", "gptj", "--dtype", "bf16")
    assert code == 0 and f"wrote {tmp_path / 'gptj'} (gptj" in out
    assert "no tokenizer files" in err  # the source has none: the user is told to bring them
    assert {t.dtype for t in tensors(tmp_path / "gptj").values()} == {torch.bfloat16}

    for args, message in [
        (["--to", "gptj"], "already exists; pass --force"),
        (["--to", "tflite"], "unknown format 'tflite'"),
        (["--to", "gptj", "--max-shard-size", "lots"], "--max-shard-size 'lots' is not a size"),
    ]:
        code, out, err = run_cli(monkeypatch, capsys, "convert", str(source), str(tmp_path / "gptj"), *args)
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    code, _, err = run_cli(monkeypatch, capsys, "convert", str(export), str(tmp_path / "x"), "--to", "gptj")
    assert code == 2 and "already a GPT-J checkpoint" in err and "Traceback" not in err
