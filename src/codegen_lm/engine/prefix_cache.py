"""The prefix cache: keys and values of token sequences the engine has computed, kept so that a later request
recomputes only what is new (an editor re-sends the file it sent a moment ago; a chat turn re-sends the history).

A radix tree over token ids (SGLang's RadixAttention): each edge is a run of tokens, and holds the pool slots
where those tokens' keys and values are stored. ``match`` finds the longest cached prefix of a sequence,
token by token (so an edit that changes the last token or two of the tokenization still reuses everything before
it); ``insert`` adds what a row of the KV cache holds beyond it. The pool is sized by a memory budget; when it is
full, the least recently used leaves are evicted.

Running sequences decode from their own row of the KV cache: a match is copied into the row (one gather per key
and value tensor, all layers at once), so nothing in the tree is ever in use across steps, and any leaf may be
evicted except those of the sequence being inserted.
"""

from __future__ import annotations

import heapq
import itertools
import os
from dataclasses import dataclass, field

import torch

from ..config import CodeGenConfig
from ..model import KVCache


@dataclass(eq=False)
class _Node:
    tokens: list[int] = field(default_factory=list)  # the edge from the parent
    slots: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # pool slot of each token
    parent: _Node | None = None
    children: dict[int, _Node] = field(default_factory=dict)  # by the first token of the child's edge
    last_used: int = 0

    def split(self, at: int) -> _Node:
        """Cut this node's edge after ``at`` tokens; returns the new node holding the first part (this node keeps
        the rest and becomes its child)."""
        head = _Node(self.tokens[:at], self.slots[:at], self.parent, {self.tokens[at]: self}, self.last_used)
        self.parent.children[self.tokens[0]] = head
        self.tokens, self.slots, self.parent = self.tokens[at:], self.slots[at:], head
        return head


def common_length(a: list[int], b: list[int]) -> int:
    """The length of the common prefix of ``a`` and ``b`` (binary search over slice comparisons, which run in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory for caches: the GPU's free memory, or the machine's physical memory on CPU (None where the
    system does not say)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # (not a POSIX system)
        return None


def kv_bytes_per_token(config: CodeGenConfig, dtype: torch.dtype) -> int:
    return 2 * config.n_layer * config.n_head * config.head_dim * dtype.itemsize


class PrefixCache:
    """Up to ``budget_bytes`` of cached keys and values, for one model (``config``, ``dtype``, ``device``)."""

    def __init__(self, config: CodeGenConfig, dtype: torch.dtype, device: torch.device | str, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"the prefix cache budget must be >= 0 (got {budget_bytes} bytes)")
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        self.bytes_per_token = kv_bytes_per_token(config, dtype)
        self.capacity = budget_bytes // self.bytes_per_token  # tokens
        self.k: torch.Tensor | None = None  # [n_layer, capacity, n_head, head_dim], allocated at the first insert
        self.v: torch.Tensor | None = None
        self.free = list(range(self.capacity - 1, -1, -1))  # a stack of free slots
        self.root = _Node()
        self._clock = itertools.count(1)
        self.evictions = 0  # leaves evicted
        self.evicted_tokens = 0

    @property
    def used_tokens(self) -> int:
        return self.capacity - len(self.free)

    @property
    def used_bytes(self) -> int:
        return self.used_tokens * self.bytes_per_token

    # -- lookup --------------------------------------------------------------------------------------------

    def match(self, tokens: list[int]) -> tuple[int, torch.Tensor]:
        """The longest cached prefix of ``tokens``: its length and the pool slots of its keys and values. Touches the
        nodes on the way (least recently used goes first)."""
        node, matched, slots = self.root, 0, []
        now = next(self._clock)
        while matched < len(tokens) and (child := node.children.get(tokens[matched])) is not None:
            n = common_length(child.tokens, tokens[matched : matched + len(child.tokens)])
            child.last_used = now
            slots.append(child.slots[:n])
            matched += n
            if n < len(child.tokens):
                break
            node = child
        return matched, torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long)

    def load(self, slots: torch.Tensor, cache: KVCache, row: int, start: int = 0) -> None:
        """Copy the keys and values at ``slots`` into ``cache``'s row ``row``, from slot ``start`` on."""
        if len(slots):
            cache.gather(row, start, self.k, self.v, slots.to(self.device))

    # -- adding --------------------------------------------------------------------------------------------

    def insert(self, tokens: list[int], cache: KVCache, row: int) -> int:
        """Cache ``tokens``, whose keys and values are in the first ``len(tokens)`` positions of ``cache``'s row
        ``row``: only what the tree lacks is copied. Evicts least recently used leaves for room; returns how many
        tokens are cached from the start of ``tokens`` afterwards (fewer than asked when the budget is too small)."""
        if not self.capacity or not tokens:
            return 0
        node, matched = self.root, 0
        now = next(self._clock)
        while matched < len(tokens) and (child := node.children.get(tokens[matched])) is not None:
            n = common_length(child.tokens, tokens[matched : matched + len(child.tokens)])
            child.last_used = now
            if n < len(child.tokens):
                child = child.split(n)
            node, matched = child, matched + n
        if matched == len(tokens):
            return matched
        wanted = len(tokens) - matched
        if len(self.free) < wanted:
            self._evict(wanted - len(self.free), keep=node)
        count = min(wanted, len(self.free))
        if not count:
            return matched
        if self.k is None:  # (empty, not zeros: untouched pages take no memory until written)
            shape = (self.config.n_layer, self.capacity, self.config.n_head, self.config.head_dim)
            self.k = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.v = torch.empty(shape, dtype=self.dtype, device=self.device)
        slots = torch.tensor([self.free.pop() for _ in range(count)], dtype=torch.long)
        index = slots.to(self.device)
        keys, values = cache.span(row, matched, matched + count)
        for layer in range(self.config.n_layer):
            self.k[layer].index_copy_(0, index, keys[layer])
            self.v[layer].index_copy_(0, index, values[layer])
        leaf = _Node(tokens[matched : matched + count], slots, node, {}, now)
        node.children[leaf.tokens[0]] = leaf
        return matched + count

    def _evict(self, tokens: int, keep: _Node) -> None:
        """Free at least ``tokens`` slots by evicting least recently used leaves, never ``keep`` or its ancestors."""
        protected = set()
        while keep is not None:
            protected.add(id(keep))
            keep = keep.parent
        leaves = [(n.last_used, id(n), n) for n in self._nodes() if not n.children and id(n) not in protected]
        heapq.heapify(leaves)
        freed = 0
        while freed < tokens and leaves:
            _, _, leaf = heapq.heappop(leaves)
            parent = leaf.parent
            del parent.children[leaf.tokens[0]]
            self.free.extend(leaf.slots.tolist())
            freed += len(leaf.tokens)
            self.evictions += 1
            self.evicted_tokens += len(leaf.tokens)
            if parent is not self.root and not parent.children and id(parent) not in protected:
                heapq.heappush(leaves, (parent.last_used, id(parent), parent))

    def _nodes(self) -> list[_Node]:
        nodes, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children.values())
        return nodes

    def clear(self) -> None:
        """Forget everything (the pool stays allocated)."""
        self.root = _Node()
        self.free = list(range(self.capacity - 1, -1, -1))
