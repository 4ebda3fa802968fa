"""CodeGenConfig: the official ``config.json`` as a dataclass, plus presets for the 12 checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACTIVATIONS = ("relu", "silu", "gelu", "tanh", "gelu_new")

# (n_layer, n_embd, n_head, rotary_dim) of the released sizes (DESIGN §2).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "350M": (20, 1024, 16, 32),
    "2B": (32, 2560, 32, 64),
    "6B": (33, 4096, 16, 64),
    "16B": (34, 6144, 24, 64),
}
DATASETS = ("nl", "multi", "mono")
PRESET_NAMES = tuple(f"codegen-{size}-{data}" for size in SIZES for data in DATASETS)


@dataclass
class CodeGenConfig:
    """Same fields and defaults as transformers' ``CodeGenConfig``."""

    vocab_size: int = 50400
    n_positions: int = 2048
    n_ctx: int = 2048
    n_embd: int = 4096
    n_layer: int = 28
    n_head: int = 16
    rotary_dim: int | None = 64
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    tie_word_embeddings: bool = False
    # Keys of a config.json that we do not model (architectures, torch_dtype, ...), kept for round trips.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type = "codegen"

    def __post_init__(self) -> None:
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"activation_function {self.activation_function!r} is not supported; use one of {', '.join(ACTIVATIONS)}"
            )
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % 4:
            # The fused qkv projection is laid out for 4 model-parallel shards (DESIGN §2).
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of 4 for CodeGen's qkv layout")
        if self.rotary_dim is not None and (self.rotary_dim > self.head_dim or self.rotary_dim % 2):
            raise ValueError(f"rotary_dim ({self.rotary_dim}) must be even and at most head_dim ({self.head_dim})")

    # transformers' attribute_map names, so code written against it keeps working.
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def rotary_dims(self) -> int:
        """Dimensions of each head that get rotary embeddings (all of them when rotary_dim is None)."""
        return self.rotary_dim if self.rotary_dim is not None else self.head_dim

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CodeGenConfig":
        data = dict(data)
        model_type = data.get("model_type", "codegen")
        if model_type != "codegen":
            raise ValueError(f"config.json has model_type {model_type!r}; this package loads 'codegen' models only")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: data.pop(k) for k in list(data) if k in known}
        return cls(**kwargs, extra=data)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out: dict[str, Any] = {"architectures": ["CodeGenForCausalLM"], **self.extra, **data}
        out["model_type"] = "codegen"
        return dict(sorted(out.items()))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "CodeGenConfig":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-download or re-save the checkpoint") from None
        return cls.from_dict(data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        from .hub import atomic_write_text

        Path(save_directory).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(save_directory) / "config.json", self.to_json_string())

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **overrides: Any) -> "CodeGenConfig":
        """A preset name (``codegen-350M-mono``), a hub id, a checkpoint folder or a config.json path."""
        name = str(name_or_path)
        if name in PRESET_NAMES and not Path(name).exists():
            config = cls.preset(name)
        elif name.endswith(".json") and Path(name).is_file():
            config = cls.from_json_file(name)
        else:
            from .hub import resolve_file

            config = cls.from_json_file(resolve_file(name, "config.json"))
        return dataclasses.replace(config, **overrides) if overrides else config

    @classmethod
    def preset(cls, name: str) -> "CodeGenConfig":
        """Config of an official checkpoint, e.g. ``codegen-2B-mono`` (a ``Salesforce/`` prefix is allowed)."""
        name = name.removeprefix("Salesforce/")
        if name not in PRESET_NAMES:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
        n_layer, n_embd, n_head, rotary_dim = SIZES[name.split("-")[1]]
        return cls(
            vocab_size=51200, n_embd=n_embd, n_layer=n_layer, n_head=n_head, rotary_dim=rotary_dim,
            extra={"torch_dtype": "float16"},
        )
