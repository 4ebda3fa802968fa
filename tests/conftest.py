"""Shared fixtures. Tests never touch the network: the hub is forced offline."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside this checkout")
    return SHARED


DATA = REPO / "src" / "codegen_lm" / "data"


def build_model(seed: int = 0, **overrides):
    """A small random-weight CodeGenForCausalLM (std 0.02, so greedy output does not collapse at once)."""
    import torch

    from codegen_lm import CodeGenConfig, CodeGenForCausalLM

    fields = dict(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256)
    fields.update(overrides)
    torch.manual_seed(seed)
    return CodeGenForCausalLM(CodeGenConfig(**fields)).eval()


def save_checkpoint(folder: Path, seed: int = 0, with_tokenizer: bool = True, **overrides) -> Path:
    """Save a random model in the official layout, plus the GPT-2 BPE tokenizer files a checkpoint carries."""
    import shutil

    build_model(seed, **overrides).save_pretrained(folder)
    if with_tokenizer:
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(DATA / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint with the real tokenizer's vocabulary (51200 rows, like the released models)."""
    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "codegen-tiny", vocab_size=51200, n_positions=2048)


def require_bwrap() -> None:
    """Skip where bubblewrap cannot isolate programs; fail instead when CODEGEN_LM_REQUIRE_SANDBOX=1 (``.ci/run``
    sets it), so that a broken sandbox never hides behind a skip line in CI."""
    from codegen_lm.sandbox import bwrap_problem

    problem = bwrap_problem()
    if problem:
        if os.environ.get("CODEGEN_LM_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"bubblewrap unusable ({problem}) and CODEGEN_LM_REQUIRE_SANDBOX=1")
        pytest.skip(f"bubblewrap unusable: {problem}")
