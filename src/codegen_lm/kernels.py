"""Which GEMM runs each linear layer on this CPU: chosen by measurement, once per machine.

CPU flags do not predict the fastest kernel: fbgemm's and oneDNN's int8 GEMMs trade places with the vendor, the
ISA and the number of rows, oneDNN's fp32 layouts with the number of rows (docs/benchmarks.md), and on aarch64
there is no fbgemm at all. So the first time a layer shape is prepared on a machine, every candidate available
here is timed on random weights of that shape at a few row counts (decoding one or a few rows, prefilling many),
and the plan is kept in ``$CODEGEN_LM_CACHE`` (default ``$XDG_CACHE_HOME/codegen_lm``, else
``~/.cache/codegen_lm``) under ``kernels/``, one file per CPU model and flags and torch version, keyed by precision,
shape and thread count: later loads read it and time nothing. A file that cannot be read, or that names another CPU
or torch, is ignored and rewritten.

**int8.** Each layer keeps **one** copy of its weights, in the layout of one *storage*; a plan picks the storage and, for
each row range, the fastest kernel that reads it. Storages and the kernels on them:

* ``fbgemm`` (x86): fbgemm's packed matrix, run by ``quantized.linear_with_input_q_dq_qweight_dq_output_fp32``.
* ``onednn``: oneDNN's blocked int8 layout, run by ``onednn.qlinear_pointwise``.
* ``plain``: the int8 matrix as is, run by ``_weight_int8pack_mm`` (weight-only: fp32 activations) or by
  dequantizing it into an fp32 ``F.linear`` (portable: any CPU, and the only int8 path on other devices).

The fbgemm and oneDNN kernels multiply u8 activations: each row is scaled to max |x| = 1 and put on one fixed grid
(``activation_grid``), so both compute the same integer products and a row's output does not depend on the rows
beside it (differences between the two: the rounding of the final float scaling). Kernels of one storage always
share their numerics, so a request decoded alone or in a batch (other row counts, perhaps another kernel) gets
the same result. A storage wins when its kernels lose least over the row ranges (geometric mean of each range's
time over the fastest time any storage reached there): for the blocks decoding and prefilling count alike; the LM
head, which sees one row per sequence when generating, is judged on the few-row ranges only.

Timings taken while other processes keep the CPUs busy mislead (kernels that synchronize their threads at every
call wait for a descheduled one), so such a plan is timed again by the first later load that finds the machine quiet.

Measured and left out (docs/benchmarks.md): oneDNN with s8 activations (a reference kernel here, 100-1000x
slower), ``torch._int_mm`` (3-10x slower than fbgemm at one row), and converting fbgemm's packing to oneDNN's on
the fly for prefill (unpacking and repacking a 7168x1024 weight took 35-55 ms on one thread, more than oneDNN's
GEMM saved even at 2048 rows: 98 against 126 ms).

``CODEGEN_LM_INT8_KERNEL=<kernel>`` forces one kernel for every layer and row count (debugging, A/B runs); it
fails with the list of kernels available here when that one is not.

**fp32.** oneDNN's matmul (``mkldnn._linear_pointwise``) over one copy of the weight, row-major or reordered into
the blocked layout oneDNN prefers for a batch hint (``FP32_LAYOUTS``). The layouts trade places with the row count:
on an AVX-512 EPYC (2 threads, 350M shapes) the batch-1 layout is the fastest at one row but takes 1.5-1.9x as long
for 2-9 rows, while the batch-8 layout runs 3-8 rows as fast as the batch-1 layout runs one. That matters for
steps that carry several rows: speculative decoding's verify steps (k + 1 rows per sequence), and n samples or
many prompts decoded together (``codegen-lm eval``). So the plan also says the fewest rows a product runs
at: padding one row with zeros up to the layout's fastest few-row kernel costs nothing but arithmetic that was
free anyway (decoding is bound by reading the weights). Padded, the batch-8 layout's one-row step is still slower
than the batch-1 layout's (7-15 % in batch-1 decoding of the 350M shape), so plans are made for each of two
workloads, from one timing: steps of one row (one sequence decoding plainly), where nothing is padded and a layout
more than 5 % slower at one row is out, and steps of ``several_rows``, where every layout competes over all the row
counts (``choose_fp32``). From two rows on, a row's output does not depend on how many rows run beside it (checked
bit for bit in the tests), so padding two or more rows changes no result; one row may run another kernel and round
differently (about 1e-6 relative), as a batch of one always could. ``CODEGEN_LM_FP32_LAYOUT=<layout>`` forces one layout, without padding.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

FORCE_ENV = "CODEGEN_LM_INT8_KERNEL"
FP32_FORCE_ENV = "CODEGEN_LM_FP32_LAYOUT"
ROW_BUCKETS = (1, 8, 64, 512)  # timed row counts; a layer with r rows runs the kernel of the largest bucket <= r
CACHE_FORMAT = 1
_COLD_BYTES = 32 << 20  # few-row timings cycle through this much weight, so that it comes from memory, as in decoding
_ROUNDS = 5
_MAX_ROUNDS, _MIN_SECONDS = 50, 0.02
_BUSY = 0.25  # timings taken while other processes kept more of the CPUs busy are redone once the machine is quiet
_HEAD_ROWS = 64  # an LM head generating sees one row per sequence: the buckets below this choose its storage
_GIVE_UP = 3.0  # a kernel this much slower than the best at one row count is not timed at larger ones
_HOPELESS = 10.0  # ... and this much slower after its first timed round, not timed any further at all


# --- the machine ----------------------------------------------------------------------------------------------


def _cpuinfo() -> dict[str, str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo: ``flags`` on x86, ``Features`` on ARM; empty elsewhere)."""
    info = _cpuinfo()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


