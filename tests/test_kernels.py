"""Fused multi-LoRA Triton kernels against the PyTorch reference (forward, dX, dA_i, dB_i, dropout).

On a machine without a GPU the kernels run in Triton's interpreter: TRITON_INTERPRET must be set
before any kernel module is imported (Triton reads it when ``@triton.jit`` runs), hence the
``setdefault`` above the imports. It only affects Triton kernels, which nothing else here uses
on the CPU; the reference path is plain PyTorch. Sizes are small: the interpreter runs every
program in Python. Every test draws fresh random inputs; the seed is in the failure message.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import alto_kernels  # noqa: E402
from alto_kernels import multi_lora, multi_lora_reference, resolve_backend  # noqa: E402

fused = pytest.importorskip("alto_kernels.fused", reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
from alto_kernels import fused_linear  # noqa: E402
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(lens, ranks, K, N, dtype, w_dtype=None, seed=None):
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    w_dtype = w_dtype or dtype

    def rnd(*shape, s=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * s).to(device=DEVICE, dtype=dt)

    offs = [0]
    for n in lens:
        offs.append(offs[-1] + n)
    T = offs[-1]
    x = rnd(T, K).requires_grad_()
    base = rnd(T, N).requires_grad_()
    A = [rnd(r, K, s=K ** -0.5, dt=w_dtype).requires_grad_() for r in ranks]
    B = [rnd(N, r, s=r ** -0.5, dt=w_dtype).requires_grad_() for r in ranks]
    scales = [float(v) for v in torch.rand(len(ranks), generator=g) * 2 + 0.25]
    dy = rnd(T, N)
    return seed, x, base, A, B, offs, scales, dy


def grads(y, leaves, dy):
    gs = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, leaves)]


def check(lens, ranks, K, N, dtype, dropout_p=None, training=False, w_dtype=None):
    seed, x, base, A, B, offs, scales, dy = make(lens, ranks, K, N, dtype, w_dtype)
    call_seed = seed % 1000
    y = fused.fused_multi_lora(x, base.clone(), A, B, offs, scales, dropout_p=dropout_p,
                               training=training, seed=call_seed)
    masks = None
    if training and dropout_p is not None:
        masks = fused.dropout_mask(call_seed, offs, dropout_p, K, device=DEVICE)
    ref = base + multi_lora_reference(x, A, B, offs, scales, dropout_masks=masks, dropout_p=dropout_p)
    leaves = [x, base, *A, *B]
    got, want = grads(y, leaves, dy), grads(ref, leaves, dy)
    names = ["y", "dX", "dBase"] + [f"dA{i}" for i in range(len(A))] + [f"dB{i}" for i in range(len(B))]
    tol = TOL[dtype]
    errs = {k: rel(a, b) for k, a, b in zip(names, [y, *got], [ref, *want])}
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"seed={seed} rel errors over {tol}: {bad}"
    for p, gp in zip(leaves[2:], got[2:]):
        assert gp.dtype == p.dtype and gp.shape == p.shape
    return masks


def pin_config(monkeypatch, launcher, config) -> None:
    """Make ``config`` the launcher's only one for this test (no choice remembered, no plan cached)."""
    monkeypatch.setattr(launcher.kernel, "configs", [config])
    monkeypatch.setattr(launcher, "best", {})
    monkeypatch.setattr(launcher, "tuned", set())
    monkeypatch.setattr(launcher.kernel, "cache", {})
    fused._PLANS.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_ranks_match_reference(dtype):
    # ranks {1, 8, 16, 64} in one launch; an empty segment; lengths that are no multiple of a block
    check([37, 0, 45, 20], [1, 8, 16, 64], K=40, N=48, dtype=dtype)


def test_many_chunks_and_rank_128():
    # segments longer than a chunk (CHUNK_ROWS rows), a single-row segment, rank 128
    check([70, 1, 33], [128, 4, 16], K=33, N=20, dtype=torch.float32)


@pytest.mark.parametrize("tickets", [True, False])
def test_shrink_reduces_its_splits_by_tickets_or_by_atomic_adds(tickets, monkeypatch):
    # _common.SHRINK_TICKETS: split-K partials stored and reduced by each chunk's last split (H_s
    # never zero-filled), or added atomically into a zero-filled H_s; the same numbers either way,
    # with several chunks per adapter, and the ticket counters left at zero for the next launch
    from alto_kernels import _common

    monkeypatch.setattr(_common, "SHRINK_TICKETS", tickets)
    fused._PLANS.clear()
    check([70, 0, 33, 5], [16, 4, 8, 64], K=96, N=40, dtype=torch.float32)
    _, x, base, A, B, offs, scales, _ = make([70, 0, 33, 5], [16, 4, 8, 64], K=96, N=40, dtype=torch.float32)
    with torch.no_grad():  # the same plan twice: its counters must be back at zero after each launch
        first, second = (fused.fused_multi_lora(x, base.clone(), A, B, offs, scales) for _ in range(2))
    assert torch.equal(first, second)
    counters = [p.derived["shrink_sem"] for p in fused._PLANS.values() if "shrink_sem" in p.derived]
    assert bool(counters) == tickets
    assert all(int(c.abs().sum()) == 0 for c in counters)


