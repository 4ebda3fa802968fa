"""The training loop: schedule, weight-decay groups, loss, convergence, resume, DDP/FSDP, LoRA, outputs, errors."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import sys

import pytest
import torch
from conftest import relative_error

from codegen_lm.config import CodeGenConfig
from codegen_lm.model import CodeGenForCausalLM
from codegen_lm.train.loop import TrainConfig, lm_loss, lr_factor, param_groups, read_metrics, train

TINY_MODEL = {"vocab_size": 304, "n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4, "n_positions": 64}


def _byte_tokenizer(folder) -> str:
    """A byte-level BPE with no merges (+ CodeGen's whitespace tokens and EOS: 295 tokens) so models stay tiny."""
    from codegen_lm.tokenizer import _bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode()[b] for b in range(256))}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return str(folder)


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory) -> str:
    return _byte_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(24):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(2 + i % 5))
        (root / f"m{i:02d}.py").write_text(body, encoding="utf-8")
    return root


@pytest.fixture
def make_cfg(tmp_path, corpus, tiny_tok):
    def make(**overrides) -> TrainConfig:
        base = dict(
            out=str(tmp_path / "out"), data=[str(corpus)], config=json.dumps(TINY_MODEL), tokenizer=tiny_tok,
            seq_len=32, batch_size=4, steps=12, lr=3e-3, warmup_steps=2, val_fraction=0.15, log_interval=1,
            eval_interval=6, eval_batches=2, save_interval=4, keep_last=2, cache_dir=str(tmp_path.parent / "train-cache"),
            progress=False, device="cpu",
        )
        return TrainConfig(**{**base, **overrides})

    return make


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two threads run ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def losses(out) -> list[float]:
    return [m["loss"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m]


# ---- pure pieces ----------------------------------------------------------------------------------------


def test_lr_schedule():
    warmup, total, floor = 10, 110, 0.1
    f = [lr_factor(s, warmup, total, floor) for s in range(total)]
    assert f[:warmup] == pytest.approx([(s + 1) / (warmup + 1) for s in range(warmup)])  # linear ramp, never 0
    assert f[warmup] == pytest.approx(1.0)  # the peak right after warmup
    assert f[warmup + 50] == pytest.approx(floor + (1 - floor) * 0.5)  # cosine half way
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1 :]))
    assert lr_factor(total, warmup, total, floor) == pytest.approx(floor)
    assert lr_factor(total + 5, warmup, total, floor) == pytest.approx(floor)  # stays at the floor


def test_weight_decay_groups():
    model = CodeGenForCausalLM(CodeGenConfig(**TINY_MODEL))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)].removeprefix("transformer.h.0.").removeprefix("transformer.h.1.") for p in decay["params"]}
    assert decayed == {"transformer.wte.weight", "attn.qkv_proj.weight", "attn.out_proj.weight", "mlp.fc_in.weight",
                       "mlp.fc_out.weight", "lm_head.weight"}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert skipped and all(n.endswith("bias") or ".ln_" in n for n in skipped)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_lm_loss_matches_model_and_z_loss():
    torch.manual_seed(0)
    model = CodeGenForCausalLM(CodeGenConfig(**TINY_MODEL))
    ids = torch.randint(0, 300, (2, 16))
    labels = ids.clone()
    labels[1, 10:] = -100
    out = model(ids, labels=labels)
    loss, ce = lm_loss(out.logits, labels)
    assert torch.allclose(ce, out.loss) and loss is ce
    z_loss, ce2 = lm_loss(out.logits, labels, z_loss=1e-2)
    keep = labels[:, 1:].reshape(-1) != -100
    lse = torch.logsumexp(out.logits[:, :-1].reshape(-1, 304)[keep], dim=-1)
    assert torch.allclose(z_loss, ce2 + 1e-2 * (lse**2).mean())


# ---- runs -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_loss_decreases_and_outputs(make_cfg, tmp_path):
    cfg = make_cfg(steps=40, eval_interval=20, z_loss=1e-4)
    last = train(cfg)
    out = tmp_path / "out"
    values = losses(out)
    assert len(values) == 40
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5 - 1.5  # from ~ln(304)=5.7 towards the code's low entropy
    records = read_metrics(out / "metrics.jsonl")
    val = [m for m in records if "val_loss" in m]
    assert [m["step"] for m in val] == [20, 40] and val[1]["val_loss"] < val[0]["val_loss"]
    assert last["val_ppl"] == pytest.approx(math.exp(last["val_loss"]))
    assert all(m["tokens_per_s"] > 0 and m["lr"] > 0 for m in records if "loss" in m)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000036", "step-00000040"]  # keep_last=2

    # The final model (and every checkpoint) loads with ours and with transformers, with the same logits.
    from codegen_lm.checkpoint import load_model
    from codegen_lm.tokenizer import AutoTokenizer

    ours = load_model(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok.encode("def f1_2(x):\n    return")])
    import transformers
    theirs = transformers.CodeGenForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits.float(), rtol=1e-4, atol=1e-4)
    assert load_model(out / "checkpoints" / "step-00000040").state_dict()["lm_head.bias"].equal(ours.state_dict()["lm_head.bias"])


