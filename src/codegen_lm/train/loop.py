"""The training loop: AdamW + warmup/cosine, clipping, bf16 autocast, checkpoints, resume, DDP/FSDP, LoRA.

One process trains alone; under ``torchrun`` (WORLD_SIZE > 1) every process runs this same code, wrapped in
DDP (or FSDP2 with ``fsdp=True``). The blocks of each optimizer step are a pure function of the seed and
the step (``BlockOrder``), split evenly over ranks and micro-batches, so a run with N processes and a
resumed run see exactly the data of the one-process uninterrupted run with the same global batch.

Output folder::

    run.json               the settings of the run (guards against mixing two runs in one folder)
    metrics.jsonl          one line per logged step / evaluation
    loss.png               training and validation loss curves
    checkpoints/step-N/    config.json + model.safetensors (official layout) + trainer_state.pt (+ rng)
    config.json, model.safetensors, tokenizer files   the final model (LoRA merged into it)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..hub import atomic_write_text
from .data import DEFAULT_EXCLUDE, DEFAULT_EXTENSIONS, BlockOrder, DataSpec, PackedBlocks, prepare

LORA_TARGETS = ("qkv_proj", "out_proj", "fc_in", "fc_out")
# Settings that may change when resuming: they do not affect what is computed (out: a run folder may be moved).
RESUMABLE_CHANGES = {"out", "resume", "progress", "eval_interval", "eval_batches", "save_interval", "keep_last", "log_interval", "cache_dir", "device"}


@dataclass
class TrainConfig:
    out: str
    data: list[str]
    model: str | None = None  # fine-tune these weights (hub id or folder) ...
    config: str | None = None  # ... or train from scratch: preset name, config.json path or inline JSON
    tokenizer: str | None = None  # default: the model's, else the shipped CodeGen tokenizer
    seq_len: int = 2048
    batch_size: int = 8  # blocks per micro-batch per process
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int | None = None  # default: 5% of the steps, at most 3000 (DESIGN §5)
    steps: int | None = None
    epochs: float | None = None  # used when steps is None (default 1 epoch)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"  # auto | bf16 | fp32; auto = bf16 on GPUs that support it, fp32 on CPU
    z_loss: float = 0.0  # CodeGen used 1e-4
    grad_checkpointing: bool = False
    lora_rank: int = 0  # > 0: train LoRA adapters (peft) instead of all weights
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    fsdp: bool = False
    seed: int = 0
    val_fraction: float = 0.01
    extensions: list[str] = field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    text_field: str = "text"
    eval_interval: int = 200
    eval_batches: int = 20
    save_interval: int = 500
    keep_last: int = 2
    log_interval: int = 10
    cache_dir: str | None = None
    device: str | None = None
    resume: bool = False
    progress: bool = True


# --------------------------------------------------------------------------------------------------------
# Pure pieces: schedule, parameter groups, loss


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based): linear warmup, then cosine."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear and embedding weights), none on layer norms and biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to optimize, cross-entropy): next-token CE over labels != -100, plus z_loss · mean(logsumexp²)."""
    logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    targets = labels[:, 1:].reshape(-1)
    ce = F.cross_entropy(logits, targets, ignore_index=-100)
    if not z_loss:
        return ce, ce
    keep = targets != -100
    z = torch.logsumexp(logits[keep], dim=-1).pow(2).mean()
    return ce + z_loss * z, ce


# --------------------------------------------------------------------------------------------------------
# Processes


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return value

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value


