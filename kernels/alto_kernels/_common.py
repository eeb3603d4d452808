"""Shared pieces of the multi-LoRA kernels: interpreter detection, the chunk table, configs.

Every kernel walks a host-built *chunk table*: each row names one run of at most ``CHUNK_ROWS``
consecutive tokens of a single adapter (chunks never straddle segments, as in Punica's SGMV and
Triton's grouped-GEMM tutorial), with that adapter's scalars copied in so a program reads one
row of ``META_COLS`` int32s and nothing else. Floats are stored as their int32 bit patterns so
the whole table is one small host-to-device copy per call.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
if not INTERPRET and not torch.cuda.is_available():
    # Compiled Triton needs a GPU; without one only the interpreter can run these kernels. Fail
    # here, before any kernel module is created in the wrong mode (a failed import is not cached).
    raise ImportError("alto_kernels' Triton kernels need a CUDA device or TRITON_INTERPRET=1")

# One chunk-table row (int64): adapter index, first/past-last token, rank, row offset of the
# adapter in the packed rank axis, first token of its segment (dropout offsets are segment-local),
# the bit patterns of scale and dropout p, and the adapter's sequence stride (dropout positions,
# below). Nothing in a row names a layer or a step, so one table serves every layer of a batch
# layout. Each layer adds its own *pointer table* ``[n, PTR_COLS]``: the addresses of A_i and
# B_i (read in place: no packing copy), with a gradient sink those of the fp32 buffers that dA_i
# and dB_i are accumulated into, and the index of adapter i's entry in the launch's dropout
# *stream table*. Both are cached: optimizer steps update weights in place, and the dropout seed
# and stream table are launch arguments.
N_META = 9
FLAT_WIDTH = 2 ** 30  # the ``width`` launch argument of callers without sequence structure
META_COLS = tl.constexpr(N_META)
PTR_COLS = 5
_PTR_COLS = tl.constexpr(PTR_COLS)

# Per-adapter Philox keys: ``(seed * SEED_MUL + (stream_i + 1) * SEED_ADD) mod 2**31``, computed
# in the kernels from the launch's ``seed`` and adapter i's entry of the launch's stream table
# (by default its position: distinct streams per adapter). Mask element (row, col) of adapter i
# is ``tl.rand(key_i, pos * in + col)`` with ``pos`` its segment-local row; a caller that packs
# sequences of ``width`` rows (``width`` a launch argument) gets ``pos = j * stride_i + t`` for
# row t of sequence j instead, so that a mask does not depend on how wide other adapters'
# sequences made the batch. The engine sets stream_i from the adapter's own seed and micro-step:
# its masks are then the same whichever adapters share its group.
SEED_MUL = 0x9E3779B1
SEED_ADD = 0x85EBCA6B
_SEED_MUL = tl.constexpr(SEED_MUL)
_SEED_ADD = tl.constexpr(SEED_ADD)

# Rows per chunk: the unit of work of every kernel (``lora_bwd_dy`` takes a whole chunk as one
# row block). Larger chunks mean fewer atomic partial sums for dA/dB; smaller ones more programs.
# 128: on the H100 (8 x 512 tokens, 8B shapes, each chunk size autotuned) the LoRA kernels took
# 3-6% less device time than at 64 with rank 16 and 12-15% less with mixed ranks; 256 was no
# better than 128 (BENCHMARKS.md, "Rows per chunk"). Read at each call, so a benchmark may change it.
CHUNK_ROWS = 32 if INTERPRET else int(os.environ.get("ALTO_LORA_CHUNK", "128"))

# The shrink's split-K partial sums reduced by each chunk's last split on a ticket counter, so
# H_s is stored and needs no zero-fill launch (``lora_shrink.py``), instead of added atomically
# into a zero-filled H_s. On by default since ``benchmarks/kernel_check.py`` passed with it on an
# H100 (50 forwards bitwise equal per split count, BENCHMARKS.md "No zero-fill launches"); the
# interpreter runs programs one after another, so the CPU tests cannot show a missed ordering.
# ``ALTO_SHRINK_TICKETS=0`` goes back to the atomics.
SHRINK_TICKETS = os.environ.get("ALTO_SHRINK_TICKETS", "1").strip().lower() in (
    "1", "true", "yes", "on")


def configs(full, interp):
    """The autotune list: ``full`` on a GPU, the single ``interp`` config under TRITON_INTERPRET
    (one config means the autotuner never benchmarks, which keeps CPU tests fast)."""
    return [interp] if INTERPRET else list(full)


def quick_bench(kernel_call, quantiles):
    """The autotuner's timer, shortened (5 ms warm-up, 20 ms of repetitions instead of 25 + 100):
    these kernels take microseconds, so 20 ms is still hundreds of runs, and a grouped step that
    meets a new shape (an adapter left, a new rank) pays seconds of tuning instead of a minute."""
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def t_hint(tokens: int) -> int:
    """The autotune key for a token count: a power of 4 (≥ 256), so that batches that differ by
    padding, or by an adapter or two, reuse one tuned config instead of tuning again."""
    h = 256
    while h < tokens:
        h *= 4
    return h


def cfg(num_warps=4, num_stages=3, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


_INTERP = tl.constexpr(INTERPRET)


@triton.jit
def mma(a, b, acc, DOT_PREC: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation. Under the interpreter bf16 operands are widened
    first (its bf16 ``tl.dot`` is wrong in Triton 3.9 on CPU); compiled code uses them as is."""
    if _INTERP:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def chunk_meta(meta_ptr, pid, ALIGN: tl.constexpr):
    """Row ``pid`` of the chunk table: ``lo, hi, rank, roff, seg0, adapter, p, c`` with
    ``c = scale / (1 - p)`` (LoRA scale times inverted-dropout gain). ``ALIGN`` > 1: the host
    checked that every rank (so every ``roff``) is a multiple of it (``plan.table_align``)."""
    m = meta_ptr + pid * META_COLS
    p = tl.load(m + 7).to(tl.int32).to(tl.float32, bitcast=True)
    c = tl.load(m + 6).to(tl.int32).to(tl.float32, bitcast=True) / (1.0 - p)
    rank = tl.load(m + 3).to(tl.int32)
    roff = tl.load(m + 4).to(tl.int32)
    if ALIGN > 1:
        # Told that ranks divide by ALIGN, Triton vectorises what a rank strides or masks: B_i's
        # [out, r_i] rows, dB's atomics, the ``rr < rank`` masks of G's and dA's atomics.
        rank = tl.multiple_of(rank, ALIGN)
        roff = tl.multiple_of(roff, ALIGN)
    return (tl.load(m + 1).to(tl.int32), tl.load(m + 2).to(tl.int32), rank, roff,
            tl.load(m + 5).to(tl.int32), tl.load(m), p, c)


