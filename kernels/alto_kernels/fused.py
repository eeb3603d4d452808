"""Fused multi-LoRA for training: launcher, segment tables and the autograd Function.

``fused_multi_lora`` adds ``Σ_i scale_i · dropout(X_i) A_iᵀ B_iᵀ`` into ``base_out`` in place,
for adapters of different ranks in one launch per pass. Four kernels, each one pass over the
big tensors (the LoRA products are memory-bound: rank ≪ in, out):

=============  ===============================================  ==========================
kernel         computes                                         big tensors touched
=============  ===============================================  ==========================
lora_shrink    ``H_s = c·(mask⊙X) Aᵀ``  (fwd)                   X read
lora_expand    ``Y += H_s Bᵀ``          (fwd)                   Y read + write (in place)
lora_bwd_dy    ``G = dY B``, ``dB = dYᵀ H_s``  (bwd)            dY read once for both
lora_bwd_dx    ``dX = c·(G A)⊙mask``, ``dA = c·Gᵀ(mask⊙X)``     X read, dX written
=============  ===============================================  ==========================

with ``c_i = scale_i / (1 - p_i)``. ``H_s`` and ``G`` are small fp32 ``[T, R]`` buffers
(``R`` = the largest rank padded to a power of two ≥ 16). The weights are read in place through
their addresses in the plan's pointer table (no packing copy); dA and dB are accumulated either
in one fp32 workspace laid out so that each ``dA_i``/``dB_i`` is a contiguous block, returned as
views (``fused_multi_lora``), or straight into per-adapter fp32 gradient buffers (a plan with a
gradient sink, ``prepare_multi_lora`` + ``apply_multi_lora``: the engine's path).

The frozen base linear and these kernels as one autograd node (``fused_linear_multi_lora``,
``apply_linear_multi_lora``) live in ``fused_linear.py``; it uses the forward and backward halves
defined here.

Host cost matters as much as the kernels here: plans are cached (``plan.py``) and each kernel is
launched through its tuned config directly once the autotuner has chosen it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
import triton

from . import _common
from ._common import LaunchKey, TunedLauncher, dtype_name, function_apply
from .dropout import dropout_mask_kernel
from .lora_bwd_dx import lora_bwd_dx_kernel
from .lora_bwd_dy import lora_bwd_dy_kernel
from .lora_expand import lora_expand_kernel
from .lora_shrink import lora_shrink_kernel
from .plan import (MAX_RANK, MultiLoRAPlan, chunk_table, pointer_table, position_streams, prepare_multi_lora, upload,
                   validate)

__all__ = ["MAX_RANK", "MultiLoRAPlan", "apply_multi_lora", "dropout_mask", "fused_multi_lora", "prepare_multi_lora"]

_SHRINK = TunedLauncher(lora_shrink_kernel, "lora_shrink")
_EXPAND = TunedLauncher(lora_expand_kernel, "lora_expand")
_BWD_DY = TunedLauncher(lora_bwd_dy_kernel, "lora_bwd_dy")
_BWD_DX = TunedLauncher(lora_bwd_dx_kernel, "lora_bwd_dx")
LAUNCHERS = (_SHRINK, _EXPAND, _BWD_DY, _BWD_DX)

def _key(x_dtype, w_dtype, prec: str, plan: MultiLoRAPlan, dim: int, *flags: bool, exact: tuple = ()) -> LaunchKey:
    """The launch key, memoised on the plan (this runs on the host-bound path: 4 launches a call)."""
    memo = (x_dtype, w_dtype, prec, dim, flags, exact)
    key = plan.launch_keys.get(memo)
    if key is None:
        key = plan.launch_keys[memo] = LaunchKey(
            (dtype_name(x_dtype), dtype_name(w_dtype), prec, *exact), tuple(bool(f) for f in flags),
            int(dim), int(plan.R), int(plan.t_hint))
    return key


def _dot_prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: exact fp32 products, not tf32


def _shrink_counters(plan: MultiLoRAPlan) -> torch.Tensor:
    """The shrink's per-chunk tickets (int32, zero between launches: the kernel resets them),
    made once per plan. Per plan, not shared: two streams running different layers at once must
    not draw each other's tickets (one plan on two streams at once is not supported)."""
    sem = plan.derived.get("shrink_sem")
    if sem is None:
        sem = plan.derived["shrink_sem"] = torch.zeros(plan.table.shape[0], device=plan.table.device,
                                                       dtype=torch.int32)
    return sem