@functools.cache
def cpu_identity() -> str:
    """The CPU model and its flags (two VMs both called "AMD EPYC" can differ in AVX-512) and the torch build:
    what a kernel choice depends on."""
    info = _cpuinfo()
    model = info.get("model name") or info.get("CPU part") or platform.processor() or "unknown"
    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]
    return f"{platform.machine()} {model} flags {flags}; torch {torch.__version__}"


def has_vnni() -> bool:
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


def reduce_range() -> bool:
    """Whether u8 activations get 7 bits. Without VNNI, x86's u8 x s8 instructions add pairs of products in int16,
    which 8-bit activations could saturate; VNNI accumulates in int32. (Only the x86 kernels use the u8 grid.)"""
    return not has_vnni()


def activation_grid() -> tuple[float, int]:
    """Scale and zero point of the u8 grid for rows scaled to [-1, 1]: what fbgemm's dynamic quantization picks
    for that range (7 bits with ``reduce_range``)."""
    return (2 / 127, 64) if reduce_range() else (2 / 255, 128)


def cache_root() -> Path:
    """The project's cache folder: ``$CODEGEN_LM_CACHE``, else ``$XDG_CACHE_HOME/codegen_lm``, else ``~/.cache/codegen_lm``."""
    root = os.environ.get("CODEGEN_LM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "codegen_lm"
    return Path(root)


def cache_file() -> Path:
    digest = hashlib.sha256(cpu_identity().encode()).hexdigest()[:16]
    return cache_root() / "kernels" / f"gemm-{digest}.json"


# --- storages and kernels -------------------------------------------------------------------------------------


@dataclass
class Int8Weights:
    """One layer's int8 weights in one storage's layout. ``packed`` is the storage's own object (fbgemm's packed
    params, oneDNN's blocked tensor, or the int8 matrix itself); ``scale`` the per-output-channel scale (fp32)."""

    packed: Any
    scale: torch.Tensor
    zero_points: torch.Tensor | None = None  # oneDNN wants them spelled out (all 0: symmetric weights)


def _pack_fbgemm(q: torch.Tensor, scale: torch.Tensor) -> Int8Weights:
    # PyTorch deprecates creating quantized tensors (the fbgemm op still takes them, checked with torch 2.13) and
    # warns once per process, at the first one.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        return Int8Weights(torch.ops.quantized.linear_prepack(qweight, None), scale)


def _pack_onednn(q: torch.Tensor, scale: torch.Tensor) -> Int8Weights:
    return Int8Weights(torch.ops.onednn.qlinear_prepack(q, None), scale.float(), torch.zeros_like(scale, dtype=torch.long))


def _pack_plain(q: torch.Tensor, scale: torch.Tensor) -> Int8Weights:
    return Int8Weights(q, scale.float())


@dataclass(frozen=True)
class Storage:
    name: str
    pack: Callable[[torch.Tensor, torch.Tensor], Int8Weights]
    scaled_rows: bool  # whether its kernels take rows scaled to max |x| = 1 (the u8 grid) or the activations as they are


STORAGES = {
    "fbgemm": Storage("fbgemm", _pack_fbgemm, scaled_rows=True),
    "onednn": Storage("onednn", _pack_onednn, scaled_rows=True),
    "plain": Storage("plain", _pack_plain, scaled_rows=False),
}


def _run_fbgemm(w: Int8Weights, x: torch.Tensor) -> torch.Tensor:
    x_scale, x_zero = activation_grid()
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, x_scale, x_zero, w.packed)