@triton.jit
def weight_ptrs(ptrs_ptr, adapter, w_ref, ALIGN: tl.constexpr):
    """``A_i``, ``B_i`` of adapter ``adapter``, typed like ``w_ref`` (all weights share a dtype).
    ``ALIGN`` > 1: the host checked every address in the table is 16-byte aligned; Triton cannot
    know that of a pointer loaded from memory, and without it loads and atomics stay scalar."""
    wty = tl.pointer_type(w_ref.dtype.element_ty)
    row = ptrs_ptr + adapter * _PTR_COLS
    a = tl.load(row).to(wty)
    b = tl.load(row + 1).to(wty)
    if ALIGN > 1:
        a = tl.multiple_of(a, 16)
        b = tl.multiple_of(b, 16)
    return a, b


@triton.jit
def grad_sink_ptrs(ptrs_ptr, adapter, ALIGN: tl.constexpr):
    """The fp32 buffers that ``dA_i`` and ``dB_i`` are accumulated into (gradient sink)."""
    row = ptrs_ptr + adapter * _PTR_COLS
    ga = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    gb = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    if ALIGN > 1:
        ga = tl.multiple_of(ga, 16)
        gb = tl.multiple_of(gb, 16)
    return ga, gb


@triton.jit
def philox_key(seed, stream):
    """The dropout key of stream ``stream`` for launch seed ``seed`` (see ``SEED_MUL``)."""
    s = (seed.to(tl.int64) * _SEED_MUL + (stream.to(tl.int64) + 1) * _SEED_ADD) % 2147483648
    return s.to(tl.int32)