def _lora_forward(plan: MultiLoRAPlan, x: torch.Tensor, base_out: Optional[torch.Tensor], seed: int, drop: tuple,
                  w_ref: torch.Tensor, accumulate: bool = True, with_g: bool = False,
                  g_out: Optional[torch.Tensor] = None) -> tuple:
    """Shrink then expand into ``base_out`` (in place; with ``accumulate`` off the delta is
    stored there instead, every row being some adapter's); returns ``(H_s, G)``, ``H_s`` for the
    backward. Without ``base_out`` only the shrink runs (``lora_gemm`` does the expand).
    ``with_g`` (with ``base_out``): the expand also zero-fills the backward's ``G [T, R]``, which
    is returned (None otherwise; ``g_out``, a ``[T, R]`` fp32 view, to fill that one): the backward
    then needs no fill of its own. With
    ``_common.SHRINK_TICKETS`` nothing here is zero-filled by a launch: the shrink stores every
    row of ``H_s`` (``lora_shrink.py``); without, ``H_s`` is zero-filled for its atomic adds."""
    T, K = x.shape
    R = plan.R
    nc = plan.table.shape[0]
    prec = _dot_prec(x.dtype)
    dev = x.device.index or 0
    tickets = _common.SHRINK_TICKETS
    key = _key(x.dtype, w_ref.dtype, prec, plan, K, plan.has_dropout, *((True,) if tickets else ()))
    if tickets:
        h = torch.empty(T, R, device=x.device, dtype=torch.float32)
        chosen = _SHRINK.choice(key, dev)
        # Autotuning (no config yet) runs every config: room for the most splits any of them uses.
        splits = (chosen if chosen is not None else max(_SHRINK.kernel.configs, key=lambda c: c.kwargs["SPLIT_K"])
                  ).kwargs["SPLIT_K"]
        part = torch.empty((splits - 1) * T * R, device=x.device, dtype=torch.float32) if splits > 1 else h
        sem = _shrink_counters(plan)
    else:
        h = torch.zeros(T, R, device=x.device, dtype=torch.float32)
        part = sem = h  # not read without tickets
    chunk = plan.chunk
    _SHRINK(lambda m: (nc, triton.cdiv(chunk, m["BLOCK_M"]) if m["ROW_SPLIT"] else m["SPLIT_K"]), key,
            x, h, part, sem, plan.table, plan.ptrs, w_ref, K, T, x.stride(0), plan.t_hint,
            seed, *drop, R=R, ALIGN=plan.table_align, HAS_DROPOUT=plan.has_dropout, DOT_PREC=prec,
            TICKETS=tickets, device_index=dev)
    if base_out is None:
        return h, None
    g = (g_out if g_out is not None else torch.empty(T, R, device=x.device, dtype=torch.float32)) if with_g else None
    N = base_out.shape[1]
    _EXPAND(lambda m: (nc, triton.cdiv(N, m["BLOCK_N"])),
            _key(x.dtype, w_ref.dtype, prec, plan, N, *(() if accumulate else (False,)), *((True,) if with_g else ())),
            h, base_out, h if g is None else g, plan.table, plan.ptrs, w_ref, N, base_out.stride(0), plan.t_hint,
            R=R, ALIGN=plan.table_align, DOT_PREC=prec, ACCUMULATE=accumulate, ZERO_G=with_g, device_index=dev)
    return h, g


def _take_g(ctx) -> Optional[torch.Tensor]:
    """The zeroed G the forward allocated, once: a second backward (``retain_graph``) must not
    add into the first one's."""
    g, ctx.g = ctx.g, None
    return g


