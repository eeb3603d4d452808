"""fused_linear_multi_lora (frozen base linear + multi-LoRA as one node) against F.linear + the reference.

Runs the Triton kernels in the interpreter on a machine without a GPU (see test_kernels.py).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from alto_kernels import multi_lora_reference  # noqa: E402

fused = pytest.importorskip("alto_kernels.fused", reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
from alto_kernels import _common, fused_linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
K, N = 40, 24


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def grads(y, leaves, dy):
    gs = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, leaves)]


def make(lens, ranks, dtype, with_bias):
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=DEVICE, dtype=dtype)

    offs = [0]
    for n in lens:
        offs.append(offs[-1] + n)
    x = rnd(offs[-1], K).requires_grad_()
    weight = rnd(N, K, s=K ** -0.5)
    bias = rnd(N) if with_bias else None
    A = [rnd(r, K, s=K ** -0.5).requires_grad_() for r in ranks]
    B = [rnd(N, r, s=r ** -0.5).requires_grad_() for r in ranks]
    scales = [float(v) for v in torch.rand(len(ranks), generator=g) * 2 + 0.25]
    return seed, x, weight, bias, A, B, offs, scales, rnd(offs[-1], N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias,p", [(False, None), (True, None), (False, [0.2, 0.0, 0.1, 0.3])])
def test_one_node_linear_matches_linear_plus_reference(dtype, with_bias, p, monkeypatch):
    # Mixed ranks (one of them 1, one 64), an empty segment, lengths off the block sizes. Without a
    # bias the GEMMs add into the deltas the LoRA kernels stored (epilogue order), with one the
    # kernels add into the GEMMs' outputs; either way one node returns dX and every dA_i, dB_i.
    calls = []
    real = fused_linear._linear_apply
    monkeypatch.setattr(fused_linear, "_linear_apply", lambda *a: calls.append(a[6]) or real(*a))
    seed, x, weight, bias, A, B, offs, scales, dy = make([26, 0, 39, 7], [16, 1, 8, 64], dtype, with_bias)
    y = fused_linear.fused_linear_multi_lora(x, weight, A, B, offs, scales, bias=bias, dropout_p=p,
                                             training=p is not None, seed=11)
    assert calls == [fused_linear.LINEAR_ADDS if with_bias else fused_linear.LINEAR_EPILOGUE]
    masks = fused.dropout_mask(11, offs, p, K, device=DEVICE) if p else None
    ref = torch.nn.functional.linear(x, weight, bias) + multi_lora_reference(x, A, B, offs, scales,
                                                                             dropout_masks=masks, dropout_p=p)
    leaves = [x, *A, *B]
    got, want = grads(y, leaves, dy), grads(ref, leaves, dy)  # the reference skips the empty segment
    names = ["y", "dX"] + [f"dA{i}" for i in range(len(A))] + [f"dB{i}" for i in range(len(B))]
    errs = {k: rel(a, b) for k, a, b in zip(names, [y, *got], [ref, *want])}
    bad = {k: e for k, e in errs.items() if not e <= TOL[dtype]}
    assert not bad, f"seed={seed}: {bad}"
    assert all(gp.dtype == w.dtype and gp.shape == w.shape for gp, w in zip(got[1:], leaves[1:]))
    d_a, d_b = got[1:1 + len(A)], got[1 + len(A):]
    assert d_a[1].abs().sum() == 0 and d_b[1].abs().sum() == 0  # the rank-1 adapter has no rows
    assert all(d.abs().sum() > 0 for d in (*d_a[::2], *d_b[::2], d_a[3], d_b[3]))


def test_partial_grads_and_a_second_call_reuse_the_plan():
    # x without grad (a first layer), A_1 frozen: dA_0 and the dB still come back; the second call
    # finds the cached plan and, after an in-place update of A_0, reads the new values.
    _, x, weight, _, A, B, offs, scales, dy = make([9, 14], [8, 4], torch.float32, False)
    xs = x.detach()
    A[1].requires_grad_(False)
    n_plans = len(fused._PLANS)
    for step in range(2):
        y = fused_linear.fused_linear_multi_lora(xs, weight, A, B, offs, scales)
        ref = torch.nn.functional.linear(xs, weight) + multi_lora_reference(xs, A, B, offs, scales)
        leaves = [A[0], *B]
        got, want = torch.autograd.grad(y, leaves, dy), torch.autograd.grad(ref, leaves, dy)
        assert rel(y, ref) < 1e-5 and max(rel(a, b) for a, b in zip(got, want)) < 1e-5, step
        with torch.no_grad():
            A[0].mul_(-2.0)
    assert len(fused._PLANS) == n_plans + 1


@pytest.mark.parametrize("op", ["linear", "lora"])
def test_a_weight_changed_in_place_before_the_backward_is_an_error(op):
    # The kernels read A_i, B_i in the backward through their addresses: an in-place change between
    # forward and backward must raise (autograd's check of the tensors it saved), not give
    # gradients of other weights. Changed after the backward (an optimizer step), the next call is fine.
    _, x, weight, _, A, B, offs, scales, dy = make([9, 14], [8, 4], torch.float32, False)

    def call():
        if op == "linear":
            return fused_linear.fused_linear_multi_lora(x, weight, A, B, offs, scales)
        return fused.fused_multi_lora(x, torch.nn.functional.linear(x, weight), A, B, offs, scales)

    y = call()
    with torch.no_grad():
        B[1].add_(1.0)
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation"):
        torch.autograd.grad(y, [x, *A, *B], dy)
    y = call()  # the new values, read again from the cached plan's addresses
    got = torch.autograd.grad(y, [x, *A, *B], dy)
    ref = torch.nn.functional.linear(x, weight) + multi_lora_reference(x, A, B, offs, scales)
    want = torch.autograd.grad(ref, [x, *A, *B], dy)
    assert max(rel(a, b) for a, b in zip(got, want)) < 1e-5
    with torch.no_grad():
        B[1].add_(1.0)  # after the backward: nothing left to check it against
    torch.autograd.grad(call(), [x, *A, *B], dy)


@pytest.mark.parametrize("op", ["linear", "lora"])
def test_a_second_backward_through_a_retained_graph_gives_the_same_gradients(op):
    # The forward's expand zero-fills the backward's G; a second backward through the retained
    # graph must start from zeros again, not add into the first's G.
    _, x, weight, _, A, B, offs, scales, dy = make([9, 14, 0, 5], [8, 4, 2, 16], torch.float32, False)
    if op == "linear":
        y = fused_linear.fused_linear_multi_lora(x, weight, A, B, offs, scales)
    else:
        y = fused.fused_multi_lora(x, torch.nn.functional.linear(x, weight), A, B, offs, scales)
    first = torch.autograd.grad(y, [x, *A, *B], dy, retain_graph=True)
    second = torch.autograd.grad(y, [x, *A, *B], dy)
    ref = torch.nn.functional.linear(x, weight) + multi_lora_reference(x, A, B, offs, scales)
    want = grads(ref, [x, *A, *B], dy)  # the empty segment's adapter is unused there: zeros
    assert max(rel(a, b) for a, b in zip(first, want)) < 1e-5
    assert max(rel(a, b) for a, b in zip(second, want)) < 1e-5


@pytest.mark.parametrize("op", ["linear", "lora"])
def test_direct_apply_skips_only_function_apply_s_wrapper(op, monkeypatch):
    # _common.DIRECT_APPLY: alto's Functions call the C++ apply straight, past torch.autograd.Function.apply's Python
    # wrapper (which unwraps functorch's dead wrappers): same numbers, the wrapper not run, and
    # inside a functorch transform the wrapper again (which refuses these Functions there).
    import torch._functorch.utils as ft_utils
    unwraps = []
    real_unwrap = ft_utils.unwrap_dead_wrappers
    monkeypatch.setattr(ft_utils, "unwrap_dead_wrappers", lambda args: unwraps.append(1) or real_unwrap(args))
    _, x, weight, _, A, B, offs, scales, dy = make([9, 14, 5], [8, 4, 16], torch.float32, False)

    def call(x):
        if op == "linear":
            return fused_linear.fused_linear_multi_lora(x, weight, A, B, offs, scales)
        return fused.fused_multi_lora(x, torch.nn.functional.linear(x, weight), A, B, offs, scales)

    got = {}
    for direct in (True, False):
        monkeypatch.setattr(_common, "DIRECT_APPLY", direct)
        unwraps.clear()
        y = call(x)
        got[direct] = (y, *torch.autograd.grad(y, [x, *A, *B], dy))
        assert len(unwraps) == (0 if direct else 1)
    assert all(torch.equal(a, b) for a, b in zip(got[True], got[False]))
    monkeypatch.setattr(_common, "DIRECT_APPLY", True)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.vmap(call)(x.detach()[None])


def test_gemm_flag_puts_the_expand_in_alto_s_gemm(monkeypatch):
    calls = []
    real = fused_linear.lora_gemm
    monkeypatch.setattr(fused_linear, "lora_gemm", lambda *a, **k: calls.append(k["forward"]) or real(*a, **k))
    seed, x, weight, _, A, B, offs, scales, dy = make([16, 5, 27], [16, 1, 8], torch.bfloat16, False)
    y = fused_linear.fused_linear_multi_lora(x, weight, A, B, offs, scales, gemm=True)
    ref = torch.nn.functional.linear(x, weight) + multi_lora_reference(x, A, B, offs, scales)
    got, want = torch.autograd.grad(y, [x, *A, *B], dy), torch.autograd.grad(ref, [x, *A, *B], dy)
    assert calls == [True, False]
    errs = [rel(y, ref)] + [rel(a, b) for a, b in zip(got, want)]
    assert max(errs) <= TOL[torch.bfloat16], f"seed={seed}: {errs}"


def test_bad_inputs_name_the_field():
    _, x, weight, bias, A, B, offs, scales, _ = make([6, 4], [4, 2], torch.float32, True)
    call = fused_linear.fused_linear_multi_lora
    with pytest.raises(ValueError, match="require grad"):
        call(x, weight.clone().requires_grad_(), A, B, offs, scales)
    with pytest.raises(ValueError, match="x must be"):
        call(x, weight[:, :8], A, B, offs, scales)
    with pytest.raises(ValueError, match="bias must be"):
        call(x, weight, A, B, offs, scales, bias=bias[:5])
    with pytest.raises(ValueError, match="outputs"):
        call(x, weight[:8], A, B, offs, scales)
    with pytest.raises(ValueError, match="rank must be > 0"):
        call(x, weight, [A[0], A[1][:0]], [B[0], B[1][:, :0]], offs, scales)
    with pytest.raises(ValueError, match="seg_offsets"):
        call(x, weight, A, B, [0, 3, 9], scales)
    y = call(x[:0], weight, A, B, [0, 0, 0], scales, bias=bias)  # no tokens: the base linear
    assert y.shape == (0, N)


def test_kernels_benchmark_times_every_variant_of_a_case():
    # benchmarks/lora_kernels.py's case runner on the interpreter at a tiny size: every variant
    # runs (a broken one would cost a GPU session) and the ratios come from the right pairs.
    import importlib.util
    import pathlib
    import time

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "lora_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_lora_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def once(fn, **_):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    import alto_kernels
    case = bench.bench_case(alto_kernels, 32, 48, 2, 16, "mixed", once, rep_ms=1, dev=DEVICE)
    ms = case["median_ms"]
    assert set(bench.result_variants()) - {"fused_jit_dispatch", "fused_sink_jit_dispatch"} <= set(ms)
    approx = lambda v: pytest.approx(v, rel=1e-3, abs=1e-4)  # noqa: E731 - both are rounded
    assert case["fused_over_base"] == approx(ms["fused_linear_op"] / ms["base"])
    assert case["fused_inplace_over_base"] == approx(ms["fused"] / ms["base"])
    assert case["sequential_over_fused"] == approx(ms["sequential"] / ms["fused_linear_op"])


def _sibling_case(dtype, p, used, need_x=True, one_pass=True, monkeypatch=None):
    """Three siblings (outputs 24, 8, 16) of one x: each sibling's own node, summed by autograd,
    and the sibling node (its dX in one ``lora_bwd_dx_siblings`` pass, or one ``lora_bwd_dx``
    each); returns each way's outputs, dX and sinks, and the one-pass launches."""
    from alto_kernels import sibling_linear
    from alto_kernels.sibling_linear import apply_sibling_linears_multi_lora

    if monkeypatch is not None:
        monkeypatch.setattr(sibling_linear, "ONE_PASS", one_pass)
    launches = sum(sibling_linear._BWD_DX_SIB.launches.values())

    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=DEVICE, dtype=dtype)

    offs, ranks, outs = [0, 26, 26, 65], [16, 1, 8], [24, 8, 16]
    x0 = rnd(65, K)
    sib = [(rnd(n, K, s=K ** -0.5), [rnd(r, K, s=K ** -0.5) for r in ranks], [rnd(n, r, s=r ** -0.5) for r in ranks],
            rnd(65, n)) for n in outs]
    scales = [1.5, 0.5, 2.0]
    got = {}
    for way in ("own nodes", "sibling node"):
        x = x0.clone().requires_grad_(need_x)
        plans, sinks = [], []
        for w, A, B, _ in sib:
            ga = [torch.zeros(a.shape, device=DEVICE) for a in A]
            gb = [torch.zeros(b.shape, device=DEVICE) for b in B]
            plans.append(fused.prepare_multi_lora(x, torch.empty(65, w.shape[0], device=DEVICE, dtype=dtype), A, B,
                                                  offs, scales, p, training=True, grad_a=ga, grad_b=gb))
            sinks += ga + gb
        seeds = [11, 12, 13]
        if way == "own nodes":
            ys = [fused_linear.apply_linear_multi_lora(pl, x, w, None, seed=s) for pl, (w, *_), s in zip(plans, sib, seeds)]
        else:
            ys = apply_sibling_linears_multi_lora(plans, x, [w for w, *_ in sib], seeds)
        loss = sum((y.float() * dy.float()).sum() for j, (y, (*_, dy)) in enumerate(zip(ys, sib)) if j in used)
        loss.backward()
        got[way] = ([y.detach() for y in ys], x.grad, sinks)
    return seed, got, sum(sibling_linear._BWD_DX_SIB.launches.values()) - launches


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("dtype,p,used", [(torch.float32, None, (0, 1, 2)), (torch.bfloat16, None, (0, 1, 2)),
                                          (torch.float32, [0.2, 0.0, 0.3], (0, 1, 2)),
                                          (torch.float32, None, (1,)), (torch.float32, None, (0, 2))])