@contextlib.contextmanager
def distributed(device: str | None) -> Iterator[Dist]:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR ...), if any,
    and leave it on the way out.

    Leaving matters: a process group still alive when the interpreter shuts down (FSDP's device mesh and
    the model's hook cycles keep one referenced) is torn down by C++ static destructors, and gloo's
    threads then abort the process now and then. A group the caller created stays theirs to destroy.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available here; use --device cpu")
        torch.cuda.set_device(dev)
    owned = world > 1 and not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    try:
        yield Dist(rank, world, local_rank, dev)
    finally:
        if owned:
            gc.collect()  # the finished run's modules, hooks and optimizer, before the group they reference
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------
# Building the model and tokenizer


def parse_model_config(spec: str) -> Any:
    """A preset name (codegen-350M-mono), a config.json path or folder/hub id, or an inline JSON object."""
    from ..config import CodeGenConfig

    if spec.lstrip().startswith("{"):
        try:
            return CodeGenConfig.from_dict(json.loads(spec))
        except json.JSONDecodeError as e:
            raise ValueError(f"--config is not valid JSON ({e.msg}); give a preset, a config.json or a JSON object") from None
    return CodeGenConfig.from_pretrained(spec)


def load_tokenizer(cfg: TrainConfig) -> Any:
    from ..hub import resolve_file
    from ..tokenizer import AutoTokenizer, CodeGenTokenizerFast

    name = cfg.tokenizer
    if name is None and cfg.model is not None and resolve_file(cfg.model, "tokenizer_config.json", required=False):
        name = cfg.model
    return AutoTokenizer.from_pretrained(name) if name else CodeGenTokenizerFast()


def build_model(cfg: TrainConfig) -> nn.Module:
    from ..model import CodeGenForCausalLM

    if (cfg.model is None) == (cfg.config is None):
        raise ValueError("pass --model to fine-tune a checkpoint, or --config to train from scratch (not both)")
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and on resume
    if cfg.model is not None:
        from ..checkpoint import load_model

        model = load_model(cfg.model, dtype=torch.float32)
    else:
        model = CodeGenForCausalLM(parse_model_config(cfg.config))
    model.train()
    if cfg.grad_checkpointing:
        model.transformer.gradient_checkpointing = True
    if cfg.lora_rank > 0:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ValueError("LoRA needs the peft package: pip install 'codegen-lm[train]'") from None
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=list(LORA_TARGETS))
        model = get_peft_model(model, lora)
    return model


def base_model(model: nn.Module) -> nn.Module:
    """The CodeGenForCausalLM inside DDP / PEFT wrappers."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _fully_shard() -> Callable[..., Any]:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def wrap_distributed(model: nn.Module, cfg: TrainConfig, env: Dist) -> nn.Module:
    if env.world == 1:
        return model
    if cfg.fsdp:
        if cfg.lora_rank:
            raise ValueError("LoRA with --fsdp is not supported; LoRA models fit one device, drop --fsdp to use DDP")
        fully_shard = _fully_shard()
        for block in base_model(model).transformer.h:
            fully_shard(block)
        fully_shard(model)
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


# --------------------------------------------------------------------------------------------------------
# Checkpoints


def _state_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_parameters(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Whole parameters by name, on CPU, in the model's in-memory layout (a collective under FSDP).

    Parameters rather than ``state_dict()``: the model's state-dict hooks re-order qkv rows, which does not
    work on FSDP's sharded tensors; here the re-ordering happens once, on whole tensors, when writing.
    """
    return {name: _full(p.detach()).cpu() for name, p in _unwrap(model).named_parameters()
            if p.requires_grad or not trainable_only}