def _lora_backward(plan: MultiLoRAPlan, x: torch.Tensor, h: torch.Tensor, dy: torch.Tensor, w_ref: torch.Tensor,
                   seed: int, drop: tuple, need_x: bool, need_a: bool, dx: Optional[torch.Tensor] = None,
                   g: Optional[torch.Tensor] = None):
    """The LoRA part of the backward: ``(dx, da, db, G)``. With a gradient sink dA/dB go to the
    plan's buffers (``da``, ``db`` empty); otherwise into one fp32 workspace, returned as its
    dA ``[Σr·K]`` and dB parts. A ``dx`` passed in (the base's input gradient) is added to; a
    ``g`` (zeroed ``[T, R]`` fp32, from the forward) is used for G."""
    sink = plan.grad_sink
    add_dx = dx is not None
    T, K = x.shape
    N = dy.shape[1]
    nc = plan.table.shape[0]
    dt = x.dtype
    prec = _dot_prec(dt)
    dev = x.device.index or 0

    def dy_key(grad_sink: bool) -> LaunchKey:
        return _key(dt, w_ref.dtype, prec, plan, N, grad_sink, exact=(f"chunk{plan.chunk}",))

    def dx_key(grad_sink: bool) -> LaunchKey:
        flags = (plan.has_dropout, need_x, need_a, grad_sink) + ((True,) if add_dx else ())
        return _key(dt, w_ref.dtype, prec, plan, K, *flags)

    # One zero-filled fp32 workspace: G [T, R] (unless given) | dA [Σr, K] | dB blocks [out, r_i]
    # each (nothing more with a gradient sink; then no fill at all when G is given).
    sum_r = 0 if sink else sum(plan.ranks)
    TR = 0 if g is not None else T * plan.R
    n_ws = TR + sum_r * (K * need_a + N)
    ws = torch.zeros(n_ws, device=x.device, dtype=torch.float32) if n_ws else h.new_empty(0)
    if g is None:
        g = ws[:TR].view(T, plan.R)
    if sum_r:
        da = ws[TR:TR + sum_r * K * need_a]
        db = ws[TR + sum_r * K * need_a:]
    else:  # a gradient sink: nothing in the workspace for them
        da = db = ws[:0]
    if need_x and dx is None:
        dx = torch.empty_like(x)

    def bwd_dy(g, db, grad_sink):
        _BWD_DY(lambda m: (nc, m["SPLIT_N"]), dy_key(grad_sink),
                dy, h, g, db if db.numel() else g, plan.table, plan.ptrs, w_ref, N, dy.stride(0),
                plan.t_hint, R=plan.R, ALIGN=plan.table_align, DOT_PREC=prec, GRAD_SINK=grad_sink,
                BLOCK_M=plan.chunk, device_index=dev)

    def bwd_dx(g, dx, da, grad_sink):
        dx_arg = dx if need_x else x        # never written when COMPUTE_DX is off
        da_arg = da if (need_a and da.numel()) else g  # never written when COMPUTE_DA is off or sinking
        roles = 2 if need_x and need_a else 1  # SPLIT_ROLES: each product on programs of its own
        _BWD_DX(lambda m: (nc, triton.cdiv(K, m["BLOCK_K"]), roles if m["SPLIT_ROLES"] else 1), dx_key(grad_sink),
                x, g, dx_arg, da_arg, plan.table, plan.ptrs, w_ref, K, x.stride(0), dx_arg.stride(0),
                plan.t_hint, seed, *drop, R=plan.R, ALIGN=plan.table_align, HAS_DROPOUT=plan.has_dropout,
                COMPUTE_DX=need_x, COMPUTE_DA=need_a, DOT_PREC=prec, GRAD_SINK=grad_sink,
                ADD_DX=add_dx and need_x, device_index=dev)

    if sink and (_BWD_DY.choice(dy_key(True), dev) is None or _BWD_DX.choice(dx_key(True), dev) is None):
        # Autotuning runs a kernel many times; into the sinks (or an input dx) that would add
        # dA/dB (dX) many times. Tune the workspace variant on scratch buffers instead and reuse
        # its choice.
        sr = sum(plan.ranks)
        scratch = torch.zeros(T * plan.R + sr * (K + N), device=x.device, dtype=torch.float32)
        sg = scratch[:T * plan.R].view(T, plan.R)
        bwd_dy(sg, scratch[T * plan.R + sr * K:], False)
        bwd_dx(sg, torch.zeros_like(x) if need_x else None, scratch[T * plan.R:T * plan.R + sr * K], False)
        _BWD_DY.adopt(dy_key(True), dy_key(False))
        _BWD_DX.adopt(dx_key(True), dx_key(False))
    bwd_dy(g, db, sink)
    if need_x or need_a:
        bwd_dx(g, dx, da, sink)
    return dx, da, db, g