@triton.jit
def dropout_key(seed, streams_ptr, ptrs_ptr, adapter):
    """Adapter ``adapter``'s key: its entry of the launch's stream table (pointer-table column 4)."""
    return philox_key(seed, tl.load(streams_ptr + tl.load(ptrs_ptr + adapter * _PTR_COLS + 4)))


@triton.jit
def seq_stride(meta_ptr, pid):
    """Column 8 of chunk row ``pid``: the adapter's sequence stride for dropout positions."""
    return tl.load(meta_ptr + pid * META_COLS + 8).to(tl.int32)


@triton.jit
def dropout_pos(local_rows, width, stride):
    """Dropout position of segment-local rows: ``j * stride + t`` for row t of sequence j (rows
    of ``width`` per sequence); a flat caller passes a huge ``width`` and gets the row itself."""
    return (local_rows // width) * stride + local_rows % width


# How a launch that meets a new key picks its config (``ALTO_AUTOTUNE``):
#   "auto" (default): a config this process already launched for the same kernel variant (no
#       compile), else the committed table of configs tuned on this GPU model (``tuned/``), else a
#       config this process tuned for the same kernel and dtypes, nearest in shape; only when
#       there is none does it autotune. A grouped step meets new keys whenever adapters
#       come and go (the padded rank R and the token count change): compiling and timing every
#       config again cost ~50 s per new key on an H100, and the nearest tuned config is within a
#       few percent of the best.
#   "full": autotune every new key (what ``benchmarks/tune_kernels.py`` runs to make the table).
AUTOTUNE_MODES = ("auto", "full")


def autotune_mode() -> str:
    mode = os.environ.get("ALTO_AUTOTUNE", "auto").strip().lower()
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"ALTO_AUTOTUNE={mode!r}: expected one of {AUTOTUNE_MODES}")
    return mode


@dataclass(frozen=True)
class LaunchKey:
    """What a tuned config depends on. ``exact`` (dtypes, dot precision, fixed tile sizes) must
    match for a config to be reused;
    ``flags`` (constexpr switches) and the sizes only make one config a better fit than another:
    every config is correct for every key (the kernels mask all edges)."""

    exact: Tuple[str, ...]  # x dtype, weight dtype, dot precision (+ fixed tile sizes)
    flags: Tuple[bool, ...]
    dim: int  # the feature size the grid spans (K or N)
    R: int  # padded rank
    t_hint: int  # token count bucket (``t_hint``)

    def distance(self, other: "LaunchKey") -> Tuple[int, float]:
        def log_gap(a: int, b: int) -> float:
            return abs(math.log2(max(a, 1)) - math.log2(max(b, 1)))
        flags = sum(a != b for a, b in zip(self.flags, other.flags)) + abs(len(self.flags) - len(other.flags))
        return flags, log_gap(self.dim, other.dim) + log_gap(self.R, other.R) + 0.5 * log_gap(self.t_hint, other.t_hint)

    def to_json(self) -> Dict[str, Any]:
        return {"exact": list(self.exact), "flags": list(self.flags), "dim": self.dim, "R": self.R,
                "t_hint": self.t_hint}

    @staticmethod
    def from_json(d: Dict[str, Any]) -> "LaunchKey":
        return LaunchKey(tuple(d["exact"]), tuple(bool(f) for f in d["flags"]), int(d["dim"]), int(d["R"]),
                         int(d["t_hint"]))


def dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def config_to_json(c: "triton.Config") -> Dict[str, Any]:
    return {"kwargs": dict(c.kwargs), "num_warps": c.num_warps, "num_stages": c.num_stages}


def config_from_json(d: Dict[str, Any]) -> "triton.Config":
    return triton.Config(dict(d["kwargs"]), num_warps=int(d["num_warps"]), num_stages=int(d["num_stages"]))


# Candidate configs (``lora_shrink.ROW_SPLIT_CONFIGS``, ``lora_bwd_dy.PIPELINED_B_CONFIGS``,
# ``lora_bwd_dx.SPLIT_ROLES_CONFIGS``) join the autotune lists only with ``ALTO_CANDIDATE_CONFIGS=1``
# (read at import). On an H100 they were correct, the first two 4-6% faster in their own kernel at
# one shape, and none moved a layer's fwd+bwd beyond its noise (``benchmarks/candidates.py``,
# BENCHMARKS.md): not worth more autotuning time or new tables by default.
CANDIDATE_CONFIGS = os.environ.get("ALTO_CANDIDATE_CONFIGS", "0").strip().lower() in ("1", "true", "yes", "on")

# Per kernel, the values of config switches that a config without them means (a table's rows
# made before the switch existed); the kernel's module fills them in.
CONFIG_DEFAULTS: Dict[str, Dict[str, Any]] = {}

TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")
_TABLES: Dict[str, Dict[str, List[Tuple[LaunchKey, Any]]]] = {}


def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def tuned_table(device_index: int) -> Dict[str, List[Tuple[LaunchKey, Any]]]:
    """The committed configs for this GPU model: kernel name -> [(key, config)] (may be empty)."""
    import torch

    name = device_slug(torch.cuda.get_device_name(device_index)) if torch.cuda.is_available() else "cpu"
    if name not in _TABLES:
        table: Dict[str, List[Tuple[LaunchKey, Any]]] = {}
        path = os.path.join(TUNED_DIR, f"{name}.json")
        if os.path.isfile(path):
            with open(path) as f:
                for kernel, rows in json.load(f).get("kernels", {}).items():
                    table[kernel] = [(LaunchKey.from_json(r["key"]), config_from_json(r["config"])) for r in rows]
                    for _, c in table[kernel]:
                        for switch, value in CONFIG_DEFAULTS.get(kernel, {}).items():
                            c.kwargs.setdefault(switch, value)
        _TABLES[name] = table
    return _TABLES[name]


# Launch a kernel whose config is chosen straight through its compiled launcher, skipping
# ``JITFunction.run`` (argument binding, specialisation, cache key, global-value checks: ~60-90 µs
# of host time per launch on the H100 hosts measured, four launches per LoRA fwd+bwd). Off under
# the interpreter (nothing is compiled) and with ``ALTO_DIRECT_LAUNCH=0``.
DIRECT_LAUNCH = not INTERPRET and os.environ.get("ALTO_DIRECT_LAUNCH", "1").strip() not in ("0", "false", "no")
try:
    from triton import knobs as _knobs
    from triton.runtime.driver import driver as _driver
except ImportError:  # a Triton older than the knobs module: its launcher differs, use the JIT path
    DIRECT_LAUNCH = False


def arg_signature(args: Tuple[Any, ...]) -> Optional[Tuple[Any, ...]]:
    """Per runtime argument, everything Triton may specialise a compiled kernel on, and more: a
    tensor's dtype and 16-byte alignment; an int's ``== 1``, divisibility by 16 and width. Two
    calls with equal signatures can share one compiled kernel (a refinement of Triton's key, so
    a kernel compiled for one call is never run with arguments it was not specialised for).
    This runs on every launch: type tests by identity first, the common kinds first."""
    sig = []
    add = sig.append
    for a in args:
        t = type(a)
        if t is int:
            add(1 if a == 1 else (2 if a % 16 == 0 else 3) if -_I32 <= a < _I32
                else (4 if a % 16 == 0 else 5) if 0 <= a < _I64 else 6)
        elif t is bool or a is None or t is str:
            add(a)
        elif isinstance(a, torch.Tensor):
            add((a.dtype, a.data_ptr() % 16 == 0))
        elif t is float:
            add(float)
        else:
            return None  # anything else: let Triton decide every time
    return tuple(sig)


