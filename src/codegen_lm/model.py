"""The CodeGen network in one file: rotary embeddings, attention, MLP, blocks, heads, KV cache.

Weights keep the official names and layout on disk (``transformer.h.{i}.attn.qkv_proj.weight`` in the
4-shard query/value/key order). At load time the qkv rows are re-ordered once into plain q, k, v so the
forward is a simple split; ``state_dict()`` re-orders them back, so what we save is the official layout.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import CodeGenConfig
from .memory import small_pages

MP_NUM = 4  # CodeGen was trained with 4 model-parallel shards; its fused qkv rows are laid out per shard.


# --- qkv layout -------------------------------------------------------------------------------------------


def _qkv_permutation(n_embd: int) -> torch.Tensor:
    """Row order that turns the official fused qkv weight (4 shards × [q, v, k]) into plain [q; k; v]."""
    local = n_embd // MP_NUM
    rows = torch.arange(3 * n_embd).view(MP_NUM, 3, local)  # shard, (q, v, k), row within shard
    q, v, k = rows[:, 0], rows[:, 1], rows[:, 2]
    return torch.cat([q.reshape(-1), k.reshape(-1), v.reshape(-1)])


def qkv_official_to_plain(weight: torch.Tensor) -> torch.Tensor:
    return weight[_qkv_permutation(weight.shape[1])]


def qkv_plain_to_official(weight: torch.Tensor) -> torch.Tensor:
    inverse = torch.argsort(_qkv_permutation(weight.shape[1]))
    return weight[inverse]


# --- outputs (the transformers output classes, attribute and tuple access) ---------------------------------


class ModelOutput:
    """Attribute access, ``out["logits"]``, ``out[0]`` and tuple unpacking over the fields that are set."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: str | int) -> Any:
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.to_tuple())


@dataclass
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class CausalLMOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