class _FusedMultiLoRA(torch.autograd.Function):
    """Inputs: ``x, base_out, plan, seed, (streams, width)`` then either the 2n weights
    (workspace mode: their grads are returned) or the plan's sink token (sink mode: grads go to
    the plan's buffers)."""

    @staticmethod
    def forward(ctx, x, base_out, plan: MultiLoRAPlan, seed: int, drop: tuple, *weights):
        x = x if x.stride(1) == 1 else x.contiguous()
        w_ref = plan.weights[0] if plan.grad_sink else weights[0]
        h, ctx.g = _lora_forward(plan, x, base_out, seed, drop, w_ref, with_g=any(ctx.needs_input_grad))
        ctx.mark_dirty(base_out)
        # the weights too: the pointer table holds their addresses (and autograd checks their versions)
        ctx.save_for_backward(x, h, *(() if plan.grad_sink else weights))
        ctx.plan, ctx.seed, ctx.drop = plan, seed, drop
        return base_out

    @staticmethod
    def backward(ctx, dy):
        x, h, *weights = ctx.saved_tensors
        plan: MultiLoRAPlan = ctx.plan
        n, dt, sink = plan.n, x.dtype, plan.grad_sink
        need = ctx.needs_input_grad
        need_x = need[0]
        need_a = sink or any(need[5:5 + n])
        need_b = sink or any(need[5 + n:])
        d_base = dy if need[1] else None
        n_in = 1 if sink else 2 * n
        if not (need_x or need_a or need_b):
            return (None, d_base, None, None, None) + (None,) * n_in
        dy = dy.to(dt)
        dy = dy if dy.stride(1) == 1 else dy.contiguous()
        K, N = x.shape[1], dy.shape[1]
        w_ref = plan.weights[0] if sink else weights[0]
        dx, da, db, _ = _lora_backward(plan, x, h, dy, w_ref, ctx.seed, ctx.drop, need_x, need_a, g=_take_g(ctx))
        if sink:
            return (dx, d_base, None, None, None, None)
        return (dx, d_base, None, None, None, *_weight_grads(plan, da, db, K, N, w_ref.dtype, need[5:]))


_fused_apply = function_apply(_FusedMultiLoRA)


def _b_runs(plan: MultiLoRAPlan, N: int) -> tuple:
    """``(sizes, runs)``: the dB workspace split into runs of adapters of equal rank (element
    counts) and each run's ``(count, rank)``, memoised on the plan. A run of c adapters of rank r
    is one ``[c, N, r]`` view unbound into c gradients: one view per run, not per adapter."""
    got = plan.derived.get(("b_runs", N))
    if got is None:
        runs: list = []
        for r in plan.ranks:
            if runs and runs[-1][1] == r:
                runs[-1][0] += 1
            else:
                runs.append([1, r])
        got = plan.derived[("b_runs", N)] = ([c * r * N for c, r in runs], [(c, r) for c, r in runs])
    return got


def _weight_grads(plan: MultiLoRAPlan, da: torch.Tensor, db: torch.Tensor, K: int, N: int, wdt: torch.dtype,
                  need: Sequence[bool]) -> list:
    """``[dA_0..dA_n-1, dB_0..dB_n-1]`` (None where not needed) from the fp32 workspace: one
    conversion to the weights' dtype for all adapters, then views."""
    n, ranks = plan.n, plan.ranks
    want_a, want_b = any(need[:n]), any(need[n:])
    if want_a and want_b and db.data_ptr() == da.data_ptr() + da.element_size() * da.numel():
        # dA and dB lie end to end in the workspace: one cast (one launch) for both.
        da, db = torch.split_with_sizes(da.as_strided((da.numel() + db.numel(),), (1,)).to(wdt),
                                        (da.numel(), db.numel()))
    else:
        da = da.to(wdt) if want_a else da
        db = db.to(wdt) if want_b else db
    # This runs once per layer on the host-bound path, where each tensor made from Python costs
    # ~1 µs: one split for all dA_i (the aten op: Tensor.split's wrapper costs as much again),
    # one view per run of equal ranks for the dB_i (``_b_runs``).
    grads_a = torch.split_with_sizes(da.view(-1, K), ranks) if want_a else (None,) * n
    if want_b:
        sizes, runs = _b_runs(plan, N)
        parts = torch.split_with_sizes(db, sizes) if len(runs) > 1 else (db,)
        grads_b: list = []
        for part, (c, r) in zip(parts, runs):
            if c == 1:
                grads_b.append(part.view(N, r))
            else:
                grads_b.extend(part.view(c, N, r).unbind(0))
    else:
        grads_b = [None] * n
    if all(need):
        return [*grads_a, *grads_b]
    return [g if want else None for g, want in zip((*grads_a, *grads_b), need)]