@pytest.mark.parametrize("block_m", [16, 32])
def test_shrink_split_over_rows_matches_reference(block_m, monkeypatch):
    # ROW_SPLIT configs: each program owns block_m rows of a chunk and all of K (no split-K
    # partials, no ticket); chunks shorter than the row blocks leave programs with no rows; the
    # dropout masks are the ones the dX pass regenerates
    from alto_kernels._common import cfg as make_cfg

    row_cfg = make_cfg(BLOCK_M=block_m, BLOCK_K=32, SPLIT_K=1, ROW_SPLIT=True, PREFETCH_A=block_m == 32,
                       num_warps=4, num_stages=1)
    pin_config(monkeypatch, fused._SHRINK, row_cfg)
    check([70, 0, 33, 5], [16, 4, 8, 64], K=97, N=40, dtype=torch.float32)
    check([45, 20], [8, 16], K=40, N=24, dtype=torch.bfloat16, dropout_p=[0.2, 0.1], training=True)
    assert all(c.kwargs["ROW_SPLIT"] for c in fused._SHRINK.best.values())
    # what ALTO_CANDIDATE_CONFIGS=1 adds to the GPU list: one split each, A_i left to the pipeliner
    from alto_kernels.lora_shrink import ROW_SPLIT_CONFIGS
    assert ROW_SPLIT_CONFIGS and all(c.kwargs["SPLIT_K"] == 1 and c.kwargs["ROW_SPLIT"]
                                     and not c.kwargs["PREFETCH_A"] for c in ROW_SPLIT_CONFIGS)


def test_feature_splits_span_several_tiles():
    # each split-K (shrink) and split-N (dY pass) program walks several tiles, the last one ragged:
    # A_i's and B_i's tiles are loaded one tile ahead, and the look-ahead past a split's end is masked
    check([37, 0, 45], [1, 16, 64], K=197, N=101, dtype=torch.float32)


def test_dy_pass_without_the_b_look_ahead_matches_reference(monkeypatch):
    # PREFETCH_B off (the candidate configs): B_i's tiles loaded where they are used, over several
    # ragged split-N tiles, with and without dropout
    from alto_kernels._common import cfg as make_cfg
    from alto_kernels.lora_bwd_dy import PIPELINED_B_CONFIGS

    no_ahead = make_cfg(BLOCK_N=16, SPLIT_N=2, PREFETCH_B=False, num_warps=4, num_stages=1)
    pin_config(monkeypatch, fused._BWD_DY, no_ahead)
    check([37, 0, 45], [1, 16, 64], K=40, N=101, dtype=torch.float32)
    check([30, 21], [8, 16], K=24, N=37, dtype=torch.bfloat16, dropout_p=[0.1, 0.2], training=True)
    assert fused._BWD_DY.best and not any(c.kwargs["PREFETCH_B"] for c in fused._BWD_DY.best.values())
    assert PIPELINED_B_CONFIGS and not any(c.kwargs["PREFETCH_B"] for c in PIPELINED_B_CONFIGS)


@pytest.mark.parametrize("need", ["both", "dx only", "da only"])
def test_dx_pass_with_its_products_on_separate_programs_matches_reference(need, monkeypatch):
    # SPLIT_ROLES (the candidate configs): grid axis 2 gives dX and dA programs of their own when
    # both are wanted; one product alone runs on axis 2 of size 1. Several chunks per adapter,
    # ragged K tiles, dropout regenerated in both kinds of program
    from alto_kernels._common import cfg as make_cfg
    from alto_kernels.lora_bwd_dx import SPLIT_ROLES_CONFIGS

    split = make_cfg(BLOCK_M=16, BLOCK_K=32, SPLIT_ROLES=True, num_warps=4, num_stages=1)
    pin_config(monkeypatch, fused._BWD_DX, split)
    if need == "both":
        check([70, 0, 33, 5], [16, 4, 8, 64], K=97, N=40, dtype=torch.float32)
        check([45, 20], [8, 16], K=40, N=24, dtype=torch.bfloat16, dropout_p=[0.2, 0.1], training=True)
    else:  # a frozen input (no dX) or frozen A's (no dA): the kernel's other product alone
        _, x, base, A, B, offs, scales, dy = make([45, 0, 20], [8, 4, 16], K=72, N=24, dtype=torch.float32)
        want_leaves = [x] if need == "dx only" else list(A)
        for t in ([*A, *B] if need == "dx only" else [x, *B]):
            t.requires_grad_(False)
        y = fused.fused_multi_lora(x, base.clone(), A, B, offs, scales, dropout_p=[0.1, 0.0, 0.3], training=True,
                                   seed=3)
        masks = fused.dropout_mask(3, offs, [0.1, 0.0, 0.3], 72, device=DEVICE)
        ref = base + multi_lora_reference(x, A, B, offs, scales, dropout_masks=masks, dropout_p=[0.1, 0.0, 0.3])
        for got, want in zip(grads(y, want_leaves, dy), grads(ref, want_leaves, dy)):
            assert rel(got, want) <= TOL[torch.float32]
    assert fused._BWD_DX.best and all(c.kwargs["SPLIT_ROLES"] for c in fused._BWD_DX.best.values())
    assert SPLIT_ROLES_CONFIGS and all(c.kwargs["SPLIT_ROLES"] for c in SPLIT_ROLES_CONFIGS)