def test_resume_matches_uninterrupted(make_cfg, tmp_path):
    full = make_cfg(out=str(tmp_path / "full"))
    train(full)

    def interrupt(step, metrics):
        if step == 7:
            raise KeyboardInterrupt

    cut = make_cfg(out=str(tmp_path / "cut"))
    with pytest.raises(KeyboardInterrupt):
        train(cut, on_step=interrupt)
    assert len(losses(tmp_path / "cut")) == 7  # steps 5-7 come after the last checkpoint (step 4) ...
    (tmp_path / "cut").rename(tmp_path / "moved")  # a run folder may be moved before it is resumed
    train(dataclasses.replace(cut, out=str(tmp_path / "moved"), resume=True, log_interval=1))
    assert losses(tmp_path / "moved") == losses(tmp_path / "full")  # ... and are redone identically, not duplicated
    assert len(losses(tmp_path / "full")) == 12


@pytest.mark.parametrize("failing", ["checkpoint write", "checkpoint rename", "log line"])
def test_a_full_disk_loses_nothing_that_resuming_needs(make_cfg, tmp_path, monkeypatch, failing):
    """A checkpoint is written in a temporary folder and renamed into place: a disk that fills up while step 8's is
    written, or a failed rename, leaves step 4's whole. A metrics line cut short (step 9's) is dropped. Resuming
    then gives the uninterrupted run."""
    from codegen_lm.checkpoint import load_model
    from codegen_lm.train import loop

    full = make_cfg(out=str(tmp_path / "full"))
    train(full)
    cfg = make_cfg(out=str(tmp_path / "cut"))
    full_disk = OSError(28, "No space left on device")
    if failing == "checkpoint write":
        save = torch.save

        def fail(obj, path, *args, **kwargs):
            if "step-00000008" in str(path) and str(path).endswith("trainer_state.pt"):
                raise full_disk
            return save(obj, path, *args, **kwargs)

        monkeypatch.setattr(torch, "save", fail)
    elif failing == "checkpoint rename":
        rename = os.replace

        def fail(src, dst):
            if str(dst).endswith("step-00000008"):
                raise full_disk
            return rename(src, dst)

        monkeypatch.setattr(os, "replace", fail)
    else:
        append = loop._append_metrics

        def fail(path, record, env):
            if record["step"] == 9:
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record)[:12])
                raise full_disk
            append(path, record, env)

        monkeypatch.setattr(loop, "_append_metrics", fail)
    with pytest.raises(OSError, match="No space left"):
        train(cfg)
    monkeypatch.undo()
    checkpoints = tmp_path / "cut" / "checkpoints"
    last = "step-00000008" if failing == "log line" else "step-00000004"
    assert sorted(p.name for p in checkpoints.glob("step-*"))[-1] == last
    assert loop.latest_checkpoint(checkpoints) == checkpoints / last
    assert load_model(checkpoints / last).state_dict().keys() == load_model(tmp_path / "full").state_dict().keys()
    assert torch.load(checkpoints / last / "trainer_state.pt", weights_only=False)["step"] == int(last[-8:])
    train(dataclasses.replace(cfg, resume=True))
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


@pytest.mark.slow
def test_grad_checkpointing_and_accumulation_give_the_same_losses(make_cfg, tmp_path):
    train(make_cfg(out=str(tmp_path / "plain"), steps=5))
    train(make_cfg(out=str(tmp_path / "ckpt"), steps=5, grad_checkpointing=True, batch_size=2, grad_accum=2))
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)


def test_bf16_autocast_tracks_fp32(make_cfg, tmp_path):
    train(make_cfg(out=str(tmp_path / "fp32"), steps=3, warmup_steps=1))
    train(make_cfg(out=str(tmp_path / "bf16"), steps=3, warmup_steps=1, precision="bf16"))
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    # bf16 matmuls, fp32 master weights and loss: measured within 2e-4 of fp32's ~5.5 (an AMD Zen 4)
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, abs=2e-3)
    from codegen_lm.checkpoint import load_model

    assert load_model(tmp_path / "bf16").lm_head.weight.dtype == torch.float32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: TrainConfig) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(cfg)  # joins the process group and leaves it again
    assert not torch.distributed.is_initialized()