def load_parameters(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the (possibly sharded) parameters of the same names."""
    params = dict(_unwrap(model).named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"checkpoint parameter {unknown[0]!r} is not in the model; was it written by another run?")
    with torch.no_grad():
        for name, tensor in tensors.items():
            p = params[name]
            if hasattr(p, "device_mesh"):  # FSDP: keep this rank's shard
                from torch.distributed.tensor import distribute_tensor

                tensor = distribute_tensor(tensor.to(p.device), p.device_mesh, p.placements)
            p.copy_(tensor)


def write_model(params: dict[str, torch.Tensor], config: Any, folder: Path) -> None:
    """config.json + model.safetensors in the official layout (lead's save_model) from whole parameters."""
    from ..checkpoint import save_model
    from ..model import CodeGenForCausalLM

    with torch.device("meta"):
        shell = CodeGenForCausalLM(config)
    for name, tensor in params.items():
        module, _, attr = name.rpartition(".")
        setattr(shell.get_submodule(module), attr, nn.Parameter(tensor, requires_grad=False))
    save_model(shell, folder)


def save_checkpoint(folder: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, cfg: TrainConfig, env: Dist) -> None:
    """checkpoints/step-N, written into a temporary folder and renamed: a crash never leaves half of one."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    params = full_parameters(model, trainable_only=bool(cfg.lora_rank))
    optim_state = get_optimizer_state_dict(model, optimizer, options=_state_options())
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-step-{step:08d}"
    if env.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    env.barrier()
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if env.device.type == "cuda" else None}
    torch.save(rng, tmp / f"rng-{env.rank}.pt")
    env.barrier()
    if env.main:
        if cfg.lora_rank:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in params.items()}, tmp / "adapter.safetensors")
        else:
            write_model(params, base_model(model).config, tmp)
        torch.save({"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict()}, tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(folder.glob("step-*"))[: -cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    env.barrier()


def latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step-*") if (p / "trainer_state.pt").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig, env: Dist) -> int:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if cfg.lora_rank:
        from safetensors.torch import load_file

        tensors = load_file(path / "adapter.safetensors")
    else:
        from ..checkpoint import load_model

        tensors = dict(load_model(path, dtype=torch.float32).named_parameters())
    load_parameters(model, tensors)
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_state_options())
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / f"rng-{env.rank}.pt"
    if rng_file.is_file():  # absent when resuming on more processes than wrote the checkpoint
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and env.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
    return int(state["step"])


# --------------------------------------------------------------------------------------------------------
# Output folder, metrics, plot


def _run_settings(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES}


def check_out_dir(cfg: TrainConfig, data_key: str | None) -> dict[str, Any]:
    """Refuse to mix runs: a fresh run needs an empty folder, --resume needs the same run's folder (and data,
    unless ``data_key`` is None: the early check, before the data is tokenized).

    Returns what ``run.json`` should hold (written once the model is built, so a bad --config leaves no trace).
    """
    out = Path(cfg.out)
    run_file = out / "run.json"
    settings = {"settings": _run_settings(cfg), "data": data_key}
    if run_file.is_file():
        if not cfg.resume:
            raise ValueError(f"{out} already holds a training run (run.json); pass --resume to continue it or choose another --out")
        saved = json.loads(run_file.read_text(encoding="utf-8"))
        if data_key is not None and saved["data"] != data_key:
            raise ValueError(f"the data changed since the run in {out} started (different tokens); resume needs the same data")
        changed = sorted(k for k in (set(saved["settings"]) | set(settings["settings"])) - RESUMABLE_CHANGES
                         if saved["settings"].get(k) != settings["settings"].get(k))
        if changed:
            diffs = ", ".join(f"{k}: {saved['settings'].get(k)!r} -> {settings['settings'].get(k)!r}" for k in changed)
            raise ValueError(f"--resume with different settings than the run in {out} ({diffs}); use the same ones")
        return settings
    if cfg.resume:
        raise ValueError(f"nothing to resume in {out} (no run.json); drop --resume to start a new run")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no training run; choose a new or empty --out folder")
    return settings


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl. A last line without its newline was cut short (a full disk, a crash while
    appending) and is left out: it comes after the last checkpoint, so resuming redoes and logs its step again."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # the last: "" after the final newline, or a torn line
    return [json.loads(line) for line in lines if line.strip()]


def plot_losses(metrics: list[dict[str, Any]], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..hub import atomic_write_bytes

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: nn.Module, blocks: PackedBlocks, batch_size: int, max_batches: int, autocast: Any, env: Dist) -> float:
    """Mean next-token cross-entropy over up to ``max_batches`` global batches of validation blocks."""
    n = min(len(blocks), max_batches * batch_size * env.world)
    mine = list(range(env.rank, n, env.world))
    steps = -(-n // (batch_size * env.world))  # the same on every rank (FSDP runs collectives in forward)
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    model.eval()
    for s in range(steps):
        idx = mine[s * batch_size : (s + 1) * batch_size]
        ids, labels = blocks.batch(idx or [0])
        labels = torch.from_numpy(labels).to(env.device)
        if not idx:
            labels.fill_(-100)  # a rank with no blocks left still takes part in the forward
        with autocast:
            logits = model(torch.from_numpy(ids).to(env.device)).logits
        logits, targets = logits[:, :-1].float(), labels[:, 1:]
        total[0] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
        total[1] += (targets != -100).sum()
    model.train()
    for module in model.modules():  # FSDP keeps the root unsharded after a forward with no backward
        if hasattr(module, "reshard"):
            module.reshard()
    total = env.sum(total)
    return float(total[0] / total[1]) if total[1] else float("nan")


# --------------------------------------------------------------------------------------------------------
# The run


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; use auto, bf16 or fp32")


def _console(env: Dist) -> Any:
    from rich.console import Console

    return Console(stderr=True, quiet=not env.main)


def _progress_bar(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled,
    )


def train(cfg: TrainConfig, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) training as ``cfg`` says; returns the last metrics. ``on_step(step, metrics)`` is
    called after every optimizer step on every rank (for notebooks and custom logging)."""
    with distributed(cfg.device) as env:
        return _train(cfg, env, on_step)


def _train(cfg: TrainConfig, env: Dist, on_step: Callable[[int, dict[str, Any]], None] | None) -> dict[str, Any]:
    console = _console(env)
    out = Path(cfg.out)
    autocast = _autocast(cfg.precision, env.device)
    tokenizer = load_tokenizer(cfg)
    eos = tokenizer.eos_token_id if getattr(tokenizer, "eos_token_id", None) is not None else 50256

    check_out_dir(cfg, None)  # fail before a long tokenization
    # Data: the first process on each machine tokenizes (or finds the cache); the others then read it.
    spec = DataSpec(tuple(cfg.data), tuple(cfg.extensions), tuple(cfg.exclude), cfg.text_field, cfg.val_fraction)
    if env.local_rank == 0:
        data = prepare(spec, tokenizer, cfg.cache_dir, eos, progress=cfg.progress and env.main)
    env.barrier()
    if env.local_rank != 0:
        data = prepare(spec, tokenizer, cfg.cache_dir, eos, progress=False)
    train_blocks = PackedBlocks(data.train, cfg.seq_len, eos)
    val_blocks = PackedBlocks(data.val, cfg.seq_len, eos)
    global_batch = cfg.batch_size * cfg.grad_accum * env.world
    total_steps = cfg.steps if cfg.steps is not None else math.ceil((cfg.epochs or 1.0) * len(train_blocks) / global_batch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(3000, total_steps // 20)
    _check_settings(cfg, total_steps, warmup)

    run_settings = check_out_dir(cfg, data.directory.name)
    env.barrier()  # every rank has checked before rank 0 writes run.json
    model = build_model(cfg)
    config = base_model(model).config
    if cfg.seq_len > config.n_positions:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's {config.n_positions} positions; lower --seq-len")
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size}; raise vocab_size")
    model.to(env.device)
    model = wrap_distributed(model, cfg, env)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=env.device.type in ("cuda", "cpu") or None)  # one kernel per step, not ~10 passes per tensor
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps, cfg.min_lr_ratio))

    if env.main:
        atomic_write_text(out / "run.json", json.dumps(run_settings, indent=2, default=str) + "\n")
    ckpt_dir = out / "checkpoints"
    metrics_path = out / "metrics.jsonl"
    start = 0
    latest = latest_checkpoint(ckpt_dir) if cfg.resume else None
    if latest is not None:
        start = load_checkpoint(latest, model, optimizer, scheduler, cfg, env)
    if env.main:  # drop metrics that an interrupted run logged after its last checkpoint
        kept = [m for m in read_metrics(metrics_path) if m["step"] <= start]
        atomic_write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in kept))

    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    console.print(f"data: {data.meta['summary']}; {data.meta['train_tokens']:,} train tokens in {len(train_blocks):,} "
                  f"blocks of {cfg.seq_len}, {data.meta['val_tokens']:,} validation tokens (cache {data.directory})")
    console.print(f"model: {n_params:,} parameters ({n_train:,} trained) on {env.world} x {env.device.type}; "
                  f"{total_steps} steps of {global_batch} blocks ({global_batch * cfg.seq_len:,} tokens)"
                  + (f", resuming after step {start}" if start else ""))

    order = BlockOrder(len(train_blocks), cfg.seed)
    per_rank = cfg.batch_size * cfg.grad_accum
    last: dict[str, Any] = {}
    window_loss = torch.zeros((), device=env.device)
    window_steps, window_start, window_tokens = 0, time.perf_counter(), 0
    with _progress_bar(cfg.progress and env.main) as bar:
        task = bar.add_task("train", total=total_steps, completed=start, loss=float("nan"), tps=0.0)
        for step in range(start, total_steps):
            mine = order.step_indices(step, global_batch)[env.rank * per_rank : (env.rank + 1) * per_rank]
            step_loss = torch.zeros((), device=env.device)
            for micro in range(cfg.grad_accum):
                ids, labels = train_blocks.batch(mine[micro * cfg.batch_size : (micro + 1) * cfg.batch_size])
                ids, labels = torch.from_numpy(ids).to(env.device), torch.from_numpy(labels).to(env.device)
                sync = micro == cfg.grad_accum - 1 or not isinstance(model, nn.parallel.DistributedDataParallel)
                with (contextlib.nullcontext() if sync else model.no_sync()):
                    with autocast:
                        logits = model(ids).logits
                    loss, ce = lm_loss(logits, labels, cfg.z_loss)
                    (loss / cfg.grad_accum).backward()
                step_loss += ce.detach() / cfg.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window_loss += step_loss
            window_steps += 1
            window_tokens += global_batch * cfg.seq_len
            done = step + 1

            if done % cfg.log_interval == 0 or done == total_steps:
                loss_value = float(env.mean(window_loss)) / window_steps
                elapsed = time.perf_counter() - window_start
                last = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": float(_full(grad_norm)),
                        "tokens": done * global_batch * cfg.seq_len, "tokens_per_s": window_tokens / elapsed}
                _append_metrics(metrics_path, last, env)
                bar.update(task, loss=loss_value, tps=last["tokens_per_s"])
                window_loss.zero_()
                window_steps, window_start, window_tokens = 0, time.perf_counter(), 0
            bar.update(task, completed=done)
            if len(val_blocks) and (done % cfg.eval_interval == 0 or done == total_steps):
                val_loss = evaluate(model, val_blocks, cfg.batch_size, cfg.eval_batches, autocast, env)
                record = {"step": done, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
                _append_metrics(metrics_path, record, env)
                last = {**last, **record}
                console.print(f"step {done}: validation loss {val_loss:.4f}, perplexity {record['val_ppl']:.2f}")
                if env.main:
                    plot_losses(read_metrics(metrics_path), out / "loss.png")
            if done % cfg.save_interval == 0 or done == total_steps:
                save_checkpoint(ckpt_dir, done, model, optimizer, scheduler, cfg, env)
            if on_step is not None:
                on_step(done, last)

    save_final(out, model, tokenizer, cfg, env)
    if env.main:
        plot_losses(read_metrics(metrics_path), out / "loss.png")
        console.print(f"model saved to {out} (load it with codegen_lm.load_model or transformers)")
    return last


def _full(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if hasattr(value, "full_tensor") else value  # FSDP returns a DTensor norm


def _append_metrics(path: Path, record: dict[str, Any], env: Dist) -> None:
    if env.main:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _check_settings(cfg: TrainConfig, total_steps: int, warmup: int) -> None:
    positive = {"seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "steps": total_steps,
                "eval_interval": cfg.eval_interval, "eval_batches": cfg.eval_batches, "save_interval": cfg.save_interval,
                "keep_last": cfg.keep_last, "log_interval": cfg.log_interval}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not 0 <= warmup < total_steps:
        raise ValueError(f"warmup ({warmup} steps) must be shorter than the run ({total_steps} steps); lower --warmup")
    if cfg.lr <= 0 or cfg.grad_clip <= 0 or cfg.weight_decay < 0 or cfg.z_loss < 0:
        raise ValueError("lr and grad_clip must be positive, weight_decay and z_loss not negative")


def save_final(out: Path, model: nn.Module, tokenizer: Any, cfg: TrainConfig, env: Dist) -> None:
    """The finished model in ``out``: full weights (LoRA merged in) + tokenizer, plus the adapter alone."""
    if cfg.lora_rank:
        if env.main:
            from ..checkpoint import save_model

            peft_model = _unwrap(model)
            peft_model.save_pretrained(str(out / "adapter"))
            save_model(peft_model.merge_and_unload(), out)
    else:
        params = full_parameters(model)
        if env.main:
            write_model(params, base_model(model).config, out)
    if env.main:
        tokenizer.save_pretrained(str(out))
    env.barrier()