@pytest.mark.parametrize("ranks,align", [([8, 16, 64], 8), ([4, 12, 8], 4), ([8, 2, 16], 1)])
def test_ranks_that_divide_by_4_or_8_take_the_aligned_kernels(ranks, align):
    # ALIGN tells the compiled kernels what every rank divides by (and that the table's addresses
    # are 16-byte aligned), so that they vectorise B_i's rows and the gradient atomics; the
    # numbers must not change with it
    _, x, base, A, B, offs, scales, _ = make([37, 0, 45], ranks, K=40, N=48, dtype=torch.bfloat16)
    plan = fused.prepare_multi_lora(x.detach(), base.detach(), [a.detach() for a in A], [b.detach() for b in B],
                                    offs, scales)
    assert plan.table_align == align
    check([37, 0, 45], ranks, K=40, N=48, dtype=torch.bfloat16)


def test_table_align_needs_aligned_addresses():
    from alto_kernels.plan import table_align

    assert table_align([8, 16], [0, 256, 4096]) == 8
    assert table_align([8, 12], [256]) == 4
    assert table_align([8, 6], [256]) == 1
    assert table_align([8, 16], [256, 260]) == 1    # one address off 16 bytes: no hint at all
    # a weight that is a view at an odd offset of a larger buffer
    _, x, base, A, B, offs, scales, _ = make([20, 12], [8, 16], K=32, N=24, dtype=torch.float32)
    buf = torch.zeros(1 + 8 * 32, device=DEVICE)
    buf[1:] = A[0].detach().flatten()
    shifted = [buf[1:].view(8, 32), A[1].detach()]
    assert shifted[0].data_ptr() % 16
    plan = fused.prepare_multi_lora(x.detach(), base.detach(), shifted, [b.detach() for b in B], offs, scales)
    assert plan.table_align == 1


def test_weights_in_fp32_with_bf16_activations():
    check([19, 30], [8, 16], K=32, N=24, dtype=torch.bfloat16, w_dtype=torch.float32)


def test_noncontiguous_and_mixed_dtype_weights():
    _, x, base, A, B, offs, scales, dy = make([23, 31], [8, 16], K=32, N=24, dtype=torch.float32)
    a0 = A[0].detach().t().contiguous().t().requires_grad_()   # same values, column-major
    b1 = B[1].detach().to(torch.float16).requires_grad_()      # one adapter in another dtype
    A2, B2 = [a0, A[1]], [B[0], b1]
    y = fused.fused_multi_lora(x, base.clone(), A2, B2, offs, scales)
    ref = base + multi_lora_reference(x, A2, B2, offs, scales)
    leaves = [x, *A2, *B2]
    errs = [rel(a, b) for a, b in zip([y, *grads(y, leaves, dy)], [ref, *grads(ref, leaves, dy)])]
    assert max(errs) < 1e-3, errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_mask_matches_reference(dtype):
    p = [0.1, 0.0, 0.5, 0.25]
    masks = check([29, 17, 40, 0], [8, 1, 16, 64], K=40, N=24, dtype=dtype, dropout_p=p, training=True)
    assert [tuple(m.shape) for m in masks] == [(29, 40), (17, 40), (40, 40), (0, 40)]
    assert bool(masks[1].all())                                   # p = 0 keeps everything
    assert abs(masks[2].float().mean().item() - 0.5) < 0.1         # p = 0.5 drops about half
    assert not torch.equal(masks[0][:17], masks[1][:17])           # adapters draw different streams


