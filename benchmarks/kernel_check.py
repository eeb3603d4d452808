"""GPU correctness of the fused multi-LoRA kernels at Llama-8B layer shapes (bf16, mixed ranks).

For each shape (4096→4096, 4096→14336, 14336→4096), with and without dropout, compares the
fused kernel's LoRA delta, dX, dA_i and dB_i against ``multi_lora_reference`` run in fp32 on
the same (bf16-valued) inputs and the kernel's own dropout masks; prints ‖out−ref‖/‖ref‖ and
the bf16 reference's own error for scale. Exits 1 on any error over the tolerance or NaN.

    python benchmarks/kernel_check.py [--tokens 512] [--tol 2e-2]
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]


def import_alto_kernels():
    """``alto_kernels`` when installed, else straight from the repo's kernels/alto_kernels/ (device machine)."""
    try:
        import alto_kernels
        return alto_kernels
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "alto_kernels", os.path.join(REPO, "kernels", "alto_kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(REPO, "kernels", "alto_kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["alto_kernels"] = mod
        spec.loader.exec_module(mod)
        return mod


def make_weights(ranks, K, N, dtype, device, gen):
    A = [(torch.randn(r, K, device=device, generator=gen) * K ** -0.5).to(dtype).requires_grad_() for r in ranks]
    B = [(torch.randn(N, r, device=device, generator=gen) * r ** -0.5).to(dtype).requires_grad_() for r in ranks]
    return A, B


def linear_case(adapters: int, tokens: int, rank: int, K: int, N: int, dtype=torch.bfloat16, device="cuda"):
    """The (b) op's inputs at one shape (seeded) and its fwd+bwd: ``(x, W, A, B, dy, op)``."""
    from alto_kernels.fused_linear import fused_linear_multi_lora

    offs, scales = [i * tokens for i in range(adapters + 1)], [2.0] * adapters
    gen = torch.Generator(device=device).manual_seed(0)
    A, B = make_weights([rank] * adapters, K, N, dtype, device, gen)
    W = (torch.randn(N, K, device=device, generator=gen) * K ** -0.5).to(dtype)
    x = torch.randn(adapters * tokens, K, device=device, dtype=dtype, generator=gen).requires_grad_()
    dy = torch.randn(adapters * tokens, N, device=device, dtype=dtype, generator=gen)

    def op():
        torch.autograd.grad(fused_linear_multi_lora(x, W, A, B, offs, scales), [x, *A, *B], dy)
    return x, W, A, B, dy, op


def hot_case_calls(adapters: int, tokens: int, dim: int, dtype, device) -> dict:
    """The host-cost benchmarks' hot case (``adapters`` r16 adapters x ``tokens`` rows, dim->dim):
    each entry point as a zero-argument fwd+bwd, by name. ``alto_kernels`` is whichever is
    importable (host_overhead_cpu.py may put an earlier commit's first on the path)."""
    import torch.nn.functional as F

    from alto_kernels import apply_linear_multi_lora  # the package's: older kernels have it in fused
    from alto_kernels.fused import apply_multi_lora, fused_multi_lora, prepare_multi_lora
    from alto_kernels.fused_linear import fused_linear_multi_lora
    n, K = adapters, dim
    offs = [i * tokens for i in range(n + 1)]
    scales = [2.0] * n
    A, B = make_weights([16] * n, K, K, dtype, device, None)
    W = (torch.randn(K, K, device=device) * K ** -0.5).to(dtype)
    x = torch.randn(n * tokens, K, device=device).to(dtype).requires_grad_()
    dy = torch.randn(n * tokens, K, device=device).to(dtype)
    sinks = [torch.zeros(w.shape, device=device) for w in (*A, *B)]
    plan = prepare_multi_lora(x, F.linear(x, W).detach(), [a.detach() for a in A], [b.detach() for b in B],
                              offs, scales, grad_a=sinks[:n], grad_b=sinks[n:])
    grad = torch.autograd.grad
    return {
        "base (a)": lambda: grad(F.linear(x, W), [x], dy),
        "fused_linear_multi_lora (b)": lambda: grad(fused_linear_multi_lora(x, W, A, B, offs, scales), [x, *A, *B], dy),
        "fused_multi_lora (b-, two nodes)": lambda: grad(fused_multi_lora(x, F.linear(x, W), A, B, offs, scales),
                                                         [x, *A, *B], dy),
        "the engine's two-node path (sink)": lambda: grad(apply_multi_lora(plan, x, F.linear(x, W)), [x], dy),
        "the engine's one-node path (b'', sink)": lambda: grad(apply_linear_multi_lora(plan, x, W), [x], dy),
    }


def rotating_inputs(T, K, N, dtype, device, gen):
    """A function giving the next (X, dY) pair, cycling through enough pairs to outgrow the 50 MB L2."""
    per_set = 2 * T * (K + N) * 2
    nrot = max(1, min(4, math.ceil(256e6 / per_set)))
    sets = [(torch.randn(T, K, device=device, generator=gen).to(dtype).requires_grad_(),
             torch.randn(T, N, device=device, generator=gen).to(dtype)) for _ in range(nrot)]
    it = [0]

    def nxt():
        it[0] = (it[0] + 1) % nrot
        return sets[it[0]]
    return nxt


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_shape(ak, K, N, lens, ranks, dropout, tol, gen):
    from alto_kernels.fused import dropout_mask, fused_multi_lora
    dev, dt = "cuda", torch.bfloat16
    offs = [0]
    for n in lens:
        offs.append(offs[-1] + n)
    T = offs[-1]
    scales = [2.0 * 16 / r for r in ranks]
    ps = [0.1] * len(ranks) if dropout else None
    x = torch.randn(T, K, device=dev, generator=gen).to(dt).requires_grad_()
    A, B = make_weights(ranks, K, N, dt, dev, gen)
    base = torch.randn(T, N, device=dev, generator=gen).to(dt)
    dy = torch.randn(T, N, device=dev, generator=gen).to(dt)
    runs = []  # twice: the first launch of a variant goes through Triton, the second is direct
    for _ in range(2):
        y = fused_multi_lora(x, base.clone(), A, B, offs, scales, dropout_p=ps, training=dropout, seed=1234)
        runs.append([y.float() - base.float()] + list(torch.autograd.grad(y, [x, *A, *B], dy)))
    masks = dropout_mask(1234, offs, ps, K, device=dev) if dropout else None
    leaves32 = [t.detach().float().requires_grad_() for t in [x, *A, *B]]
    n = len(ranks)
    errs = {}
    for name, prec in (("fp32", leaves32), ("bf16", [x, *A, *B])):
        d = ak.multi_lora_reference(prec[0], prec[1:1 + n], prec[1 + n:], offs, scales,
                                    dropout_masks=masks, dropout_p=ps)
        g = torch.autograd.grad(d, prec, dy.to(d.dtype), allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, prec)]
        errs[name] = [d.float()] + [gi.float() for gi in g]
    ref = errs["fp32"]
    names = ["delta", "dX"] + [f"dA{i}" for i in range(n)] + [f"dB{i}" for i in range(n)]
    worst, ok = {}, True
    for run, got in enumerate(runs):
        for k, a, b, c in zip(names, got, ref, errs["bf16"]):
            e, e_bf = rel(a.float(), b), rel(c, b)
            key = k.rstrip("0123456789")
            worst[key] = max(worst.get(key, 0.0), e)
            if not (e <= tol) or not torch.isfinite(a).all():
                ok = False
                print(f"  FAIL {k} (call {run + 1}): fused {e:.2e} (bf16 reference {e_bf:.2e})")
    # The engine's path: a prepared plan whose backward adds dA/dB into fp32 gradient sinks.
    from alto_kernels.fused import apply_multi_lora, prepare_multi_lora
    Ac, Bc = [a.detach() for a in A], [b.detach() for b in B]
    ga, gb = [torch.zeros(a.shape, device=dev) for a in A], [torch.zeros(b.shape, device=dev) for b in B]
    xs = x.detach().requires_grad_()
    plan = prepare_multi_lora(xs, base, Ac, Bc, offs, scales, dropout_p=ps, training=dropout, grad_a=ga, grad_b=gb)
    for run in range(2):
        for g in (*ga, *gb):
            g.zero_()
        xs.grad = None
        ys = apply_multi_lora(plan, xs, base.clone(), seed=1234)
        ys.backward(dy)
        for k, a, b in zip(["sink_delta", "sink_dX"] + [f"sink_dA{i}" for i in range(n)] + [f"sink_dB{i}" for i in range(n)],
                           [ys.detach().float() - base.float(), xs.grad, *ga, *gb], ref):
            e = rel(a.float(), b)
            key = k.rstrip("0123456789")
            worst[key] = max(worst.get(key, 0.0), e)
            if not (e <= tol) or not torch.isfinite(a).all():
                ok = False
                print(f"  FAIL {k} (call {run + 1}): fused with gradient sink {e:.2e}")
    tag = f"{K}->{N} T={T} ranks={sorted(set(ranks))} dropout={'0.1' if dropout else 'off'}"
    print(f"{'ok  ' if ok else 'FAIL'} {tag}: " + " ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    return ok


def check_rms_norm(tol, gen):
    """The fused RMSNorm at the 8B hidden size (and an odd one), bf16, against the fp32 formula."""
    from alto_kernels import rms_norm, rms_norm_reference
    ok = True
    for T, N in ((4096, 4096), (3000, 3000)):
        x = (torch.randn(T, N, device="cuda", generator=gen) * 2).to(torch.bfloat16).requires_grad_()
        w = (1 + 0.1 * torch.randn(N, device="cuda", generator=gen)).to(torch.bfloat16)
        dy = torch.randn(T, N, device="cuda", generator=gen).to(torch.bfloat16)
        for call in range(2):  # the second call is a direct launch
            y = rms_norm(x, w, 1e-5)
            (dx,) = torch.autograd.grad(y, [x], dy)
            x32 = x.detach().float().requires_grad_()
            ref = rms_norm_reference(x32, w.float(), 1e-5)
            (dx_ref,) = torch.autograd.grad(ref, [x32], dy.float())
            e_y, e_dx = rel(y.float(), ref), rel(dx.float(), dx_ref)
            good = e_y <= tol and e_dx <= tol and bool(torch.isfinite(dx).all())
            ok &= good
            if call == 1 or not good:
                print(f"{'ok  ' if good else 'FAIL'} rms_norm T={T} N={N} (call {call + 1}): y {e_y:.2e} dX {e_dx:.2e}")
    return ok


def check_silu_mul(tol, gen):
    """The fused SwiGLU product at the 8B MLP width, bf16, against the fp32 formula."""
    from alto_kernels import silu_mul, silu_mul_reference
    g = (torch.randn(4096, 14336, device="cuda", generator=gen) * 2).to(torch.bfloat16).requires_grad_()
    u = torch.randn(4096, 14336, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
    dh = torch.randn(4096, 14336, device="cuda", generator=gen).to(torch.bfloat16)
    ok = True
    for call in range(3):  # tuned, compiled, then direct
        h = silu_mul(g, u)
        dg, du = torch.autograd.grad(h, [g, u], dh)
        g32, u32 = g.detach().float().requires_grad_(), u.detach().float().requires_grad_()
        ref = silu_mul_reference(g32, u32)
        dg_ref, du_ref = torch.autograd.grad(ref, [g32, u32], dh.float())
        errs = [rel(h.float(), ref), rel(dg.float(), dg_ref), rel(du.float(), du_ref)]
        good = all(e <= tol for e in errs) and bool(torch.isfinite(dg).all())
        ok &= good
        if call == 2 or not good:
            print(f"{'ok  ' if good else 'FAIL'} silu_mul 4096x14336 (call {call + 1}): h {errs[0]:.2e} "
                  f"dG {errs[1]:.2e} dU {errs[2]:.2e}")
    return ok


def check_cross_entropy(tol, gen):
    """The token cross-entropy at Llama-3's vocabulary, 4096 tokens, bf16 logits made by a head
    (its gradient written over them), against ``F.cross_entropy`` of their fp32 upcast."""
    from alto_kernels import cross_entropy, cross_entropy_reference
    V, H = 128256, 4096
    hidden = torch.randn(4096, H, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
    head = (torch.randn(V, H, device="cuda", generator=gen) * H ** -0.5).to(torch.bfloat16)
    targets = torch.randint(0, V, (4096,), device="cuda", generator=gen)
    targets[7] = -100
    d_loss = torch.rand(4096, device="cuda", generator=gen) / 512
    h_ref = hidden.detach().clone().requires_grad_()
    ref = cross_entropy_reference(h_ref @ head.t(), targets)
    (dh_ref,) = torch.autograd.grad(ref, [h_ref], d_loss)
    ok = True
    for call in range(3):  # tuned, compiled, then direct
        loss = cross_entropy(hidden @ head.t(), targets)
        (dh,) = torch.autograd.grad(loss, [hidden], d_loss)
        errs = [rel(loss, ref), rel(dh.float(), dh_ref.float())]
        good = all(e <= tol for e in errs) and bool(torch.isfinite(dh).all()) and float(loss[7]) == 0.0
        ok &= good
        if call == 2 or not good:
            print(f"{'ok  ' if good else 'FAIL'} cross_entropy 4096x{V} (call {call + 1}): loss {errs[0]:.2e} "
                  f"dHidden {errs[1]:.2e}")
    return ok


def linear_rows():
    """Ranks and segment offsets of the one-node checks: 8 adapters, mixed ranks, an empty
    segment and lengths off any block size; returns ``(ranks, offsets, tokens)``."""
    ranks, lens = [16, 8, 32, 64, 16, 8, 32, 64], [512, 300, 0, 700, 512, 129, 1, 512]
    offs = [0]
    for n in lens:
        offs.append(offs[-1] + n)
    return ranks, offs, offs[-1]


def check_linear(K, N, tol, gen):
    """The engine's one-node path (``apply_linear_multi_lora``: base GEMM + deltas as one node)
    against the two-node path on the same plan, bf16, dropout 0.1: the epilogue variant (the
    GEMMs add into the stored deltas, ``addmm_``) twice, then the in-kernel adds (``ADD_DX``),
    then the public op ``fused_linear_multi_lora`` (weights' gradients returned, not sunk)."""
    from alto_kernels.fused import apply_multi_lora, prepare_multi_lora
    from alto_kernels.fused_linear import apply_linear_multi_lora
    dev, dt = "cuda", torch.bfloat16
    ranks, offs, T = linear_rows()
    A, B = make_weights(ranks, K, N, dt, dev, gen)
    A, B = [a.detach() for a in A], [b.detach() for b in B]
    weight = (torch.randn(N, K, device=dev, generator=gen) * K ** -0.5).to(dt)
    x0 = torch.randn(T, K, device=dev, generator=gen).to(dt)
    dy = torch.randn(T, N, device=dev, generator=gen).to(dt)
    out = {}
    for path in ("two", "one", "one again", "one, kernel adds", "op"):  # the third call is a direct launch
        ga = [torch.zeros(a.shape, device=dev) for a in A]
        gb = [torch.zeros(b.shape, device=dev) for b in B]
        x = x0.clone().requires_grad_()
        if path == "op":  # the public op: plain weights, their gradients returned by autograd
            from alto_kernels.fused_linear import fused_linear_multi_lora
            leaves = [x] + [w.clone().requires_grad_() for w in (*A, *B)]
            y = fused_linear_multi_lora(x, weight, leaves[1:9], leaves[9:], offs, [2.0] * 8, dropout_p=[0.1] * 8,
                                        training=True, seed=3)
            dx, *dw = torch.autograd.grad(y, leaves, dy)
            out[path] = (y.detach(), dx, torch.cat([g.float().flatten() for g in dw]))
            continue
        plan = prepare_multi_lora(x, torch.empty(T, N, device=dev, dtype=dt), A, B, offs, [2.0] * 8, [0.1] * 8,
                                  training=True, grad_a=ga, grad_b=gb)
        if path == "two":
            y = apply_multi_lora(plan, x, torch.nn.functional.linear(x, weight), seed=3)
        else:
            y = apply_linear_multi_lora(plan, x, weight, None, seed=3, epilogue=path != "one, kernel adds")
        (dx,) = torch.autograd.grad(y, [x], dy)
        out[path] = (y.detach(), dx, torch.cat([g.flatten() for g in ga + gb]))
    ok = True
    for path in ("one", "one again", "one, kernel adds", "op"):
        # y: equal up to bf16 rounding (the epilogue rounds base + delta once; and cuBLAS may sum
        # a GEMM in another order from call to call, seen at 4096->4096 on the H100).
        same_y = torch.equal(out[path][0], out["two"][0])
        e_y = rel(out[path][0].float(), out["two"][0].float())
        e_dx, e_s = rel(out[path][1].float(), out["two"][1].float()), rel(out[path][2], out["two"][2])
        # sinks: fp32 atomics sum in another order; the op's dA/dB are rounded to bf16 once
        good = e_y <= tol / 4 and e_dx <= tol / 4 and e_s <= (tol / 4 if path == "op" else 1e-4)
        ok &= good
        if path != "one" or not good:
            print(f"{'ok  ' if good else 'FAIL'} linear+LoRA one node {K}->{N} T={T} ({path}) vs two nodes: "
                  f"y {e_y:.2e} (equal: {same_y}), dX {e_dx:.2e}, sinks {e_s:.2e}")
    return ok


def check_siblings(K, outs, tol, gen):
    """Sibling linears of one input (q/k/v: outputs ``outs``) as one node
    (``apply_sibling_linears_multi_lora``: dX summed in its backward, by one
    ``lora_bwd_dx_siblings`` pass or by one ``lora_bwd_dx`` each adding into the first's) against
    one one-node linear each (autograd sums their dX), bf16, dropout 0.1, each sibling with its
    own seed."""
    from alto_kernels import sibling_linear
    from alto_kernels.fused import prepare_multi_lora
    from alto_kernels.fused_linear import apply_linear_multi_lora
    from alto_kernels.sibling_linear import apply_sibling_linears_multi_lora
    dev, dt = "cuda", torch.bfloat16
    ranks, offs, T = linear_rows()
    one_pass = sibling_linear.ONE_PASS
    sib = []
    for N in outs:
        A, B = make_weights(ranks, K, N, dt, dev, gen)
        sib.append(([a.detach() for a in A], [b.detach() for b in B],
                    (torch.randn(N, K, device=dev, generator=gen) * K ** -0.5).to(dt),
                    torch.randn(T, N, device=dev, generator=gen).to(dt)))
    x0 = torch.randn(T, K, device=dev, generator=gen).to(dt)
    out = {}
    paths = ("own nodes", "sibling node, one dX pass", "sibling node, one dX pass again", "sibling node, a dX pass each")
    launches = {}
    for path in paths:
        sibling_linear.ONE_PASS = "one dX pass" in path
        before = sum(sibling_linear._BWD_DX_SIB.launches.values())
        x = x0.clone().requires_grad_()
        plans, sinks = [], []
        for A, B, w, _ in sib:
            ga = [torch.zeros(a.shape, device=dev) for a in A]
            gb = [torch.zeros(b.shape, device=dev) for b in B]
            plans.append(prepare_multi_lora(x, torch.empty(T, w.shape[0], device=dev, dtype=dt), A, B, offs, [2.0] * 8,
                                            [0.1] * 8, training=True, grad_a=ga, grad_b=gb))
            sinks += ga + gb
        seeds = [3 + j for j in range(len(sib))]
        if path == "own nodes":
            ys = [apply_linear_multi_lora(p, x, w, None, seed=s) for p, (_, _, w, _), s in zip(plans, sib, seeds)]
        else:
            ys = apply_sibling_linears_multi_lora(plans, x, [w for _, _, w, _ in sib], seeds)
        (dx,) = torch.autograd.grad(ys, [x], [dy for *_, dy in sib])
        out[path] = (torch.cat([y.detach().flatten() for y in ys]), dx, torch.cat([g.flatten() for g in sinks]))
        launches[path] = sum(sibling_linear._BWD_DX_SIB.launches.values()) - before
    sibling_linear.ONE_PASS = one_pass
    ok = True
    if launches["sibling node, one dX pass"] != 1:
        ok = False
        print("FAIL: the siblings' one-pass dX did not run")
    for path in paths[1:]:
        e_y = rel(out[path][0].float(), out["own nodes"][0].float())
        e_dx, e_s = rel(out[path][1].float(), out["own nodes"][1].float()), rel(out[path][2], out["own nodes"][2])
        # dX: the LoRA parts summed in fp32 and rounded once, not each rounded and added in bf16
        good = e_y <= tol / 4 and e_dx <= tol / 4 and e_s <= 1e-4
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} sibling linears {K}->{outs} T={T} ({path}; one-pass dX launches: "
              f"{launches[path]}) vs a node each: y {e_y:.2e}, dX {e_dx:.2e}, sinks {e_s:.2e}")
    return ok


def check_rotary(tol, gen):
    """The fused rotary at the 8B attention shape (32 q / 8 kv heads of 128, 8 x 512 tokens,
    per-sequence positions), bf16: against the fp32 formula, and bit for bit against eager bf16."""
    from alto_kernels import rotary, rotary_reference
    B, L, D = 8, 512, 128
    q = (torch.randn(B, L, 32 * D, device="cuda", generator=gen) * 2).to(torch.bfloat16)
    k = (torch.randn(B, L, 8 * D, device="cuda", generator=gen) * 2).to(torch.bfloat16)
    q = q.view(B, L, 32, D).transpose(1, 2).detach().requires_grad_()   # as the attention module views them
    k = k.view(B, L, 8, D).transpose(1, 2).detach().requires_grad_()
    pos = torch.randint(0, 8192, (B, L), device="cuda", generator=gen).float()
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
    dq_out = torch.randn(q.shape, device="cuda", generator=gen).to(torch.bfloat16)
    dk_out = torch.randn(k.shape, device="cuda", generator=gen).to(torch.bfloat16)
    ok = True
    for call in range(2):  # the second call is a direct launch
        qe, ke = rotary(q, k, cos, sin)
        dq, dk = torch.autograd.grad((qe, ke), (q, k), (dq_out, dk_out))
        eq, ek = rotary_reference(q, k, cos, sin)
        edq, edk = torch.autograd.grad((eq, ek), (q, k), (dq_out, dk_out))
        exact = all(torch.equal(a, b) for a, b in ((qe, eq), (ke, ek), (dq, edq), (dk, edk)))
        q32, k32 = (t.detach().float().requires_grad_() for t in (q, k))
        rq, rk = rotary_reference(q32, k32, cos.float(), sin.float())
        rdq, rdk = torch.autograd.grad((rq, rk), (q32, k32), (dq_out.float(), dk_out.float()))
        errs = [rel(qe.float(), rq), rel(ke.float(), rk), rel(dq.float(), rdq), rel(dk.float(), rdk)]
        good = all(e <= tol for e in errs) and exact and qe.stride() == q.stride()
        ok &= good
        if call == 1 or not good:
            print(f"{'ok  ' if good else 'FAIL'} rotary 8x512 32/8 heads (call {call + 1}): q {errs[0]:.2e} "
                  f"k {errs[1]:.2e} dQ {errs[2]:.2e} dK {errs[3]:.2e}; equal to eager bf16: {exact}")
    return ok


def check_shrink_tickets(K, runs, tol, gen, device="cuda"):
    """With ``ALTO_SHRINK_TICKETS`` on: the shrink pinned to one config per split count, ``runs``
    forwards each, all bitwise equal (the last split adds the partials in a fixed order, so a
    missed ordering shows as a differing run) and within ``tol`` of the fp32 reference."""
    from alto_kernels import _common, fused
    from alto_kernels.reference import multi_lora_reference
    if not getattr(_common, "SHRINK_TICKETS", False):
        print("skip shrink tickets: ALTO_SHRINK_TICKETS is off")
        return True
    launcher = fused._SHRINK
    configs, best, mode = launcher.kernel.configs, dict(launcher.best), os.environ.get("ALTO_AUTOTUNE")
    by_split: dict = {}
    for c in configs:
        by_split.setdefault(c.kwargs["SPLIT_K"], c)
    lens, ranks = [512, 300, 700, 512, 129, 1, 512, 400], [8, 16, 32, 64, 8, 16, 32, 64]
    offs = [0]
    for n in lens:
        offs.append(offs[-1] + n)
    x = torch.randn(offs[-1], K, device=device, generator=gen).to(torch.bfloat16)
    base = torch.randn(offs[-1], K, device=device, generator=gen).to(torch.bfloat16)
    A, B = make_weights(ranks, K, K, torch.bfloat16, device, gen)
    scales = [2.0] * len(ranks)
    with torch.no_grad():
        ref = base.float() + multi_lora_reference(x.float(), [a.float() for a in A], [b.float() for b in B],
                                                  offs, scales)
    ok = True
    os.environ["ALTO_AUTOTUNE"] = "full"  # a new key runs the one config it is given, untimed
    try:
        for split, c in sorted(by_split.items()):
            launcher.kernel.configs = [c]
            launcher.best.clear()
            with torch.no_grad():
                first = fused.fused_multi_lora(x, base.clone(), A, B, offs, scales)
                differing = sum(not torch.equal(fused.fused_multi_lora(x, base.clone(), A, B, offs, scales), first)
                                for _ in range(runs - 1))
            e = rel(first.float() - base.float(), ref - base.float())  # the LoRA delta's error
            good = differing == 0 and e <= tol
            ok &= good
            print(f"{'ok  ' if good else 'FAIL'} shrink tickets {K}->{K} SPLIT_K={split} ({c.kwargs}, {c.num_warps} warps): {runs} forwards, "
                  f"{differing} differing from the first; y {e:.2e}")
    finally:
        launcher.kernel.configs = configs
        launcher.best.clear()
        launcher.best.update(best)
        if mode is None:
            os.environ.pop("ALTO_AUTOTUNE", None)
        else:
            os.environ["ALTO_AUTOTUNE"] = mode
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tol", type=float, default=2e-2)
    ap.add_argument("--siblings-only", action="store_true", help="only the sibling-linear checks")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_check needs a CUDA GPU")
    ak = import_alto_kernels()
    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    print(f"device {torch.cuda.get_device_name()}, seed {gen.initial_seed()}")
    ok = True
    if args.siblings_only:
        ok = check_siblings(4096, (4096, 1024, 1024), args.tol, gen) & check_siblings(4096, (14336, 14336), args.tol, gen)
        print("ALL OK" if ok else "FAILURES")
        sys.exit(0 if ok else 1)
    mixed = [8, 16, 32, 64, 8, 16, 32, 64]
    lens = [512, 300, 0, 700, 512, 129, 1, 512]   # an empty segment, lengths off any block size
    for K, N in SHAPES:
        for dropout in (False, True):
            ok &= check_shape(ak, K, N, lens, mixed, dropout, args.tol, gen)
    ok &= check_shape(ak, 4096, 4096, [512] * 8, [16] * 8, True, args.tol, gen)
    ok &= check_shape(ak, 4096, 4096, [40, 33], [1, 128], False, args.tol, gen)
    for K in (4096, 14336):
        ok &= check_shrink_tickets(K, 50, args.tol, gen)
    ok &= check_rms_norm(args.tol, gen)
    ok &= check_silu_mul(args.tol, gen)
    ok &= check_rotary(args.tol, gen)
    ok &= check_cross_entropy(args.tol, gen)
    for K, N in SHAPES:
        ok &= check_linear(K, N, args.tol, gen)
    ok &= check_siblings(4096, (4096, 1024, 1024), args.tol, gen)  # Llama-8B q/k/v
    ok &= check_siblings(4096, (14336, 14336), args.tol, gen)      # gate/up
    from alto_kernels import _common, fused, fused_cross_entropy, fused_rms_norm, fused_rotary, fused_silu_mul
    counts = {lau.name: dict(lau.launches) for lau in (*fused.LAUNCHERS, fused_rms_norm._FWD, fused_rms_norm._BWD,
                                                       fused_silu_mul._FWD, fused_silu_mul._BWD, fused_rotary._LAUNCH,
                                                       fused_cross_entropy._FWD)}
    print(f"launches (direct launch {'on' if _common.DIRECT_LAUNCH else 'off'}): {counts}")
    # With ALTO_AUTOTUNE=full a check's first call autotunes and its second is the variant's first
    # (Triton) launch, so a kernel checked twice is never launched directly: only "auto" requires it.
    if _common.DIRECT_LAUNCH and not all(c["direct"] > 0 for c in counts.values()):
        if _common.autotune_mode() == "auto":
            ok = False
            print("FAIL: a kernel was never launched directly, so the direct path went unchecked")
        else:
            print("note: ALTO_AUTOTUNE=full: some kernels were not launched directly (direct path unchecked here)")
    print("ALL OK" if ok else "FAILURES")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