def _seed_and_drop(plan: MultiLoRAPlan, x: torch.Tensor, seed: int, streams: Optional[torch.Tensor],
                   width: Optional[int]) -> tuple:
    """The launch's seed and dropout arguments ``(stream table, width)``."""
    if streams is None:
        streams = position_streams(plan.n_streams, x.device)
    elif streams.numel() < plan.n_streams or streams.device != x.device:
        raise ValueError(f"streams: need >= {plan.n_streams} entries on {x.device}")
    return int(seed) % 2 ** 31, (streams, int(width) if width else _common.FLAT_WIDTH)


def apply_multi_lora(plan: MultiLoRAPlan, x: torch.Tensor, base_out: torch.Tensor, seed: int = 0,
                     weights: Sequence[torch.Tensor] = (), streams: Optional[torch.Tensor] = None,
                     width: Optional[int] = None) -> torch.Tensor:
    """``base_out += Σ_i scale_i · dropout(x_i) A_iᵀ B_iᵀ`` with a prepared plan (in place).

    A plan with a gradient sink needs no ``weights``; otherwise pass ``[*lora_a, *lora_b]`` (the
    tensors the plan was prepared with) so that autograd returns their gradients. Dropout: the
    ``streams`` table (int64 on the device, indexed by the plan's ``stream_index``; default:
    adapter i draws stream i) and the sequence ``width`` of the rows (default: none) place each
    adapter's mask (``_common``).
    """
    plan.check_call(x, base_out)
    if plan.tokens == 0:
        return base_out
    seed, drop = _seed_and_drop(plan, x, seed, streams, width)
    if plan.grad_sink:
        return _fused_apply(x, base_out, plan, seed, drop, plan.sink_token)
    return _fused_apply(x, base_out, plan, seed, drop, *weights)


# Plans by (segments, scales, dropout, weight addresses and shapes, dtypes, device): a layer sees
# the same ones every step, so validation and the tables are paid once, not per call. Cached
# plans hold no tensors (only addresses), so the cache keeps no weights alive.
_PLANS: "OrderedDict[tuple, MultiLoRAPlan]" = OrderedDict()
_MAX_PLANS = 1024


_DATA_PTR, _SIZE = torch.Tensor.data_ptr, torch.Tensor.size


def _plan_key(x, lora_a, lora_b, seg_offsets, scales, dropout_p, training) -> tuple:
    """The weights enter by address and shape only (the per-weight 5-tuple this replaced cost
    ~2x on the host-bound path): callers pass weights of one dtype and contiguous (the
    ``fused_*`` entry points make them so), and under CUDA's unified addressing an address
    names one device."""
    ws = (*lora_a, *lora_b)
    return (tuple(int(o) for o in seg_offsets), tuple(float(s) for s in scales),
            tuple(float(p) for p in dropout_p) if training and dropout_p is not None else None,
            x.shape[1], x.dtype, x.device, _common.CHUNK_ROWS, len(lora_a), ws[0].dtype if ws else None,
            tuple(map(_DATA_PTR, ws)), tuple(map(_SIZE, ws)))


def cached_plan(x: torch.Tensor, base_out: Optional[torch.Tensor], lora_a: Sequence[torch.Tensor],
                lora_b: Sequence[torch.Tensor], seg_offsets: Sequence[int], scales: Sequence[float],
                dropout_p: Optional[Sequence[float]], training: bool,
                seq_strides: Optional[Sequence[int]] = None) -> MultiLoRAPlan:
    """The workspace-mode plan for this call, from the cache or prepared (validating) and kept.
    ``base_out`` None: the call has none yet (the one-node linear); a stand-in is shaped for it.
    The weights must be contiguous and of one dtype (``_plan_key``)."""
    strides = tuple(int(v) for v in seq_strides) if seq_strides is not None else None
    key = (_plan_key(x, lora_a, lora_b, seg_offsets, scales, dropout_p, training), strides)
    plan = _PLANS.get(key)
    if plan is None:
        if base_out is None:
            out = lora_b[0].shape[0] if len(lora_b) and lora_b[0].dim() == 2 else 0
            base_out = torch.empty(x.shape[0] if x.dim() else 0, out, device=x.device, dtype=x.dtype)
        plan = prepare_multi_lora(x, base_out, lora_a, lora_b, seg_offsets, scales, dropout_p, training,
                                  seq_strides=strides)
        _PLANS[key] = plan
        if len(_PLANS) > _MAX_PLANS:
            _PLANS.popitem(last=False)
    return plan