def test_dropout_mask_is_deterministic_per_seed():
    offs, p = [0, 40, 64], [0.3, 0.3]
    a = fused.dropout_mask(3, offs, p, 48, device=DEVICE)
    b = fused.dropout_mask(3, offs, p, 48, device=DEVICE)
    c = fused.dropout_mask(4, offs, p, 48, device=DEVICE)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_repeated_calls_reuse_the_plan_and_follow_in_place_updates():
    # A training loop: same weights (updated in place by an optimizer), new activations and a new
    # dropout seed every step. The second call onwards takes the cached plan and launches the
    # tuned configs directly; the answers must still track the weights and the seed.
    p = [0.2, 0.0, 0.4]
    seed, x, base, A, B, offs, scales, dy = make([30, 12, 41], [8, 1, 16], K=40, N=24, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    for step in range(3):
        y = fused.fused_multi_lora(x, base.clone(), A, B, offs, scales, dropout_p=p, training=True, seed=step)
        masks = fused.dropout_mask(step, offs, p, 40, device=DEVICE)
        ref = base + multi_lora_reference(x, A, B, offs, scales, dropout_masks=masks, dropout_p=p)
        leaves = [x, *A, *B]
        errs = [rel(a, b) for a, b in zip([y, *grads(y, leaves, dy)], [ref, *grads(ref, leaves, dy)])]
        assert max(errs) < 1e-5, f"seed={seed} step={step}: {errs}"
        with torch.no_grad():
            for w in (*A, *B):
                w.add_(torch.randn(w.shape, generator=g).to(w) * 0.1)
            x.copy_(torch.randn(x.shape, generator=g).to(x))
    steps = [fused.dropout_mask(s, offs, p, 40, device=DEVICE)[0] for s in (0, 1)]
    assert not torch.equal(*steps)                               # a new seed, a new mask
    assert len(fused._SHRINK.best) >= 1 and len(fused._BWD_DX.best) >= 1


@pytest.mark.parametrize("dtype,ranks", [(torch.float32, [16, 1, 8]), (torch.bfloat16, [16, 1, 8]),
                                         (torch.bfloat16, [16, 8, 64])])
def test_gradient_sink_accumulates_into_fp32_buffers(dtype, ranks):
    # The engine's path: weights are constants to autograd, backward adds dA_i/dB_i into fp32
    # buffers. x needs no grad here (like the first layer's input): backward must still run.
    # Ranks of multiples of 8 take the aligned kernels (vector atomics into the sinks).
    p = [0.3, 0.0, 0.1]
    seed, x, base, A, B, offs, scales, dy = make([26, 0, 39], ranks, K=40, N=24, dtype=dtype)
    x = x.detach()
    Ac, Bc = [a.detach() for a in A], [b.detach() for b in B]
    ga = [torch.zeros(a.shape, device=DEVICE) for a in A]
    gb = [torch.zeros(b.shape, device=DEVICE) for b in B]
    plan = fused.prepare_multi_lora(x, base.detach(), Ac, Bc, offs, scales, p, training=True, grad_a=ga, grad_b=gb)
    assert plan.table_align == (8 if min(ranks) >= 8 else 1)
    masks = fused.dropout_mask(7, offs, p, 40, device=DEVICE)
    want = grads(base + multi_lora_reference(x, A, B, offs, scales, dropout_masks=masks, dropout_p=p),
                 [*A, *B], dy)
    for call in (1, 2):  # a second call adds the same gradient again (accumulation)
        y = fused.apply_multi_lora(plan, x, base.detach().clone(), seed=7)
        assert y.requires_grad
        y.backward(dy)
        errs = {f"d{i}": rel(g / call, w) for i, (g, w) in enumerate(zip([*ga, *gb], want))}
        assert max(errs.values()) <= TOL[dtype], f"seed={seed} call={call}: {errs}"
    assert all(a.grad is None for a in Ac)
    with pytest.raises(ValueError, match="grad_a\\[0\\]"):
        fused.prepare_multi_lora(x, base.detach(), Ac, Bc, offs, scales, grad_a=[g.half() for g in ga], grad_b=gb)


def _linear_paths(paths, dtype, p, with_bias=False, lens=(26, 0, 39), ranks=(16, 1, 8), **linear_kw):
    """Y, dX and the dA/dB sinks of each path over one weight; "two nodes" is F.linear + apply_multi_lora."""
    seed, x, _, A, B, offs, scales, dy = make(list(lens), list(ranks), K=40, N=24, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(24, 40, generator=g) * 40 ** -0.5).to(DEVICE, dtype)
    bias = torch.randn(24, generator=g).to(DEVICE, dtype) if with_bias else None
    Ac, Bc = [a.detach() for a in A], [b.detach() for b in B]
    got = {}
    for path in paths:
        ga = [torch.zeros(a.shape, device=DEVICE) for a in A]
        gb = [torch.zeros(b.shape, device=DEVICE) for b in B]
        xs = x.detach().clone().requires_grad_()
        plan = fused.prepare_multi_lora(xs, torch.empty(xs.shape[0], 24, device=DEVICE, dtype=dtype), Ac, Bc, offs,
                                        scales, p, training=True, grad_a=ga, grad_b=gb)
        if path == "two nodes":
            y = fused.apply_multi_lora(plan, xs, torch.nn.functional.linear(xs, weight, bias), seed=5)
        else:
            y = fused_linear.apply_linear_multi_lora(plan, xs, weight, bias, seed=5, **linear_kw)
        (dx,) = torch.autograd.grad(y, [xs], dy)
        got[path] = (y.detach(), dx, ga + gb)
    return seed, got, (plan, xs, weight)


def _assert_one_rounding_apart(seed, want, got, dtype):
    (y0, dx0, s0), (y1, dx1, s1) = want, got
    tol = TOL[dtype]
    assert rel(y1, y0) <= tol / 4, f"seed={seed}: Y {rel(y1, y0):.2e}"
    assert rel(dx1, dx0) <= tol / 4, f"seed={seed}: dX {rel(dx1, dx0):.2e}"
    if dtype == torch.float32:
        assert rel(y1, y0) <= 1e-6 and rel(dx1, dx0) <= 1e-6, (rel(y1, y0), rel(dx1, dx0))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(s0, s1)), f"seed={seed}: dA/dB differ"
    assert any(t.abs().sum() > 0 for t in s1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_with_lora_adds_the_lora_dx_into_the_base_dx(dtype, with_bias):
    # The engine's full-run path: the frozen base GEMM and the deltas as one autograd node. With a
    # bias the LoRA kernels add into the GEMMs' outputs (Y in place, dX with ADD_DX); without,
    # the GEMMs add into the deltas the kernels stored (addmm_, the epilogue path). Same numbers
    # as the two-node path up to one rounding of dX (and of Y on the epilogue path).
    p = [0.2, 0.0, 0.1]
    seed, sinks, (plan, xs, weight) = _linear_paths(("two nodes", "one node"), dtype, p, with_bias=with_bias)
    if with_bias:
        assert torch.equal(sinks["two nodes"][0], sinks["one node"][0]), f"seed={seed}: forward differs"
    _assert_one_rounding_apart(seed, sinks["two nodes"], sinks["one node"], dtype)
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear.apply_linear_multi_lora(plan, xs, weight[:, :8], None)
    with pytest.raises(ValueError, match="require grad"):
        fused_linear.apply_linear_multi_lora(plan, xs, weight.clone().requires_grad_(), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [None, [0.2, 0.0, 0.1]])
def test_linear_gemm_puts_the_lora_expand_in_the_base_gemm(dtype, p, monkeypatch):
    # gemm=True: the base GEMMs are lora_gemm_kernel with H_s B_aᵀ (forward) and c_a G A_a
    # (backward, without dropout) added to the accumulator; rows of one 16-row tile belong to
    # two adapters and the rank-1 adapter's segment sits between them. Same numbers as the
    # two-node path up to one rounding of Y and dX.
    calls = []
    real = fused_linear.lora_gemm
    monkeypatch.setattr(fused_linear, "lora_gemm", lambda *a, **k: calls.append(k["forward"]) or real(*a, **k))
    seed, got, _ = _linear_paths(("two nodes", "gemm"), dtype, p, gemm=True)
    assert calls == ([True, False] if p is None else [True]), calls  # with dropout, dX as the epilogue path
    _assert_one_rounding_apart(seed, got["two nodes"], got["gemm"], dtype)


@pytest.mark.parametrize("max_static,segs", [(8, 0), (16, 16)])
def test_linear_gemm_walks_many_segments_in_one_tile(max_static, segs, monkeypatch):
    # Ten adapters' rows (one empty segment) in 48 rows: a 16-row tile holds up to five segments.
    # Above MAX_STATIC_SEGS the epilogue walks them in a dynamic loop (SEGS = 0), else in a static
    # one of SEGS guarded steps; both give the two-node path's numbers.
    monkeypatch.setattr(fused_linear, "MAX_STATIC_SEGS", max_static)
    lens, ranks = (5, 3, 0, 9, 2, 7, 4, 6, 1, 8, 3), (16, 1, 8, 4, 16, 2, 8, 16, 1, 4, 8)
    seed, got, (plan, _, _) = _linear_paths(("two nodes", "gemm"), torch.bfloat16, None, lens=lens, ranks=ranks,
                                            gemm=True)
    row_segs, table, n_segs = fused_linear._segment_tables(plan)
    assert n_segs == segs and table.shape == (10, 3)
    assert row_segs.tolist() == [i for i, n in enumerate(v for v in lens if v) for _ in range(n)]
    _assert_one_rounding_apart(seed, got["two nodes"], got["gemm"], torch.bfloat16)


def test_no_dropout_unless_training():
    # dropout_p given but training=False: the plain product (masks=None in the reference)
    check([21, 26], [8, 16], K=32, N=32, dtype=torch.float32, dropout_p=[0.5, 0.5], training=False)


def test_in_place_strided_and_partial_grads():
    _, x, base, A, B, offs, scales, dy = make([25, 18], [16, 4], K=32, N=24, dtype=torch.float32)
    wide = torch.randn(x.shape[0], 40, device=DEVICE)
    out = wide[:, 8:32]                    # row stride 40: written in place through its strides
    out.copy_(base.detach())
    before = wide.clone()
    xs = x.detach().t().contiguous().t()   # column-major x, no grad: the dX half is skipped
    A[1].requires_grad_(False)             # frozen A_1: dA_0 and the dB still come back
    y = fused.fused_multi_lora(xs, out, A, B, offs, scales)
    assert y.data_ptr() == out.data_ptr()
    ref = base.detach() + multi_lora_reference(xs, A, B, offs, scales)
    assert rel(wide[:, 8:32], ref) < 1e-5
    assert torch.equal(wide[:, :8], before[:, :8]) and torch.equal(wide[:, 32:], before[:, 32:])
    leaves = [A[0], *B]
    got, want = torch.autograd.grad(y, leaves, dy), torch.autograd.grad(ref, leaves, dy)
    assert max(rel(a, b) for a, b in zip(got, want)) < 1e-5


def test_no_adapters_or_tokens_is_identity():
    x = torch.randn(0, 16, device=DEVICE)
    base = torch.randn(0, 8, device=DEVICE)
    A, B = [torch.randn(4, 16, device=DEVICE)], [torch.randn(8, 4, device=DEVICE)]
    assert fused.fused_multi_lora(x, base, A, B, [0, 0], [1.0]) is base


def _bad_inputs():
    K, N, T = 16, 8, 10
    x = torch.randn(T, K, device=DEVICE)
    base = torch.randn(T, N, device=DEVICE)
    A, B = [torch.randn(4, K, device=DEVICE)], [torch.randn(N, 4, device=DEVICE)]
    ok = dict(x=x, base_out=base, lora_a=A, lora_b=B, seg_offsets=[0, T], scales=[1.0])
    yield "1-D x", {**ok, "x": x[0]}
    yield "int x", {**ok, "x": x.long(), "base_out": base.long()}
    yield "base dtype", {**ok, "base_out": base.double()}
    yield "base shape", {**ok, "base_out": base[:, :5]}
    yield "offsets end", {**ok, "seg_offsets": [0, T - 1]}
    yield "offsets count", {**ok, "seg_offsets": [0, 5, T]}
    yield "B rank", {**ok, "lora_b": [torch.randn(N, 3, device=DEVICE)]}
    yield "A features", {**ok, "lora_a": [torch.randn(4, K + 1, device=DEVICE)]}
    yield "rank > 128", {**ok, "lora_a": [torch.randn(129, K, device=DEVICE)],
                         "lora_b": [torch.randn(N, 129, device=DEVICE)]}
    yield "weight dtype", {**ok, "lora_a": [A[0].double()]}
    yield "dropout 1.0", {**ok, "dropout_p": [1.0], "training": True}
    yield "dropout count", {**ok, "dropout_p": [0.1, 0.1], "training": True}


@pytest.mark.parametrize("case", list(_bad_inputs()), ids=lambda c: c[0])
def test_bad_inputs_raise_value_error(case):
    with pytest.raises(ValueError):
        fused.fused_multi_lora(**case[1])


def test_dispatch_triton_backend(monkeypatch):
    _, x, base, A, B, offs, scales, dy = make([12, 0, 21], [8, 2, 16], K=24, N=16, dtype=torch.float32)
    y = multi_lora(x, base.clone(), A, B, offs, scales, backend="triton")
    ref = multi_lora(x, base, A, B, offs, scales, backend="reference")
    assert rel(y, ref) < 1e-5
    monkeypatch.setenv("ALTO_TRITON", "1")
    assert resolve_backend(x.detach().cpu()) == "triton"
    monkeypatch.delenv("ALTO_TRITON")
    assert resolve_backend(x.detach().cpu()) == "reference"
    assert alto_kernels.fused_multi_lora is fused.fused_multi_lora


def test_new_keys_borrow_the_nearest_tuned_config(monkeypatch):
    # A grouped step meets new keys whenever adapters come and go; in "auto" mode they reuse the
    # nearest config tuned for the same kernel and dtypes (or the committed table's), "full"
    # mode tunes each key, and a key of other dtypes never borrows.
    from alto_kernels._common import LaunchKey, TunedLauncher, _TABLES, cfg as make_cfg

    launcher = TunedLauncher(fused.lora_shrink_kernel, "lora_shrink")
    tuned = LaunchKey(("bfloat16", "bfloat16", "tf32"), (True,), 2048, 64, 16384)
    small = make_cfg(BLOCK_M=16, BLOCK_K=32, SPLIT_K=2)
    launcher.best[tuned], launcher.tuned = small, {tuned}
    monkeypatch.setitem(_TABLES, "cpu", {})
    fewer_ranks = LaunchKey(("bfloat16", "bfloat16", "tf32"), (True,), 2048, 16, 4096)
    monkeypatch.setenv("ALTO_AUTOTUNE", "full")
    assert launcher.choice(fewer_ranks) is None
    monkeypatch.setenv("ALTO_AUTOTUNE", "auto")
    assert launcher.choice(fewer_ranks) is small and launcher.is_tuned(fewer_ranks)
    assert launcher.choice(LaunchKey(("float32", "float32", "ieee"), (True,), 2048, 16, 4096)) is None
    # the committed table wins over a farther key tuned in-process
    table_cfg = make_cfg(BLOCK_M=64, BLOCK_K=64, SPLIT_K=8)
    near = LaunchKey(("bfloat16", "bfloat16", "tf32"), (False,), 8192, 16, 1024)
    monkeypatch.setitem(_TABLES, "cpu", {"lora_shrink": [(near, table_cfg)]})
    assert launcher.choice(LaunchKey(("bfloat16", "bfloat16", "tf32"), (False,), 8192, 32, 1024)) is table_cfg
    # ... but a variant (same constexprs: flags, R) that has launched keeps its compiled config
    monkeypatch.setitem(_TABLES, "cpu", {"lora_shrink": [(LaunchKey(("bfloat16", "bfloat16", "tf32"), (True,),
                                                                    8192, 16, 1024), table_cfg)]})
    assert launcher.choice(LaunchKey(("bfloat16", "bfloat16", "tf32"), (True,), 8192, 16, 1024)) is small
    monkeypatch.setenv("ALTO_AUTOTUNE", "bogus")
    with pytest.raises(ValueError, match="ALTO_AUTOTUNE"):
        launcher.choice(LaunchKey(("bfloat16", "bfloat16", "tf32"), (False,), 512, 32, 1024))


def test_direct_launch_keys_and_argument_order():
    # A launch that skips Triton's dispatch must reuse a compiled kernel only for arguments that
    # Triton would have specialised the same way, and must pass the constexpr/config tail in the
    # kernel's signature order (the compiled launcher takes every argument, by position).
    import torch as _torch

    from alto_kernels._common import _direct_entry, arg_signature, cfg as make_cfg

    buf = _torch.zeros(64, dtype=_torch.bfloat16)
    aligned, off = buf[:8], buf[1:9]          # 16-byte aligned vs 2 bytes past it
    assert arg_signature((aligned, 4096)) == arg_signature((buf[8:16], 8192))
    assert arg_signature((aligned, 4096)) != arg_signature((off, 4096))
    assert arg_signature((aligned, 4096)) != arg_signature((aligned, 4097))   # divisibility by 16
    assert arg_signature((aligned, 16)) != arg_signature((aligned, 1))        # == 1
    assert arg_signature((aligned, 2 ** 31)) != arg_signature((aligned, 2 ** 31 - 16))  # i64 vs i32
    assert arg_signature((aligned.float(), 16)) != arg_signature((aligned, 16))  # dtype
    assert arg_signature((object(),)) is None   # unknown kinds go through Triton every time

    class Compiled:  # what _direct_entry needs of Triton's CompiledKernel
        run = function = packed_metadata = launch_metadata = None

    fn = fused.lora_shrink_kernel.fn
    args = tuple(range(14))  # x_ptr .. width, positional
    conf = make_cfg(BLOCK_M=16, BLOCK_K=32, SPLIT_K=2, ROW_SPLIT=False, PREFETCH_A=True)
    kw = {"R": 16, "ALIGN": 8, "HAS_DROPOUT": False, "DOT_PREC": "tf32", "TICKETS": True, **conf.all_kwargs()}
    entry = _direct_entry(fn, Compiled(), args, kw)
    assert entry.tail == (16, 8, False, "tf32", True, 16, 32, 2, False, True)
    assert [n for n in fn.arg_names[len(args):]] == ["R", "ALIGN", "HAS_DROPOUT", "DOT_PREC", "TICKETS", "BLOCK_M",
                                                     "BLOCK_K", "SPLIT_K", "ROW_SPLIT", "PREFETCH_A"]
    del kw["DOT_PREC"]
    assert _direct_entry(fn, Compiled(), args, kw) is None   # a missing argument: Triton's path
    assert _direct_entry(fn, None, args, {**kw, "DOT_PREC": "tf32"}) is None


def test_empty_launch_hook_chains_count_as_no_hooks():
    # Direct launches skip the launch metadata only when no profiler hook would see it.
    from alto_kernels._common import _no_hooks

    assert _no_hooks(None) and not _no_hooks(lambda metadata: None)
    knobs = pytest.importorskip("triton.knobs")
    if not hasattr(knobs, "HookChain"):
        pytest.skip("this Triton has no hook chains")
    chain = knobs.HookChain()
    assert _no_hooks(chain)
    chain.add(lambda metadata: None)
    assert not _no_hooks(chain)


def test_committed_tuned_tables_parse():
    import glob
    import json
    import os

    from alto_kernels import _common

    kernels = {"lora_shrink": fused.lora_shrink_kernel, "lora_expand": fused.lora_expand_kernel,
               "lora_bwd_dy": fused.lora_bwd_dy_kernel, "lora_bwd_dx": fused.lora_bwd_dx_kernel}
    for path in glob.glob(os.path.join(_common.TUNED_DIR, "*.json")):
        with open(path) as f:
            doc = json.load(f)
        assert doc.get("command") and doc.get("device"), path
        for name, rows in doc["kernels"].items():
            params = set(kernels[name].fn.arg_names)
            for row in rows:
                key, config = _common.LaunchKey.from_json(row["key"]), _common.config_from_json(row["config"])
                assert key.dim > 0 and key.R > 0 and key.t_hint > 0
                assert set(config.kwargs) <= params, (path, name, config)


def test_dropout_masks_follow_the_adapters_stream_not_its_neighbours():
    # An adapter's mask must not depend on which adapters share the batch: not on its position
    # (its key comes from its stream), not on the padding width others' sequences set (positions
    # are sequence j, row t with the adapter's own stride).
    K, L, p, seed = 40, 6, [0.3, 0.3], 11
    x_seq = 2  # the adapter's sequences
    first = fused.dropout_mask(seed, [0, x_seq * 4, x_seq * 4 + 3 * 4], p, K, device=DEVICE,
                               streams=[7, 3], width=4, seq_strides=[L, L])[0]
    later = fused.dropout_mask(seed, [0, 5 * 6, 5 * 6 + x_seq * 6], p, K, device=DEVICE,
                               streams=[5, 7], width=6, seq_strides=[L, L])[1]
    assert torch.equal(first.view(x_seq, 4, K), later.view(x_seq, 6, K)[:, :4])
    other = fused.dropout_mask(seed, [0, x_seq * 4], p[:1], K, device=DEVICE, streams=[8], width=4,
                               seq_strides=[L])[0]
    assert not torch.equal(first, other)
    # the kernels draw exactly those masks through a plan's stream index and a stream table
    seed_, x, base, A, B, offs, scales, dy = make([x_seq * 4, 3 * 4], [8, 16], K=K, N=24, dtype=torch.float32)
    plan = fused.prepare_multi_lora(x, base, A, B, offs, scales, p, training=True, stream_index=[1, 0],
                                    seq_strides=[L, L])
    table = torch.tensor([3, 7], dtype=torch.int64, device=DEVICE)
    y = fused.apply_multi_lora(plan, x, base.clone(), seed=seed, weights=[*A, *B], streams=table, width=4)
    masks = fused.dropout_mask(seed, offs, p, K, device=DEVICE, streams=[7, 3], width=4, seq_strides=[L, L])
    assert torch.equal(masks[0], first)
    ref = base + multi_lora_reference(x, A, B, offs, scales, dropout_masks=masks, dropout_p=p)
    leaves = [x, *A, *B]
    errs = [rel(a, b) for a, b in zip([y, *grads(y, leaves, dy)], [ref, *grads(ref, leaves, dy)])]
    assert max(errs) < 1e-5, errs


def test_the_candidates_benchmark_runs_its_smoke_case(tmp_path):
    # benchmarks/candidates.py (the GPU call that decides the candidate configs) end to end at tiny
    # sizes: every candidate pinned in turn gives (b)'s outputs and gradients of the table's config
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "candidates.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "candidates.py"), "--smoke",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shape = json.loads(out.read_text())["shapes"]["40->24"]
    rows = shape["lora_shrink"] + shape["lora_bwd_dy"]
    assert len(rows) >= 2 and all(d < 1e-5 for row in rows for d in row["max_rel_diff"].values())