def test_sibling_linears_as_one_node_match_a_node_each(dtype, p, used, one_pass, monkeypatch):
    # q/k/v-like siblings of one input: the same outputs, dX and dA/dB sinks as one one-node linear
    # per sibling (whose dX autograd sums); dropout drawn with each sibling's own seed; outputs
    # that never reach the loss get no gradient. The dX pass: one launch for all siblings, or
    # one each adding into the first's
    seed, got, launches = _sibling_case(dtype, p, used, one_pass=one_pass, monkeypatch=monkeypatch)
    assert launches == (1 if one_pass else 0)
    (y0, dx0, s0), (y1, dx1, s1) = got["own nodes"], got["sibling node"]
    for a, b in zip(y1, y0):
        assert rel(a, b) <= TOL[dtype] / 10, f"seed={seed}"
    assert rel(dx1, dx0) <= TOL[dtype], f"seed={seed}"
    unused = {j for j in range(3) if j not in used}
    for i, (a, b) in enumerate(zip(s1, s0)):
        sibling = i // 6  # 3 dA then 3 dB sinks per sibling
        assert rel(a, b) <= TOL[dtype], f"seed={seed} sink {i}"
        assert (a.abs().max().item() == 0) == (sibling in unused or b.abs().max().item() == 0)


def test_sibling_linears_without_an_input_gradient_fill_only_the_sinks(monkeypatch):
    seed, got, launches = _sibling_case(torch.float32, None, (0, 1, 2), need_x=False, monkeypatch=monkeypatch)
    assert launches == 1
    (_, dx0, s0), (_, dx1, s1) = got["own nodes"], got["sibling node"]
    assert dx0 is None and dx1 is None
    assert all(rel(a, b) <= 1e-5 for a, b in zip(s1, s0)), f"seed={seed}"


def test_sibling_linears_bad_inputs_name_the_field():
    from alto_kernels.sibling_linear import apply_sibling_linears_multi_lora

    x = torch.randn(10, K, device=DEVICE)
    A, B = [torch.randn(4, K, device=DEVICE)], [torch.randn(N, 4, device=DEVICE)]
    sink = fused.prepare_multi_lora(x, torch.empty(10, N, device=DEVICE), A, B, [0, 10], [1.0],
                                    grad_a=[torch.zeros(4, K, device=DEVICE)], grad_b=[torch.zeros(N, 4, device=DEVICE)])
    plain = fused.prepare_multi_lora(x, torch.empty(10, N, device=DEVICE), A, B, [0, 10], [1.0])
    w = torch.randn(N, K, device=DEVICE)
    with pytest.raises(ValueError, match="one length"):
        apply_sibling_linears_multi_lora([sink], x, [w, w], [0])
    with pytest.raises(ValueError, match=r"plans\[1\] has no gradient sink"):
        apply_sibling_linears_multi_lora([sink, plain], x, [w, w], [0, 0])
    with pytest.raises(ValueError, match=r"weights\[0\] must be"):
        apply_sibling_linears_multi_lora([sink], x, [w.t().contiguous()], [0])