def _run_onednn(w: Int8Weights, x: torch.Tensor) -> torch.Tensor:
    x_scale, x_zero = activation_grid()
    x_q = torch.quantize_per_tensor(x, x_scale, x_zero, torch.quint8).int_repr()
    return torch.ops.onednn.qlinear_pointwise(x_q, x_scale, x_zero, w.packed, w.scale, w.zero_points, None, 1.0, 0,
                                              torch.float32, "none", [], "")


def _run_int8pack(w: Int8Weights, x: torch.Tensor) -> torch.Tensor:
    return torch._weight_int8pack_mm(x, w.packed, w.scale)


def _run_dequant(w: Int8Weights, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w.packed.to(x.dtype)) * w.scale.to(x.dtype)


def _has_fbgemm() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def _has_onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


@dataclass(frozen=True)
class Int8Kernel:
    name: str
    storage: str
    run: Callable[[Int8Weights, torch.Tensor], torch.Tensor]  # x: [rows, in] fp32 (scaled rows for a u8 storage)
    present: Callable[[], bool] = lambda: True  # whether this torch build has it at all


KERNELS = {k.name: k for k in [
    Int8Kernel("fbgemm", "fbgemm", _run_fbgemm, _has_fbgemm),
    Int8Kernel("onednn", "onednn", _run_onednn, _has_onednn),
    Int8Kernel("int8pack", "plain", _run_int8pack),
    Int8Kernel("dequant", "plain", _run_dequant),
]}


