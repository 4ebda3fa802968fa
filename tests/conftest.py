"""Shared fixtures. Tests never touch the network (the hub is forced offline) nor the developer's caches: the
hub cache, XDG folders and our own cache live in a temporary folder for the whole session, set here before
anything imports huggingface_hub (which reads them once, at import), so what someone downloaded before cannot
change an outcome (a cached Salesforce/codegen-350M-mono, say)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

if "huggingface_hub" in sys.modules:  # a plugin imported it first: its cache paths are already fixed
    raise RuntimeError("huggingface_hub was imported before tests/conftest.py could point its cache at a temporary folder")
ISOLATED = Path(tempfile.mkdtemp(prefix="codegen-lm-tests-"))
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_HOME=str(ISOLATED / "hf"),
    HF_HUB_CACHE=str(ISOLATED / "hf" / "hub"),  # wins over HF_HOME, so a developer's own setting must go too
    XDG_CACHE_HOME=str(ISOLATED / "cache"),
    XDG_STATE_HOME=str(ISOLATED / "state"),  # chat sessions and history
    CODEGEN_LM_CACHE=str(ISOLATED / "codegen-lm"),  # tokenized training data
)
for legacy in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE", "HF_XET_CACHE",
               "HF_TOKEN_PATH"):  # these follow HF_HOME once unset
    os.environ.pop(legacy, None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_unconfigure(config) -> None:
    shutil.rmtree(ISOLATED, ignore_errors=True)


DATA = REPO / "src" / "codegen_lm" / "data"


def build_model(seed: int = 0, **overrides):
    """A small random-weight CodeGenForCausalLM as ``__init__`` makes it: matrices with std 0.02 (greedy output
    does not collapse into one repeated token, see ``randomize_``), biases 0, layer norms 1."""
    import torch

    from codegen_lm import CodeGenConfig, CodeGenForCausalLM

    fields = dict(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256)
    fields.update(overrides)
    torch.manual_seed(seed)
    return CodeGenForCausalLM(CodeGenConfig(**fields)).eval()


def randomize_(model):
    """Weights whose mistakes show in the logits: matrices with std 1/sqrt(fan_in), layer norms and biases away from
    1 and 0. Fresh from ``__init__`` the logits spread only ~0.16 (std), too little for a tolerance to tell a wrong
    tensor from rounding, and every bias is 0 and every norm weight 1, so a mis-mapped one goes unseen.

    Collapse into one repeated token is a std-0.05 problem (DESIGN §6), not a std-0.02 one: measured on the 64-wide
    2-layer shape, 32 greedy tokens from 8 random prompts ended in one token repeated for 2 of 8 prompts with std
    0.05, for none with std 0.02 or with these weights (vocab 1000 and 51200)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5)
            else:
                p.copy_(float("ln" in name and name.endswith("weight")) + 0.05 * torch.randn_like(p))
    return model


def relative_error(got, expected) -> float:
    """||got - expected|| / ||expected|| (Frobenius norms), in fp32."""
    got, expected = got.float(), expected.float()
    return float((got - expected).norm() / expected.norm())


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


# -- the served tiny model (tests/serving.py), shared by the server tests -------------------------------------


@pytest.fixture(scope="module")
def served_checkpoint(tmp_path_factory) -> Path:
    """A tiny random-weight checkpoint with the real tokenizer, saved once per test module."""
    from serving import MODEL, save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("served") / MODEL)


@pytest.fixture(scope="module")
def served_generator(served_checkpoint: Path):
    """A ``Generator`` on ``served_checkpoint``, one per test module (tests patch it and leave it as they found it)."""
    from codegen_lm.engine import Generator

    return Generator.from_pretrained(str(served_checkpoint))