def _spawn(cfg: TrainConfig, world: int = 2) -> None:
    """Two processes on CPU joined through gloo, set up as torchrun would (the env variables it exports)."""
    torch.multiprocessing.spawn(_worker, args=(world, _free_port(), cfg), nprocs=world, join=True)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one(make_cfg, tmp_path, fsdp):
    single = make_cfg(out=str(tmp_path / "one"), steps=6, batch_size=4, save_interval=3, eval_interval=3)
    train(single)
    multi = make_cfg(out=str(tmp_path / "two"), steps=6, batch_size=2, save_interval=3, eval_interval=3, fsdp=fsdp)
    _spawn(multi)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [m["loss"] for m in two if "loss" in m] == pytest.approx([m["loss"] for m in one if "loss" in m], rel=1e-5)
    assert [m["val_loss"] for m in two if "val_loss" in m] == pytest.approx([m["val_loss"] for m in one if "val_loss" in m], rel=1e-5)
    from codegen_lm.checkpoint import load_model

    a, b = load_model(tmp_path / "one").state_dict(), load_model(tmp_path / "two").state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_lora_finetune_merges_into_a_full_checkpoint(make_cfg, tmp_path, tiny_tok):
    from codegen_lm.checkpoint import load_model

    torch.manual_seed(0)
    base = CodeGenForCausalLM(CodeGenConfig(**TINY_MODEL))
    base.save_pretrained(tmp_path / "base")
    cfg = make_cfg(config=None, model=str(tmp_path / "base"), lora_rank=4, lora_alpha=8, steps=8, lr=1e-2)
    train(cfg)
    out = tmp_path / "out"
    values = losses(out)
    assert values[-1] < values[0]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert "adapter.safetensors" in os.listdir(out / "checkpoints" / "step-00000008")
    merged, original = load_model(out).state_dict(), load_model(tmp_path / "base").state_dict()
    assert set(merged) == set(original)
    assert merged["transformer.wte.weight"].equal(original["transformer.wte.weight"])  # frozen outside the adapters
    # The merged checkpoint computes what the base model with the saved adapter computes (through peft, unmerged):
    # a wrong scale (alpha / r) or a qkv layout mixed up in the merge or the save would not.
    from peft import PeftModel

    ids = torch.randint(0, 295, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = load_model(tmp_path / "base")(ids).logits
        adapted = PeftModel.from_pretrained(load_model(tmp_path / "base"), str(out / "adapter")).eval()
        expected = adapted(ids).logits
        got = load_model(out)(ids).logits
    assert relative_error(base_logits, expected) > 0.01  # the adapter matters, so the comparison means something
    assert relative_error(got, expected) < 1e-5

    # Resuming a LoRA run restores the adapter and optimizer: the losses match an uninterrupted run.
    def interrupt(step, metrics):
        if step == 5:
            raise KeyboardInterrupt

    cut = dataclasses.replace(cfg, out=str(tmp_path / "cut"))
    with pytest.raises(KeyboardInterrupt):
        train(cut, on_step=interrupt)
    train(dataclasses.replace(cut, resume=True))
    assert losses(tmp_path / "cut") == pytest.approx(values, rel=1e-6)


# ---- bad input and the command line ---------------------------------------------------------------------


def test_output_folder_guards(make_cfg, tmp_path):
    cfg = make_cfg(steps=2, warmup_steps=1, save_interval=1)
    train(cfg)
    with pytest.raises(ValueError, match="already holds a training run.*--resume"):
        train(cfg)
    with pytest.raises(ValueError, match=r"--resume with different settings.*lr: 0\.003 -> 0\.001"):
        train(dataclasses.replace(cfg, resume=True, lr=1e-3))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and holds no training run"):
        train(dataclasses.replace(cfg, out=str(tmp_path / "other")))
    with pytest.raises(ValueError, match="nothing to resume"):
        train(dataclasses.replace(cfg, out=str(tmp_path / "fresh"), resume=True))
    with pytest.raises(ValueError, match="--model to fine-tune a checkpoint, or --config"):
        train(dataclasses.replace(cfg, out=str(tmp_path / "fresh"), config=None))
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        train(dataclasses.replace(cfg, out=str(tmp_path / "fresh"), seq_len=128))
    assert not (tmp_path / "fresh").exists()  # a refused run leaves nothing behind


@pytest.mark.slow
def test_cli_train_and_errors(tmp_path, corpus, tiny_tok):
    from typer.testing import CliRunner

    from codegen_lm.cli import app

    runner = CliRunner()
    args = ["train", "--data", str(corpus), "--out", str(tmp_path / "out"), "--config", json.dumps(TINY_MODEL),
            "--tokenizer", tiny_tok, "--seq-len", "32", "--batch-size", "2", "--steps", "3", "--warmup", "1",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(read_metrics(tmp_path / "out" / "metrics.jsonl")) >= 1

    empty = tmp_path / "empty"
    empty.mkdir()
    cmd = [sys.executable, "-m", "codegen_lm.cli", *args[:2], str(empty), args[3], str(tmp_path / "o2"), *args[5:]]
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no files ending in .py under")
    assert "Traceback" not in proc.stderr