_I32, _I64 = 2 ** 31, 2 ** 63


SKIP_EMPTY_HOOKS = True  # a switch for benchmarks/kernel_host.py's same-run A/B


def _no_hooks(hook: Any) -> bool:
    """A launch hook that calls nothing: None, or an empty ``HookChain``."""
    return hook is None or (type(hook).__name__ == "HookChain" and not getattr(hook, "calls", True))


class _DirectLaunch:
    """One compiled kernel and the constant tail of its argument list (constexprs, config)."""

    __slots__ = ("kernel", "tail", "meta")

    def __init__(self, kernel, tail: Tuple[Any, ...], meta: Dict[str, Any]) -> None:
        self.kernel, self.tail, self.meta = kernel, tail, meta

    def launch(self, grid, args: Tuple[Any, ...], device: int) -> None:
        g = grid(self.meta) if callable(grid) else grid
        stream = _driver.active.get_current_stream(device)
        values = (*args, *self.tail)
        kernel = self.kernel
        rt = _knobs.runtime
        enter, leave = rt.launch_enter_hook, rt.launch_exit_hook  # profilers (proton) hook launches
        if SKIP_EMPTY_HOOKS and _no_hooks(enter) and _no_hooks(leave):
            # Newer Tritons keep an (often empty) hook chain, never None: with nothing in it, the
            # launch metadata and two calls into the empty chain are skipped (a few us; the one
            # same-run A/B, kernel_host.py on a noisy host, could not separate it from noise).
            enter = leave = md = None
        else:
            md = kernel.launch_metadata(g, stream, *values)
        kernel.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, stream, kernel.function,
                   kernel.packed_metadata, md, enter, leave, *values)


