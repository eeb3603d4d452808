"""The token cross-entropy kernel (``alto_kernels.cross_entropy``) against the eager formula.

Same set-up as test_kernels.py: without a GPU the kernel runs in Triton's interpreter, at small
sizes (vocabularies not multiples of the block), with fresh random inputs each run (the seed is
in the failure message).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from alto_kernels import cross_entropy_reference  # noqa: E402

fused_ce = pytest.importorskip("alto_kernels.fused_cross_entropy",
                               reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _case(T, V, dtype, gen, hidden=24):
    """Logits made by a linear from a leaf (as the LM head makes them), targets, per-token grads."""
    h = torch.randn(T, hidden, generator=gen).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(V, hidden, generator=gen) * 0.5).to(DEVICE, dtype)
    targets = torch.randint(0, V, (T,), generator=gen).to(DEVICE)
    d_loss = torch.rand(T, generator=gen).to(DEVICE)
    return h, w, targets, d_loss


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("T,V", [(5, 200), (3, 64), (9, 37)])
def test_loss_and_head_grads_match_the_reference(dtype, tol, T, V):
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    h, w, targets, d_loss = _case(T, V, dtype, gen)
    loss = fused_ce.cross_entropy(h @ w.t(), targets)
    (dh,) = torch.autograd.grad(loss, [h], d_loss)
    h_ref = h.detach().clone().requires_grad_()
    ref = cross_entropy_reference(h_ref @ w.t(), targets)
    (dh_ref,) = torch.autograd.grad(ref, [h_ref], d_loss)
    assert loss.dtype == torch.float32 and loss.shape == (T,)
    assert rel(loss, ref) <= tol, f"seed {seed}: loss {rel(loss, ref):.2e}"
    assert rel(dh, dh_ref) <= tol, f"seed {seed}: dh {rel(dh, dh_ref):.2e}"


def test_the_gradient_is_written_into_the_logits():
    gen = torch.Generator().manual_seed(0)
    h, w, targets, d_loss = _case(4, 70, torch.float32, gen)
    logits = h @ w.t()
    expected = torch.softmax(logits.detach(), -1) - torch.nn.functional.one_hot(targets, 70).float()
    fused_ce.cross_entropy(logits, targets)
    assert torch.allclose(logits.detach(), expected, atol=1e-6)  # d loss / d logits, before scaling


def test_no_grad_leaves_the_logits_alone():
    gen = torch.Generator().manual_seed(1)
    h, w, targets, _ = _case(6, 90, torch.bfloat16, gen)
    with torch.no_grad():
        logits = h @ w.t()
        before = logits.clone()
        loss = fused_ce.cross_entropy(logits, targets)
    assert torch.equal(logits, before)
    assert rel(loss, cross_entropy_reference(before, targets)) <= 1e-2


def test_ignored_and_out_of_range_targets():
    gen = torch.Generator().manual_seed(2)
    h, w, targets, d_loss = _case(5, 40, torch.float32, gen)
    targets[1] = -100
    targets[3] = 40  # outside the vocabulary: NaN for this token only, not a device assert
    loss = fused_ce.cross_entropy(h @ w.t(), targets)
    (dh,) = torch.autograd.grad(loss, [h], d_loss)
    assert loss[1] == 0 and torch.isnan(loss[3])
    ok = torch.tensor([0, 2, 4])
    ref = cross_entropy_reference((h @ w.t()).detach()[ok], targets[ok])
    assert rel(loss[ok], ref) <= 1e-5
    assert torch.isnan(dh[3]).all() and torch.isfinite(dh[ok]).all() and (dh[1] == 0).all()


def test_a_tensor_saved_by_another_node_is_not_read_after_overwrite():
    # exp saves its output for the backward; overwriting it must fail loudly, not corrupt.
    gen = torch.Generator().manual_seed(3)
    h, w, targets, d_loss = _case(3, 30, torch.float32, gen)
    logits = (h @ w.t()).exp()
    loss = fused_ce.cross_entropy(logits, targets)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, [h], d_loss)


def test_a_second_backward_is_refused():
    gen = torch.Generator().manual_seed(4)
    h, w, targets, d_loss = _case(3, 30, torch.float32, gen)
    loss = fused_ce.cross_entropy(h @ w.t(), targets)
    torch.autograd.grad(loss, [h], d_loss, retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagate through it once"):
        torch.autograd.grad(loss, [h], d_loss)


def test_a_leaf_is_copied_and_empty_input_and_bad_input():
    leaf = torch.randn(3, 20, device=DEVICE, requires_grad=True)
    t = torch.tensor([1, 2, 3], device=DEVICE)
    loss = fused_ce.cross_entropy(leaf, t)
    (g,) = torch.autograd.grad(loss.sum(), [leaf])
    ref = torch.softmax(leaf.detach(), -1) - torch.nn.functional.one_hot(t, 20)
    assert torch.allclose(g, ref, atol=1e-6)
    assert fused_ce.cross_entropy(torch.zeros(0, 20, device=DEVICE), t[:0]).shape == (0,)
    with pytest.raises(ValueError, match="targets must be"):
        fused_ce.cross_entropy(torch.randn(3, 20, device=DEVICE), t[:2])
    with pytest.raises(ValueError, match="targets must be"):
        fused_ce.cross_entropy(torch.randn(3, 20, device=DEVICE), t.float())
    with pytest.raises(ValueError, match="logits must be"):
        fused_ce.cross_entropy(torch.randn(3, 20, device=DEVICE).double(), t)


def test_the_benchmark_runs_its_smoke_case(tmp_path):
    """benchmarks/cross_entropy.py (the GPU A/B) end to end at tiny sizes, so a GPU call does not
    find a broken script."""
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "ce.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "cross_entropy.py"), "--smoke",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    case = json.loads(out.read_text())["cases"]["16"]
    assert case["check"]["loss_rel"] < 1e-4 and case["check"]["dhidden_rel"] < 2e-2
    assert case["fused"]["median_ms"] > 0 and case["reference"]["median_ms"] > 0