def _random_weights(n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    return q, torch.rand(n, generator=generator) * 1e-3 + 1e-4


def _rows(rows: int, k: int, storage: str, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, k, generator=generator)
    return x / x.abs().amax(dim=-1, keepdim=True) if STORAGES[storage].scaled_rows else x


def error_summary(e: Exception) -> str:
    """The exception's type and first line: why a kernel cannot run here."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _error(kernel: Int8Kernel, weights: Int8Weights, q: torch.Tensor, scale: torch.Tensor, generator: torch.Generator) -> str | None:
    """Why ``kernel`` cannot run these weights here (it raises, or is wrong), or None when it can: on a few rows,
    its first outputs must be within 0.02 (relative L2) of the int8 weights' exact product, the bound the tests
    hold it to."""
    x = _rows(5, q.shape[1], kernel.storage, generator)
    try:
        y = kernel.run(weights, x)[:, :256]
    except Exception as e:  # any failure means "not here": unsupported ISA, shape, missing op
        return error_summary(e)
    reference = F.linear(x, q[:256].float()) * scale[:256]
    if y.shape != reference.shape or not torch.isfinite(y).all():
        return "wrong shape or non-finite output"
    error = float((y - reference).norm() / reference.norm())
    return None if error < 0.02 else f"relative error {error:.3f} against the exact int8 product"


def _check(kernel: Int8Kernel) -> str | None:
    """Why ``kernel`` cannot run here, or None (``_error`` on a small layer)."""
    if not kernel.present():
        return "not in this torch build"
    generator = torch.Generator().manual_seed(0)
    q, scale = _random_weights(48, 64, generator)
    try:
        weights = STORAGES[kernel.storage].pack(q, scale)
    except Exception as e:
        return error_summary(e)
    return _error(kernel, weights, q, scale, generator)


@functools.cache
def available_kernels() -> tuple[str, ...]:
    """The kernels that run correctly on this machine (checked on a small layer), in preference order."""
    usable = []
    for name, kernel in KERNELS.items():
        reason = _check(kernel)
        if reason is None:
            usable.append(name)
        else:
            log.info("int8 kernel %s is not usable here: %s", name, reason)
    return tuple(usable)


# --- plans ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """A layer shape's storage and, for each of ``ROW_BUCKETS``, the kernel that runs it."""

    storage: str
    kernels: tuple[str, ...]

    def kernel(self, rows: int) -> Int8Kernel:
        # comparisons, not bisect: a compiled graph traces this with symbolic rows (weight-only kernels are traced)
        return KERNELS[self.kernels[max(0, sum(rows >= bucket for bucket in ROW_BUCKETS) - 1)]]

    def describe(self) -> str:
        """``fbgemm``, or ``int8pack (1-63 rows), dequant (64+ rows)`` when the kernel changes with the rows."""
        if len(set(self.kernels)) == 1:
            return self.kernels[0]
        parts, start = [], 0
        for i, name in enumerate(self.kernels):
            if i + 1 == len(self.kernels) or self.kernels[i + 1] != name:
                end = f"-{ROW_BUCKETS[i + 1] - 1}" if i + 1 < len(ROW_BUCKETS) else "+"
                parts.append(f"{name} ({ROW_BUCKETS[start]}{end} rows)")
                start = i + 1
        return ", ".join(parts)

    @staticmethod
    def single(name: str) -> "Plan":
        return Plan(KERNELS[name].storage, (name,) * len(ROW_BUCKETS))


def _forced() -> Plan | None:
    name = os.environ.get(FORCE_ENV)
    if not name:
        return None
    if name not in KERNELS:
        raise ValueError(f"{FORCE_ENV}={name} is not an int8 kernel; use one of {', '.join(KERNELS)}, or unset it")
    if name not in available_kernels():
        raise ValueError(f"{FORCE_ENV}={name}: that kernel does not run on this machine; "
                         f"use one of {', '.join(available_kernels())}, or unset it")
    return Plan.single(name)


_PLANS: dict[tuple[Path, str], Any] = {}  # this process's plans (read or measured), by cache file and plan key


def plan_key(n: int, k: int, head: bool = False, precision: str = "int8") -> str:
    prefix = "" if precision == "int8" else f"{precision} "
    return f"{prefix}{n}x{k}{' head' if head else ''} threads {torch.get_num_threads()}"


def _cached_plan(key: str, what: str, from_entry: Callable[[Any], Any], timed: Callable[[], tuple[Any, dict[str, Any]]]) -> Any:
    """The plan under ``key``: this process's, else the cache file's (``from_entry``: None when unusable), else
    measured now (``timed``: the plan and the entry to keep) and written to the file."""
    if (cache_file(), key) not in _PLANS:
        entry = _read_cache().get(key)
        timed_busy = isinstance(entry, dict) and entry.get("busy", 0) > _BUSY and busy_cpus() <= _BUSY
        plan = None if timed_busy else from_entry(entry)
        if plan is None:
            started, busy = time.perf_counter(), busy_cpus()
            if busy > _BUSY:
                # (info, not a warning: a user's command, an error above all, should not gain a line from it)
                log.info("timing %s while other work keeps %.0f%% of the CPUs busy: the choice may be off, "
                         "and will be timed again once the machine is quiet", what, 100 * busy)
            plan, entry = timed()
            log.info("%s for %s on this CPU: %s (timed in %.1f s, kept in %s)", what, key, plan.describe(),
                     time.perf_counter() - started, cache_file())
            _write_cache(key, {**entry, "busy": round(busy, 2)})
        _PLANS[cache_file(), key] = plan
    return _PLANS[cache_file(), key]


def int8_plan(n: int, k: int, head: bool = False) -> Plan:
    """The plan for an ``n`` x ``k`` (out x in) int8 layer on this CPU (``head``: the LM head): forced, cached, or
    measured now."""
    if (forced := _forced()) is not None:
        return forced

    def timed() -> tuple[Plan, dict[str, Any]]:
        plan, timings = measure(n, k, head)
        return plan, {"storage": plan.storage, "kernels": list(plan.kernels), "rows": list(ROW_BUCKETS), "microseconds": timings}
    return _cached_plan(plan_key(n, k, head), "int8 kernels", _plan_from_entry, timed)


def busy_cpus() -> float:
    """The share of the CPUs that other processes kept busy lately (1-minute load average, less this process's one
    loading thread, over the CPU count), or 0 where the system does not say."""
    try:
        return max(0.0, os.getloadavg()[0] - 1) / (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return 0.0


def _plan_from_entry(entry: Any) -> Plan | None:
    """A cached int8 plan, if it is well formed and its kernels still run here. (Plans timed on a busy machine are
    timed again once it is quiet: other processes' threads slow some kernels far more than others, since kernels
    that synchronize their threads wait for a descheduled one at every call.)"""
    try:
        storage, kernels = entry["storage"], tuple(entry["kernels"])
        if entry["rows"] != list(ROW_BUCKETS) or len(kernels) != len(ROW_BUCKETS):
            return None
        if storage not in STORAGES or any(name not in available_kernels() or KERNELS[name].storage != storage for name in kernels):
            return None
        return Plan(storage, kernels)
    except (TypeError, KeyError):
        return None


def _read_cache() -> dict[str, Any]:
    """The cached plans of this CPU and torch, or nothing when the file is missing, unreadable or foreign."""
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("cpu") != cpu_identity():
        return {}
    plans = data.get("plans")
    return plans if isinstance(plans, dict) else {}


def _write_cache(key: str, entry: dict[str, Any]) -> None:
    from .hub import atomic_write_text

    plans = {**_read_cache(), key: entry}  # what other processes added meanwhile stays
    try:
        atomic_write_text(cache_file(), json.dumps({"format": CACHE_FORMAT, "cpu": cpu_identity(), "plans": plans}, indent=1) + "\n")
    except OSError as e:  # a read-only home: choose again next time, but run
        log.warning("could not keep the int8 kernel choice in %s (%s); it will be timed again next time", cache_file(), e)


def measure(n: int, k: int, head: bool = False) -> tuple[Plan, dict[str, list[float | None]]]:
    """Time every usable kernel on random ``n`` x ``k`` int8 weights at each of ``ROW_BUCKETS`` and pick the plan
    (see the module docstring; an LM ``head`` only ever sees a few rows when generating, so only the few-row
    buckets choose its storage). Returns it and each kernel's best time per bucket in microseconds (None: not
    timed, because the kernel fails at this shape or was already far behind)."""
    generator = torch.Generator().manual_seed(0)
    copies = max(1, min(8, math.ceil(_COLD_BYTES / (n * k))))
    matrices = [_random_weights(n, k, generator) for _ in range(copies)]
    weights: dict[str, list[Int8Weights]] = {}
    usable = []
    for name in available_kernels():
        kernel = KERNELS[name]
        try:
            if kernel.storage not in weights:
                weights[kernel.storage] = [STORAGES[kernel.storage].pack(q, scale) for q, scale in matrices]
            reason = _error(kernel, weights[kernel.storage][0], *matrices[0], generator)
        except Exception as e:  # packing this shape failed
            reason = error_summary(e)
        if reason is None:
            usable.append(name)
        else:
            log.info("int8 kernel %s cannot run an %dx%d layer here: %s", name, n, k, reason)
    if not usable:
        raise RuntimeError(f"no int8 kernel runs an {n}x{k} layer on this machine")
    times: dict[str, list[float]] = {name: [] for name in usable}
    contenders = list(usable)
    for bucket in ROW_BUCKETS:
        cycle = copies if bucket <= 8 else 1
        x = {s: _rows(bucket, k, s, generator) for s in {KERNELS[name].storage for name in contenders}}
        best = dict.fromkeys(contenders, math.inf)
        spent = dict.fromkeys(contenders, 0.0)
        round_ = 0
        # Round 0 warms up; then the rounds interleave the kernels, at least _ROUNDS of them and more while a kernel
        # has run for less than _MIN_SECONDS (short timings on a shared machine need many tries for a clean minimum).
        while contenders and (round_ <= _ROUNDS or (round_ < _MAX_ROUNDS and min(spent[c] for c in contenders) < _MIN_SECONDS)):
            for name in list(contenders):
                kernel = KERNELS[name]
                start = time.perf_counter()
                try:
                    for w in weights[kernel.storage][:cycle]:
                        kernel.run(w, x[kernel.storage])
                except Exception as e:  # fails at this row count: out, here and beyond
                    log.info("int8 kernel %s failed on %d rows of an %dx%d layer: %s", name, bucket, n, k, e)
                    contenders.remove(name)
                    best[name] = math.inf
                    continue
                if round_:
                    elapsed = time.perf_counter() - start
                    best[name], spent[name] = min(best[name], elapsed / cycle), spent[name] + elapsed
            if round_ == 1 and contenders:  # hopeless (a dequantizing kernel on few rows): no more rounds
                contenders = [name for name in contenders if best[name] <= _HOPELESS * min(best[c] for c in contenders)]
            round_ += 1
        for name in usable:
            times[name].append(best.get(name, math.inf))
        if contenders:  # far behind after all rounds: not timed at larger buckets
            contenders = [name for name in contenders if best[name] <= _GIVE_UP * min(best[c] for c in contenders)]
    scored = [b for b, rows in enumerate(ROW_BUCKETS) if rows < _HEAD_ROWS] if head else list(range(len(ROW_BUCKETS)))
    return choose(times, scored), {name: [None if math.isinf(t) else round(t * 1e6, 1) for t in ts] for name, ts in times.items()}


def choose(times: dict[str, list[float]], scored: list[int] | None = None) -> Plan:
    """The plan from each kernel's time per bucket: per storage, its fastest kernel at each bucket; then the storage
    with the smallest geometric mean of (its time / the fastest time at that bucket) over the ``scored`` buckets
    (all by default). Ties go to the storage listed first in ``STORAGES``."""
    scored = list(range(len(ROW_BUCKETS))) if scored is None else scored
    by_storage: dict[str, list[tuple[float, str]]] = {}
    for storage in STORAGES:
        names = [name for name in times if KERNELS[name].storage == storage]
        if names:
            by_storage[storage] = [min((times[name][b], name) for name in names) for b in range(len(ROW_BUCKETS))]
    fastest = [min(per_bucket[b][0] for per_bucket in by_storage.values()) for b in range(len(ROW_BUCKETS))]

    def score(storage: str) -> float:
        ratios = [by_storage[storage][b][0] / fastest[b] if not math.isinf(fastest[b]) else 1.0 for b in scored]
        return math.inf if any(math.isinf(r) for r in ratios) else sum(map(math.log, ratios))

    storage = min(by_storage, key=score)
    if math.isinf(score(storage)):  # nothing ran everywhere: the storage that ran at the most buckets
        storage = max(by_storage, key=lambda s: sum(not math.isinf(t) for t, _ in by_storage[s]))
    names = [name for _, name in by_storage[storage]]
    return Plan(storage, tuple(names))


# --- fp32: oneDNN's layouts, and the rows few-row products run at ---------------------------------------------

# oneDNN's blocked layout as reordered for that batch hint, or the row-major matrix as it is (None); ties in the
# timings go to the layout listed first
FP32_LAYOUTS: dict[str, int | None] = {"blocked-1": 1, "blocked-8": 8, "row-major": None}
FP32_FEW_ROWS = 8  # the most rows a product may be padded to
FP32_ROWS = (*range(1, FP32_FEW_ROWS + 1), 64, 512)  # timed row counts (an LM head: the few-row ones only)
_PAD_GAIN = 0.95  # few rows run padded only where that gains 5 %; one-row plans lose at most 5 % at one row
_SLOW_CALL = 1.0  # seconds: a row count whose calls took longer is timed for 2 rounds, not _ROUNDS


def fp32_weight(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """``weight`` in ``layout``: an opaque oneDNN tensor for a blocked one, the dense matrix for ``row-major``."""
    hint = FP32_LAYOUTS[layout]
    weight = weight.detach()
    return weight.contiguous() if hint is None else torch.ops.mkldnn._reorder_linear_weight(weight, hint)


def fp32_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[rows, in]`` times a ``fp32_weight`` (oneDNN's matmul; inductor lowers this op to the same call, for
    weights it treats as constants, when the decode step is compiled with freezing)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@dataclass(frozen=True)
class Fp32Plan:
    """A layer shape's fp32 layout, and the fewest rows a product runs at (fewer are padded with zeros)."""

    layout: str
    min_rows: int = 1

    def describe(self) -> str:
        """``blocked-8; 1-4 rows run as 5``"""
        if self.min_rows == 1:
            return self.layout
        fewer = "1 row" if self.min_rows == 2 else f"1-{self.min_rows - 1} rows"
        return f"{self.layout}; {fewer} run as {self.min_rows}"


@dataclass(frozen=True)
class Fp32Plans:
    """A layer shape's plans for decode steps of one row and of several rows, both chosen from one timing."""

    one_row: Fp32Plan
    several_rows: Fp32Plan

    def describe(self) -> str:
        return f"{self.one_row.describe()} (steps of several rows: {self.several_rows.describe()})"


@functools.cache
def fp32_layouts() -> tuple[str, ...]:
    """The layouts oneDNN's fp32 matmul runs correctly on this machine (checked on a small layer)."""
    if not torch.backends.mkldnn.is_available():
        return ()
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(48, 64, generator=generator), torch.randn(5, 64, generator=generator)
    usable = []
    for layout in FP32_LAYOUTS:
        try:
            error = float((fp32_gemm(x, fp32_weight(weight, layout)) - F.linear(x, weight)).norm() / F.linear(x, weight).norm())
        except Exception as e:  # unsupported on this ISA or build
            log.info("fp32 layout %s is not usable here: %s", layout, error_summary(e))
            continue
        if error < 1e-4:
            usable.append(layout)
        else:
            log.info("fp32 layout %s is not usable here: relative error %.2g against F.linear", layout, error)
    return tuple(usable)


def fp32_plan(n: int, k: int, head: bool = False, several_rows: bool = False) -> Fp32Plan:
    """The plan for an ``n`` x ``k`` (out x in) fp32 layer on this CPU (``head``: the LM head, which sees a few
    rows; ``several_rows``: for a workload whose decode steps mostly carry several rows, see ``choose_fp32``): forced by
    ``CODEGEN_LM_FP32_LAYOUT``, cached, or measured now."""
    if forced := os.environ.get(FP32_FORCE_ENV):
        if forced not in fp32_layouts():
            known = "does not run on this machine" if forced in FP32_LAYOUTS else "is not an fp32 layout"
            raise ValueError(f"{FP32_FORCE_ENV}={forced} {known}; use one of {', '.join(fp32_layouts())}, or unset it")
        return Fp32Plan(forced)

    def timed() -> tuple[Fp32Plans, dict[str, Any]]:
        plans, timings = measure_fp32(n, k, head)
        entry = {"layout": plans.one_row.layout, "min_rows": plans.one_row.min_rows}
        return plans, {**entry, "several_rows": {"layout": plans.several_rows.layout, "min_rows": plans.several_rows.min_rows},
                       "rows": list(FP32_ROWS), "microseconds": timings}
    plans = _cached_plan(plan_key(n, k, head, "fp32"), "fp32 layouts", _fp32_plans_from_entry, timed)
    return plans.several_rows if several_rows else plans.one_row


def _fp32_plans_from_entry(entry: Any) -> Fp32Plans | None:
    """Cached fp32 plans (the one-row plan at the top, the several-row one under ``several_rows``), if they are well
    formed and their layouts still run here."""

    def plan(fields: Any) -> Fp32Plan | None:
        layout, min_rows = fields["layout"], fields["min_rows"]
        if layout not in fp32_layouts() or not isinstance(min_rows, int) or not 1 <= min_rows <= FP32_FEW_ROWS:
            return None
        return Fp32Plan(layout, min_rows)

    try:
        if entry["rows"] != list(FP32_ROWS):
            return None
        one_row, several_rows = plan(entry), plan(entry["several_rows"])
        return Fp32Plans(one_row, several_rows) if one_row and several_rows else None
    except (TypeError, KeyError):
        return None


def measure_fp32(n: int, k: int, head: bool = False) -> tuple[Fp32Plans, dict[str, list[float]]]:
    """Time every usable layout on random ``n`` x ``k`` weights at each of ``FP32_ROWS`` (an LM ``head`` at the
    few-row ones), interleaved round by round, and pick the plans for both workloads (``choose_fp32``). Returns them
    and each layout's best time per row count in microseconds."""
    generator = torch.Generator().manual_seed(0)
    copies = max(1, min(8, math.ceil(_COLD_BYTES / (4 * n * k))))
    matrices = [torch.randn(n, k, generator=generator) for _ in range(copies)]
    weights = {layout: [fp32_weight(m, layout) for m in matrices] for layout in fp32_layouts()}
    del matrices
    if not weights:
        raise RuntimeError("oneDNN's fp32 matmul does not run on this machine")
    rows = tuple(r for r in FP32_ROWS if not head or r <= FP32_FEW_ROWS)
    times: dict[str, list[float]] = {layout: [] for layout in weights}
    for count in rows:
        x = torch.randn(count, k, generator=generator)
        cycle = copies if count <= FP32_FEW_ROWS else 1
        best, spent = dict.fromkeys(weights, math.inf), dict.fromkeys(weights, 0.0)
        round_ = 0  # round 0 warms up, as for int8 (``measure``); slow row counts stop after 2 timed rounds
        while ((round_ <= _ROUNDS and not (round_ > 2 and min(spent.values()) > _SLOW_CALL))
               or (round_ < _MAX_ROUNDS and min(spent.values()) < _MIN_SECONDS)):
            for layout, ws in weights.items():
                start = time.perf_counter()
                for w in ws[:cycle]:
                    fp32_gemm(x, w)
                if round_:
                    elapsed = time.perf_counter() - start
                    best[layout], spent[layout] = min(best[layout], elapsed / cycle), spent[layout] + elapsed
            round_ += 1
        for layout in weights:
            times[layout].append(best[layout])
    plans = Fp32Plans(choose_fp32(times, rows), choose_fp32(times, rows, several_rows=True))
    return plans, {layout: [round(t * 1e6, 1) for t in ts] for layout, ts in times.items()}


def choose_fp32(times: dict[str, list[float]], rows: tuple[int, ...], several_rows: bool = False) -> Fp32Plan:
    """The plan from each layout's time per row count in ``rows`` (which start with 1..``FP32_FEW_ROWS``): per layout,
    the fewest rows to run at, ``min_rows``: for ``several_rows``, the smallest few-row count within 5 % of the
    layout's fastest few-row time, where that is at least 5 % faster than one row (else 1); then the layout with the
    smallest geometric mean of (its time / the fastest layout's) over ``rows``, a few-row count below ``min_rows``
    costing what ``min_rows`` does. Ties go to the layout listed first.

    Unless ``several_rows``, nothing is padded, and only layouts within 5 % of the fastest at one row compete: one row
    per step is what one sequence decoding plainly runs, and its speed must not pay for steps it does not take. A
    padded product's cost is the best of several row counts' timings, which flatters it on a noisy machine: there the
    batch-8 layout padded to 6 rows once timed 6 % faster than the batch-1 layout at one row, and decoded 10-15 %
    slower."""
    few = [i for i, count in enumerate(rows) if count <= FP32_FEW_ROWS]

    def min_rows(ts: list[float]) -> int:
        if not several_rows:
            return 1
        fastest = min(ts[i] for i in few)
        count = next(rows[i] for i in few if ts[i] <= fastest / _PAD_GAIN)
        return count if ts[count - 1] < _PAD_GAIN * ts[0] else 1

    def effective(ts: list[float]) -> list[float]:
        least = min_rows(ts)
        return [ts[max(rows[i], least) - 1] if i in few else ts[i] for i in range(len(rows))]

    costs = {layout: effective(ts) for layout, ts in times.items()}
    fastest = [min(c[i] for c in costs.values()) for i in range(len(rows))]
    eligible = [name for name in times if several_rows or costs[name][0] <= fastest[0] / _PAD_GAIN]
    layout = min(eligible, key=lambda name: sum(math.log(t / f) for t, f in zip(costs[name], fastest)))
    return Fp32Plan(layout, min_rows(times[layout]))