class TunedLauncher:
    """Pick a kernel's config once per key, then launch it straight through its compiled kernel:
    the autotuner's and ``JITFunction``'s own dispatch cost tens of µs of host time per launch,
    which at LoRA sizes is as much as the kernel itself. How a new key gets its config:
    ``ALTO_AUTOTUNE`` above; how a launch skips Triton's dispatch: ``DIRECT_LAUNCH``."""

    def __init__(self, kernel, name: str) -> None:
        self.kernel = kernel
        self.name = name
        self.best: Dict[LaunchKey, Any] = {}
        self.tuned: set = set()  # keys whose config this process measured (the rest borrowed)
        self.direct: Dict[tuple, Optional[_DirectLaunch]] = {}
        self.launches = {"autotune": 0, "jit": 0, "direct": 0}

    def is_tuned(self, key: LaunchKey) -> bool:
        return key in self.best

    def adopt(self, key: LaunchKey, tuned_key: LaunchKey) -> None:
        """Use ``tuned_key``'s choice for ``key`` (a variant that must not be run repeatedly)."""
        self.best[key] = self.best[tuned_key]

    def choice(self, key: LaunchKey, device_index: int = 0) -> Optional[Any]:
        """The config for ``key`` without timing anything: known, from the table, or borrowed
        from the nearest key tuned in this process; None when only autotuning can tell."""
        cfg = self.best.get(key)
        if cfg is not None or autotune_mode() == "full":
            return cfg
        # A config already launched for this variant (same constexprs: exact, flags, R) is
        # compiled; another would compile (seconds) for a few percent at best, so the variant
        # keeps its configs once it has one. Otherwise: the nearest in the table or tuned here.
        pool = [(k, c) for k, c in self.best.items()
                if k.exact == key.exact and k.flags == key.flags and k.R == key.R]
        if not pool:
            pool = [(k, c) for k, c in tuned_table(device_index).get(self.name, []) if k.exact == key.exact]
            pool += [(k, self.best[k]) for k in self.tuned if k.exact == key.exact]
        if not pool:
            return None
        cfg = min(pool, key=lambda kc: key.distance(kc[0]))[1]
        self.best[key] = cfg
        return cfg

    def exported(self) -> List[Dict[str, Any]]:
        """The configs this process tuned, as table rows (``benchmarks/tune_kernels.py``)."""
        return [{"key": k.to_json(), "config": config_to_json(self.best[k])}
                for k in sorted(self.tuned, key=lambda k: (k.exact, k.flags, k.dim, k.R, k.t_hint))]

    def __call__(self, grid, key: LaunchKey, *args, device_index: int = 0, **kwargs) -> None:
        cfg = self.choice(key, device_index)
        if cfg is None:
            self.kernel[grid](*args, **kwargs)
            self.best[key] = self.kernel.best_config
            self.tuned.add(key)
            self.launches["autotune"] += 1
            return
        if not DIRECT_LAUNCH:
            self.kernel.fn[grid](*args, **kwargs, **cfg.all_kwargs())
            self.launches["jit"] += 1
            return
        sig = arg_signature(args)
        device = torch.cuda.current_device()
        memo = (id(cfg), tuple(kwargs.items()), sig, device) if sig is not None else None
        entry = self.direct.get(memo) if memo is not None else None
        if entry is not None:
            try:
                entry.launch(grid, args, device)
                self.launches["direct"] += 1
                return
            except TypeError:  # the launcher's arguments are not what this Triton expects: it
                self.direct[memo] = None  # raised before launching; Triton's own path from now on
        # First launch of this variant with arguments like these: through Triton (which compiles
        # or finds the kernel), keeping what the next launches need to skip it.
        all_kwargs = {**kwargs, **cfg.all_kwargs()}
        compiled = self.kernel.fn.run(*args, grid=grid, warmup=False, **all_kwargs)
        self.launches["jit"] += 1
        if memo is not None and memo not in self.direct:
            self.direct[memo] = _direct_entry(self.kernel.fn, compiled, args, all_kwargs)


def _direct_entry(fn, compiled, args: Tuple[Any, ...], all_kwargs: Dict[str, Any]) -> Optional[_DirectLaunch]:
    """The direct launch of ``compiled``, or None when this Triton's kernel object does not look
    like the one this launcher was written against (the JIT path then serves every call)."""
    names = list(getattr(fn, "arg_names", []))
    tail_names = names[len(args):]
    if (compiled is None or not names or any(n not in all_kwargs for n in tail_names)
            or not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata", "launch_metadata"))):
        return None
    return _DirectLaunch(compiled, tuple(all_kwargs[n] for n in tail_names), dict(all_kwargs))


# torch.autograd.Function.apply's Python wrapper probes for ``setup_context`` and unwraps
# functorch's dead wrappers over every argument before the C++ apply: ~5 µs of the 95-200 µs of
# host overhead of a LoRA layer's fwd+bwd on the dev machine (2n + 7 arguments in workspace
# mode). Outside functorch transforms it does nothing else for alto's Functions (none has a
# ``setup_context``), so ``function_apply`` calls the C++ apply straight; inside one, or with
# this off (``ALTO_DIRECT_APPLY=0``), it goes through the wrapper.
DIRECT_APPLY = os.environ.get("ALTO_DIRECT_APPLY", "1").strip().lower() not in ("0", "false", "no")
_C_APPLY = getattr(getattr(torch._C, "_FunctionBase", None), "__dict__", {}).get("apply")


def function_apply(cls):
    """``cls.apply``, skipping its Python wrapper where that does nothing (``DIRECT_APPLY``)."""
    wrapped = cls.apply
    if _C_APPLY is None or "setup_context" in cls.__dict__:
        return wrapped
    direct = _C_APPLY.__get__(None, cls)
    active = torch._C._are_functorch_transforms_active

    def apply(*args):
        if DIRECT_APPLY and not active():
            return direct(*args)
        return wrapped(*args)
    return apply