def fused_multi_lora(x: torch.Tensor, base_out: torch.Tensor, lora_a: Sequence[torch.Tensor],
                     lora_b: Sequence[torch.Tensor], seg_offsets: Sequence[int], scales: Sequence[float],
                     dropout_p: Optional[Sequence[float]] = None, training: bool = False,
                     seed: int = 0, streams: Optional[Sequence[int]] = None, width: Optional[int] = None,
                     seq_strides: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Add ``scale_i · dropout(x_i) A_iᵀ B_iᵀ`` for every adapter segment into ``base_out`` in place.

    Returns ``base_out``; differentiable w.r.t. ``x``, ``base_out`` and every ``A_i``, ``B_i``.
    Dropout (``training=True`` with ``dropout_p``) is drawn in-kernel from ``seed``; the same
    ``seed`` gives the same mask (see :func:`dropout_mask`).
    """
    if len(lora_a) == 0 or not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] == 0:
        validate(x, base_out, lora_a, lora_b, seg_offsets, scales, dropout_p)
        return base_out
    wdt = lora_a[0].dtype
    if any(w.dtype != wdt or not w.is_contiguous() for w in (*lora_a, *lora_b)):
        validate(x, base_out, lora_a, lora_b, seg_offsets, scales, dropout_p)
        # The kernels read every weight through one pointer type: give them one dtype and layout
        # (a copy per call; the gradients flow back through .to() to the originals).
        lora_a = [a.to(x.dtype).contiguous() for a in lora_a]
        lora_b = [b.to(x.dtype).contiguous() for b in lora_b]
    plan = cached_plan(x, base_out, lora_a, lora_b, seg_offsets, scales, dropout_p, training, seq_strides)
    table = None
    if streams is not None:  # one small upload per call (pinned: no wait); the sink path shares one per step
        table = upload(torch.tensor([int(v) % 2 ** 31 for v in streams], dtype=torch.int64), x.device)
    return apply_multi_lora(plan, x, base_out, seed, (*lora_a, *lora_b), streams=table, width=width)


def dropout_mask(seed: int, seg_offsets: Sequence[int], dropout_p: Sequence[float], in_features: int,
                 device="cuda", streams: Optional[Sequence[int]] = None, width: Optional[int] = None,
                 seq_strides: Optional[Sequence[int]] = None) -> list:
    """The keep-masks ``fused_multi_lora(..., training=True, seed=seed)`` draws: one bool
    ``[T_i, in_features]`` tensor per adapter (all True where ``p_i = 0``). ``streams`` (adapter
    i's stream number), ``width`` and ``seq_strides`` give those of ``apply_multi_lora`` with a
    stream table and a sequence width (``_common``)."""
    offs = tuple(int(o) for o in seg_offsets)
    n = len(offs) - 1
    if len(dropout_p) != n:
        raise ValueError(f"dropout_p needs {n} entries, got {len(dropout_p)}")
    T = offs[-1]
    device = torch.device(device)
    mask = torch.empty(T, in_features, dtype=torch.int8, device=device)
    if T:
        strides = tuple(int(v) for v in seq_strides) if seq_strides is not None else (0,) * n
        table = chunk_table(offs, (0,) * n, (0,) * n, (1.0,) * n, tuple(float(p) for p in dropout_p),
                            _common.CHUNK_ROWS, device, strides)
        stream_values = torch.tensor(list(streams) if streams is not None else list(range(n)),
                                     dtype=torch.int64, device=device)
        ptrs = pointer_table(tuple((0, 0, 0, 0, i) for i in range(n)), device)
        dropout_mask_kernel[lambda m: (table.shape[0], triton.cdiv(in_features, m["BLOCK_K"]))](
            mask, table, ptrs, in_features, int(seed) % 2 ** 31, stream_values,
            int(width) if width else _common.FLAT_WIDTH)
    mask = mask.bool()
    return [mask[offs[i]:offs[i + 1]] for i in range(n)]