# --- KV cache ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A rectangle of one inference step's tokens: ``num_rows`` cache rows from ``first_row``, each with ``width``
    consecutive new tokens, attending to the slots ``< kv_len`` of its row. A step is a list of segments whose tokens
    are packed one after the other (decode rows, prefill chunks and speculated tokens share the projections: the
    weights are read once). ``aligned`` promises that every row's tokens end at slot ``kv_len - 1`` and, when
    ``width > 1``, start at slot 0: then plain causal attention needs no mask. (Plain ints, not a slice: under
    torch.compile a row count taken from a tensor's shape stays symbolic, and a slice's bounds would not.)"""

    first_row: int
    num_rows: int
    width: int
    kv_len: int
    aligned: bool = False

    @property
    def num_tokens(self) -> int:
        return self.num_rows * self.width


class KVCache:
    """Preallocated keys and values, ``[n_layer, batch, n_head, max_len, head_dim]``.

    Each row is one sequence; a token at position p is stored in slot p, so a row needs no padding and rows
    may hold sequences of different lengths. A step writes its new keys with one ``index_put_`` per layer at
    their (row, position) slots: nothing is allocated or concatenated per step. Each head's slots are contiguous,
    as attention reads them: on 4 KB pages decode attention ran 1.4x as fast so as with a slot's heads side by
    side, where each key a head reads lies on another page (docs/benchmarks.md).

    The tensors are allocated empty: a row's slots are zeroed (``ready``) only when a step first reads them unwritten,
    so slots nobody reads cost no time, and on CPU no memory (their pages are never touched). They must be zeroed
    before they are read: a shorter row in a segment reads slots past its end, masked, but attention still multiplies
    them by 0, and 0 × NaN (whatever the memory held) is NaN. ``holds`` is the scheduler's note of what free rows
    still hold, so that a request landing in one copies only what differs; it is good for the requests of the prefix
    cache ``holds_of`` (of one generator, whose model's weights stay as they are).
    """

    ZERO_AHEAD = 64  # slots zeroed past a read's end, so that decode steps seldom zero anything

    def __init__(self, config: CodeGenConfig, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        if max_len > config.n_positions:
            raise ValueError(f"cache length {max_len} exceeds the model's {config.n_positions} positions")
        self.config = config
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        small_pages(self.k)  # (written sparsely: on 2 MB pages each layer's touched row would take 2 MB)
        small_pages(self.v)
        self._heads = torch.arange(config.n_head, device=device)[None]  # [1, n_head]: a write's head index
        self.clean = [0] * batch_size  # row r's slots < clean[r] hold finite values (written or zeroed)
        self.holds: dict[int, list[int]] = {}  # free row -> the tokens whose keys and values it still holds
        self.holds_of: object | None = None

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def ready(self, first_row: int, num_rows: int, kv_len: int) -> None:
        """Make the slots ``< kv_len`` of ``num_rows`` rows from ``first_row`` safe to read (see the class)."""
        end = min(self.max_len, -(-kv_len // self.ZERO_AHEAD) * self.ZERO_AHEAD)
        for row in range(first_row, first_row + num_rows):
            if self.clean[row] < kv_len:
                self.k[:, row, :, self.clean[row] : end].zero_()
                self.v[:, row, :, self.clean[row] : end].zero_()
                self.clean[row] = end

    def forget(self, row: int) -> None:
        """Row ``row``'s keys may be NaN (a failed sequence): zero them again before they are read."""
        self.clean[row] = 0
        self.holds.pop(row, None)

    def write(self, layer: int, slots: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v ``[T, n_head, head_dim]`` (views are fine) at ``slots``: the (rows, positions) of the T tokens."""
        rows, positions = slots[0][:, None], slots[1][:, None]  # [T, 1], beside the heads' [1, n_head]
        if torch.compiler.is_compiling():
            # A graph must scatter into the cache tensor itself: a write through a view of it (one layer's slots)
            # is functionalized into a copy of that whole view, every layer, every step (seen in inductor's code).
            where = (torch.full_like(rows, layer), rows, self._heads, positions)
            self.k.index_put_(where, k)
            self.v.index_put_(where, v)
            return
        self.k[layer].index_put_((rows, self._heads, positions), k)
        self.v[layer].index_put_((rows, self._heads, positions), v)

    def read(self, layer: int, first_row: int, num_rows: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots ``< kv_len`` of ``num_rows`` rows from ``first_row``, ``[b, n_head, kv_len,
        head_dim]`` views."""
        rows = slice(first_row, first_row + num_rows)
        return self.k[layer, rows, :, :kv_len], self.v[layer, rows, :, :kv_len]

    def span(self, row: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots ``[start, end)`` of row ``row``, ``[n_layer, n, n_head, head_dim]`` views (the
        layout ``put`` takes and the prefix cache's pool holds)."""
        return self.k[:, row, :, start:end].transpose(1, 2), self.v[:, row, :, start:end].transpose(1, 2)

    def put(self, row: int, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> None:
        """Store keys and values ``[n_layer, n, n_head, head_dim]`` in slots ``[start, start + n)`` of row ``row``."""
        end = start + k.shape[1]
        mine_k, mine_v = self.span(row, start, end)
        mine_k.copy_(k)
        mine_v.copy_(v)
        self.clean[row] = max(self.clean[row], end)

    def gather(self, row: int, start: int, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> None:
        """Store slots ``index`` of ``k``, ``v`` ``[n_layer, slots, n_head, head_dim]`` (the prefix cache's pool) in
        row ``row`` from slot ``start``; layer by layer, with no gathered copy of every layer at once."""
        end = start + len(index)
        mine_k, mine_v = self.span(row, start, end)
        for layer in range(self.k.shape[0]):
            mine_k[layer].copy_(k[layer].index_select(0, index))
            mine_v[layer].copy_(v[layer].index_select(0, index))
        self.clean[row] = max(self.clean[row], end)

    def copy_rows(self, src: int, dst: slice, length: int, start: int = 0) -> None:
        """Copy slots ``[start, length)`` of row ``src`` into rows ``dst`` (shared prefixes, moved rows; the slots
        before ``start`` already hold the same)."""
        self.k[:, dst, :, start:length] = self.k[:, src : src + 1, :, start:length]
        self.v[:, dst, :, start:length] = self.v[:, src : src + 1, :, start:length]
        for row in range(*dst.indices(self.batch_size)):
            self.clean[row] = max(self.clean[row], length)

    def resized(self, batch_size: int, max_len: int) -> KVCache:
        """A cache of ``batch_size`` rows of ``max_len`` slots (no fewer than this one's) holding what this one holds."""
        grown = KVCache(self.config, batch_size, max_len, self.k.dtype, self.k.device)
        for row, clean in enumerate(self.clean):
            grown.put(row, *self.span(row, 0, clean))
        grown.holds, grown.holds_of = dict(self.holds), self.holds_of
        return grown


# --- layers -----------------------------------------------------------------------------------------------


def rotary_table(config: CodeGenConfig) -> torch.Tensor:
    """sin and cos of position × inv_freq, ``[n_positions, rotary_dims]`` (sin half, then cos half), fp32."""
    dims = config.rotary_dims
    # on the CPU even while a model is built on the meta device (checkpoint.load_model): arange on meta imports
    # sympy and torch._dynamo, ~35 MB that stay resident
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dims, 2, dtype=torch.int64, device="cpu").float() / dims))
    angles = torch.arange(config.n_positions, dtype=torch.float32, device="cpu")[:, None] * inv_freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def apply_rotary(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """GPT-J "rotate every two" on the first rotary dims of ``x`` ``[b, t, h, d]``; sin/cos ``[b, t, 1, r/2]``."""
    rot_dims = sin.shape[-1] * 2
    x_rot, x_pass = x[..., :rot_dims].float(), x[..., rot_dims:]
    even, odd = x_rot[..., 0::2], x_rot[..., 1::2]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
    return torch.cat([rotated.to(x.dtype), x_pass], dim=-1)


def rotate_(x: torch.Tensor, rotary: torch.Tensor) -> None:
    """``apply_rotary`` in place: each (even, odd) pair of the first rotary dims of ``x`` ``[b, t, ..., d]`` becomes
    (even·cos - odd·sin, odd·cos + even·sin); ``rotary`` holds (cos, sin) pairs ``[b, t, ..., r/2, 2]`` (fp32).
    In eager fp32 that is one complex multiply, pair × (cos + i·sin), in place; half precision (rotated in fp32,
    like the original), odd head sizes and compiled graphs (inductor has no complex kernels) take real arithmetic."""
    pairs = x[..., : 2 * rotary.shape[-2]].unflatten(-1, (-1, 2))
    if (not torch.compiler.is_compiling() and x.dtype == torch.float32 and pairs.storage_offset() % 2 == 0
            and all(s % 2 == 0 for s in pairs.stride()[:-1])):
        torch.view_as_complex(pairs).mul_(torch.view_as_complex(rotary))
    else:
        (even, odd), (cos, sin) = pairs.float().unbind(-1), rotary.unbind(-1)
        pairs.copy_(torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1))


ACT_FNS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def _qkv_to_official_on_save(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    key = prefix + "qkv_proj.weight"
    if key in state_dict:
        state_dict[key] = qkv_plain_to_official(state_dict[key])


def _qkv_to_plain_on_load(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    key = prefix + "qkv_proj.weight"
    if key in state_dict:
        state_dict[key] = qkv_official_to_plain(state_dict[key])
    for buffer in ("causal_mask", "masked_bias"):  # buffers of old pickles, rebuilt on the fly
        state_dict.pop(prefix + buffer, None)


def refuse_to_save(*args: object) -> None:
    """State-dict hook of modules converted for inference only (fused, packed, quantized)."""
    raise ValueError("a model prepared for inference (fused, packed or quantized) cannot be saved; "
                     "save the model as loaded")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` around existing tensors (no initialisation, no copy)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


class CodeGenAttention(nn.Module):
    def __init__(self, config: CodeGenConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.qkv_proj = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # plain [q; k; v] rows
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        # On disk the qkv rows keep the official layout: convert when loading and saving.
        self._register_state_dict_hook(_qkv_to_official_on_save)
        self._register_load_state_dict_pre_hook(_qkv_to_plain_on_load)

    def forward(
        self,
        qkv: torch.Tensor,
        sin: torch.Tensor,
        cos: torch.Tensor,
        mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """Attention over the projected ``qkv`` ``[b, t, 3 * n_embd]``; returns the heads' output before
        ``out_proj`` (the block applies the projections, fused or not), the new past and the weights."""
        b, t, _ = qkv.shape
        q, k, v = qkv.view(b, t, 3, self.n_head, self.head_dim).unbind(2)
        q, k = apply_rotary(q, sin, cos), apply_rotary(k, sin, cos)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, h, t, d]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        present = (k, v)

        weights = None
        if output_attentions:
            scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            weights = F.dropout(scores.softmax(dim=-1).to(v.dtype), self.attn_pdrop, self.training)
            y = weights @ v
        else:
            dropout = self.attn_pdrop if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None)
        return y.transpose(1, 2).reshape(b, t, -1), present, weights

    def forward_packed(
        self, qkv: torch.Tensor, rotary: torch.Tensor, segments: list[Segment], masks: list[torch.Tensor | None],
        cache: KVCache, layer: int, slots: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Inference attention through the preallocated cache (see ``CodeGenModel.forward_packed``): ``qkv``
        ``[T, 3 * n_embd]`` packed as ``segments``; one attention call per segment."""
        qkv = qkv.view(-1, 3, self.n_head, self.head_dim)  # (the step's tokens are one row: [1, T, ...])
        rotate_(qkv[:, :2], rotary)  # q and k together, in place
        q, k, v = qkv.unbind(1)
        cache.write(layer, slots, k, v)
        outputs, start = [], 0
        for segment, mask in zip(segments, masks):
            n = segment.num_tokens
            queries = q[start : start + n].view(segment.num_rows, segment.width, self.n_head, self.head_dim)
            keys, values = cache.read(layer, segment.first_row, segment.num_rows, segment.kv_len)
            y = F.scaled_dot_product_attention(queries.transpose(1, 2), keys, values, attn_mask=mask,
                                               is_causal=mask is None and segment.width > 1)
            outputs.append(y.transpose(1, 2).reshape(n, -1))
            start += n
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs))[None]


class CodeGenMLP(nn.Module):
    """fc_in, activation, fc_out; the block applies them (see ``CodeGenBlock.project_in``/``project_out``)."""

    def __init__(self, config: CodeGenConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.n_embd, config.inner_dim)
        self.fc_out = nn.Linear(config.inner_dim, config.n_embd)
        self.act = ACT_FNS[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)


class CodeGenBlock(nn.Module):
    """Parallel block (GPT-J): attention and MLP both read ln_1(x) and add to the residual.

    Because both branches read the same input and add to the same output, inference can run each block as two
    matmuls instead of four: ``fuse_projections`` stacks [qkv_proj; fc_in] into ``in_proj`` and
    [out_proj | fc_out] into ``out_proj`` (the same products, summed in another order)."""

    def __init__(self, config: CodeGenConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CodeGenAttention(config)
        self.mlp = CodeGenMLP(config)
        self.split = [3 * config.n_embd, config.inner_dim]
        self.in_proj: nn.Module | None = None  # set by fuse_projections
        self.out_proj: nn.Module | None = None

    def fuse_projections(self, convert: Callable[[nn.Linear], nn.Module] = lambda linear: linear) -> None:
        """Replace the four projections by ``in_proj`` and ``out_proj``, each passed through ``convert`` (packing,
        quantizing) before the next is built, so that little is held twice. Inference only: the official weight
        names are gone, so the block can no longer be trained or saved."""
        attn, mlp = self.attn, self.mlp
        with torch.no_grad():  # each source goes as soon as it is joined, before the converted copy is made
            joined = _linear(torch.cat([attn.qkv_proj.weight, mlp.fc_in.weight]),
                             torch.cat([mlp.fc_in.bias.new_zeros(self.split[0]), mlp.fc_in.bias]))
            del attn.qkv_proj, mlp.fc_in
            self.in_proj = convert(joined)
            joined = _linear(torch.cat([attn.out_proj.weight, mlp.fc_out.weight], dim=1), mlp.fc_out.bias)
            del attn.out_proj, mlp.fc_out
            self.out_proj = convert(joined)
        self._register_state_dict_hook(refuse_to_save)

    def project_in(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """qkv ``[..., 3 * n_embd]`` and the MLP's hidden layer (before the activation) from ln_1(x)."""
        if self.in_proj is not None:
            return self.in_proj(h).split(self.split, dim=-1)
        return self.attn.qkv_proj(h), self.mlp.fc_in(h)

    def project_out(self, heads: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """What the block adds to the residual: out_proj(heads) + fc_out(act(hidden))."""
        if self.out_proj is not None:
            return self.out_proj(torch.cat([heads, self.mlp.act(hidden)], dim=-1))
        attn_out = self.attn.resid_dropout(self.attn.out_proj(heads))
        return attn_out + self.mlp.dropout(self.mlp.fc_out(self.mlp.act(hidden)))

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, mask: torch.Tensor | None, **attn_kwargs: Any):
        qkv, hidden = self.project_in(self.ln_1(x))
        heads, present, weights = self.attn(qkv, sin, cos, mask, **attn_kwargs)
        return self.project_out(heads, hidden) + x, present, weights

    def forward_packed(self, x: torch.Tensor, rotary: torch.Tensor, segments: list[Segment],
                       masks: list[torch.Tensor | None], cache: KVCache, layer: int,
                       slots: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        qkv, hidden = self.project_in(self.ln_1(x))
        heads = self.attn.forward_packed(qkv, rotary, segments, masks, cache, layer, slots)
        return self.project_out(heads, hidden) + x


# --- models -----------------------------------------------------------------------------------------------


class CodeGenPreTrainedModel(nn.Module):
    """Config handling, weight init, qkv layout hooks and the checkpoint methods shared by both models."""

    base_model_prefix = "transformer"
    quantization: str | None = None  # "int8" / "int4" once quantized (codegen_lm.quantize)

    def __init__(self, config: CodeGenConfig):
        super().__init__()
        self.config = config

    def init_weights(self, module: nn.Module | None = None) -> None:
        """Normal(0, initializer_range) for linear and embedding weights, zero biases, unit layer norms."""
        std = self.config.initializer_range
        for m in (module or self).modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any):
        """Load a hub id or folder (``torch_dtype=``, ``device_map=``/``device=``, ``quantize=``)."""
        from .checkpoint import load_model

        return load_model(name_or_path, model_class=cls, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write config.json and (sharded) safetensors in the official layout; transformers loads them unchanged."""
        from .checkpoint import save_model

        save_model(self, save_directory, **kwargs)


class CodeGenModel(CodeGenPreTrainedModel):
    """The transformer body: embeddings, blocks, final layer norm; returns hidden states."""

    def __init__(self, config: CodeGenConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(CodeGenBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.register_buffer("rotary", rotary_table(config), persistent=False)
        self.gradient_checkpointing = False
        self.init_weights()

    def _apply(self, fn: Any, recurse: bool = True) -> "CodeGenModel":
        # The rotary table stays fp32 whatever dtype the weights are cast to (the original computes it in fp32).
        super()._apply(fn, recurse)
        self.rotary = self.rotary.float()
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.wte = embeddings

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPast | tuple[Any, ...]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        use_cache = self.config.use_cache if use_cache is None else use_cache
        use_cache = use_cache and not self.training
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + t, device=x.device).expand(b, t)
        position_ids = position_ids.reshape(-1, t).expand(b, t)
        check_positions(position_ids, self.config.n_positions)
        if token_type_ids is not None:
            x = x + self.wte(token_type_ids.reshape(-1, t))

        # Causal over [past + new] keys, and padded keys (attention_mask == 0) hidden. A query always sees
        # itself, so rows of left padding stay finite (their outputs are never used). Without padding or a
        # past, no mask is built: SDPA's is_causal lets fused (flash) kernels run, which matters in training.
        mask = None
        if attention_mask is not None or past_len or output_attentions:
            key_pos = torch.arange(past_len + t, device=x.device)
            query_pos = key_pos[past_len:, None]
            mask = (key_pos[None, :] <= query_pos)[None, None]
            if attention_mask is not None:
                keep = attention_mask.to(torch.bool).reshape(b, 1, 1, past_len + t)
                mask = (mask & keep) | (key_pos[None, :] == query_pos)[None, None]

        hidden_states, attentions, presents = [], [], []
        x = self.drop(x)
        sin, cos = self._rotary(position_ids)
        for i, block in enumerate(self.h):
            if output_hidden_states:
                hidden_states.append(x)
            past = past_key_values[i] if past_key_values else None
            if self.gradient_checkpointing and self.training:
                x, present, weights = torch.utils.checkpoint.checkpoint(
                    block, x, sin, cos, mask, past=past, output_attentions=bool(output_attentions), use_reentrant=False
                )
            else:
                x, present, weights = block(x, sin, cos, mask, past=past, output_attentions=bool(output_attentions))
            presents.append(present)
            attentions.append(weights)
        x = self.ln_f(x)
        if output_hidden_states:
            hidden_states.append(x)
        out = BaseModelOutputWithPast(
            last_hidden_state=x,
            past_key_values=tuple(presents) if use_cache else None,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return out if return_dict is not False else out.to_tuple()

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sin, cos = self.rotary[positions].unsqueeze(2).chunk(2, dim=-1)  # [b, t, 1, r/2] each
        return sin, cos

    def forward_packed(self, input_ids: torch.Tensor, positions: torch.Tensor, segments: list[Segment],
                       cache: KVCache) -> torch.Tensor:
        """The inference path: the tokens ``input_ids`` at ``positions`` (both ``[T]``), packed segment after segment
        (see ``Segment``), through cache ``cache``. A token sees the slots of its row up to its own position, so rows
        of different lengths need no other mask. Returns the final hidden states ``[1, T, n_embd]``."""
        # The packed tokens go through the projections as one row, [1, T, n_embd]: inductor's freezing passes (the
        # compiled decode step) expect the batched layout of linear layers.
        x = self.wte(input_ids)[None]
        sin, cos = self.rotary[positions].chunk(2, dim=-1)
        rotary = torch.stack([cos, sin], dim=-1)[:, None, None]  # [T, 1 (q/k), 1 (head), r/2, 2]
        row_ids, masks, start = [], [], 0
        for segment in segments:
            n = segment.num_tokens
            where = positions[start : start + n].view(segment.num_rows, segment.width)
            row_ids.append(torch.arange(segment.first_row, segment.first_row + segment.num_rows, device=x.device)
                           .repeat_interleave(segment.width))
            mask = None
            if not segment.aligned or (segment.width > 1 and segment.kv_len != segment.width):
                keys = torch.arange(segment.kv_len, device=x.device)
                mask = torch.zeros(segment.num_rows, 1, segment.width, segment.kv_len, dtype=x.dtype, device=x.device)
                mask.masked_fill_(keys > where[:, None, :, None], float("-inf"))  # additive: no per-layer conversion
            masks.append(mask)
            start += n
        slots = (row_ids[0] if len(row_ids) == 1 else torch.cat(row_ids), positions)
        if not torch.compiler.is_compiling():  # (a compiled step's caller readies the cache)
            for segment in segments:
                cache.ready(segment.first_row, segment.num_rows, segment.kv_len)
        for i, block in enumerate(self.h):
            x = block.forward_packed(x, rotary, segments, masks, cache, i, slots)
        return self.ln_f(x)


def check_positions(position_ids: torch.Tensor, n_positions: int) -> None:
    if position_ids.numel() and int(position_ids.max()) >= n_positions:
        raise ValueError(
            f"sequence reaches position {int(position_ids.max())}, but the model has only {n_positions} positions; "
            f"shorten the prompt or lower max_new_tokens"
        )


class CodeGenForCausalLM(CodeGenPreTrainedModel):
    """CodeGenModel plus the (untied) language-model head; logits are returned in fp32."""

    def __init__(self, config: CodeGenConfig):
        super().__init__(config)
        self.transformer = CodeGenModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.init_weights(self.lm_head)  # the body initialised itself
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> CausalLMOutputWithPast | tuple[Any, ...]:
        body = self.transformer(
            input_ids, past_key_values, attention_mask, token_type_ids, position_ids, inputs_embeds,
            use_cache, output_attentions, output_hidden_states, return_dict=True,
        )
        logits = self.lm_head(body.last_hidden_state).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100
            )
        out = CausalLMOutputWithPast(loss, logits, body.past_key_values, body.hidden_states, body.attentions)
        return out if return_dict is not False else out.to_tuple()

    def logits_packed(self, input_ids: torch.Tensor, positions: torch.Tensor, segments: list[Segment], cache: KVCache,
                      last: torch.Tensor) -> torch.Tensor:
        """Inference forward of a packed step (``CodeGenModel.forward_packed``); fp32 logits of the tokens at the
        packed indices ``last`` ``[k]``, ``[k, vocab]``."""
        hidden = self.transformer.forward_packed(input_ids, positions, segments, cache)
        return self.lm_head(hidden[0, last]).float()

    def logits_cached(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows: slice, kv_len: int,
        last: torch.Tensor | None = None, aligned: bool = False,
    ) -> torch.Tensor:
        """``logits_packed`` for one rectangle: ``input_ids`` at ``positions`` ``[b, t]`` of cache rows ``rows``; the
        logits of the tokens at index ``last`` ``[b]`` of each row (the final one when None), ``[b, vocab]``. The
        decode step is this with ``t`` 1 (the graph ``torch.compile`` makes)."""
        b, t = input_ids.shape
        index = torch.arange(b, device=input_ids.device) * t + (t - 1 if last is None else last)
        # The row count from the tensor, not from ``rows.stop``: under torch.compile it stays symbolic, so one graph
        # serves every batch size.
        segment = Segment(rows.start or 0, b, t, kv_len, aligned)
        return self.logits_packed(input_ids.reshape(-1), positions.reshape(-1), [segment], cache, index)

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """transformers-style ``generate``: returns the input ids (left padding kept) followed by the new ids."""
        from .engine import hf_generate

        return hf_generate(self, input_ids, attention_mask, **kwargs)


class AutoModelForCausalLM:
    """``AutoModelForCausalLM.from_pretrained(...)`` returns a CodeGenForCausalLM (the only architecture here)."""

    @staticmethod
    def from_pretrained(name_or_path: str | os.PathLike, **kwargs: Any) -> CodeGenForCausalLM:
        return CodeGenForCausalLM.from_pretrained(name_or_path, **kwargs)

    @staticmethod
    def from_config(config: CodeGenConfig) -> CodeGenForCausalLM:
        return CodeGenForCausalLM(config)


class AutoConfig:
    @staticmethod
    def from_pretrained(name_or_path: str | os.PathLike, **kwargs: Any) -> CodeGenConfig:
        return CodeGenConfig.from_pretrained(name_or_path, **kwargs)
