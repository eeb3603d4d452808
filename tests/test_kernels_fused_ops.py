"""The fused RMSNorm and SwiGLU kernels against the eager formulas (``*_reference``).

Same set-up as test_kernels.py: without a GPU the kernels run in Triton's interpreter, at small
sizes, with fresh random inputs each run (the seed is in the failure message).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from alto_kernels import rms_norm_reference  # noqa: E402

fused_rms = pytest.importorskip("alto_kernels.fused_rms_norm", reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", [(2, 5, 40), (7, 96), (1, 3, 128)])
def test_forward_and_input_grad_match_the_reference(dtype, tol, shape):
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    N = shape[-1]
    x = (torch.randn(*shape, generator=gen) * 3).to(DEVICE, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(N, generator=gen)).to(DEVICE, dtype)
    dy = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    y = fused_rms.rms_norm(x, w, 1e-6)
    (dx,) = torch.autograd.grad(y, [x], dy)
    assert y.shape == x.shape and y.dtype == dtype and dx.dtype == dtype
    # the oracle in fp32 (the kernel computes in fp32 too), and in the input dtype for the output
    x32 = x.detach().float().requires_grad_()
    ref32 = rms_norm_reference(x32, w.float(), 1e-6)
    (dx_ref,) = torch.autograd.grad(ref32, [x32], dy.float())
    ref = rms_norm_reference(x.detach(), w, 1e-6)
    assert rel(y, ref) <= tol, f"seed {seed}: forward {rel(y, ref):.2e}"
    assert rel(dx, dx_ref) <= tol, f"seed {seed}: dx {rel(dx, dx_ref):.2e}"


def test_a_wider_weight_promotes_the_output_as_the_eager_module_does():
    x = torch.randn(4, 48).to(DEVICE, torch.bfloat16)
    w = torch.rand(48, device=DEVICE) + 0.5          # fp32 weight, bf16 activations
    y = fused_rms.rms_norm(x, w, 1e-5)
    ref = rms_norm_reference(x, w, 1e-5)
    assert y.dtype == ref.dtype == torch.float32
    assert rel(y, ref) <= 1e-2  # x_hat is rounded to bf16 first: one bf16 step where rstd's last bit differs


def test_no_rows_and_bad_input():
    w = torch.ones(16, device=DEVICE)
    empty = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    y = fused_rms.rms_norm(empty, w, 1e-6)
    assert y.shape == (0, 16)
    y.sum().backward()
    with pytest.raises(ValueError, match="weight requires grad"):
        fused_rms.rms_norm(torch.randn(2, 16, device=DEVICE), torch.ones(16, device=DEVICE, requires_grad=True), 1e-6)
    with pytest.raises(ValueError, match=r"weight must be \[16\]"):
        fused_rms.rms_norm(torch.randn(2, 16, device=DEVICE), torch.ones(8, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="must be one of"):
        fused_rms.rms_norm(torch.randn(2, 16, device=DEVICE).double(), torch.ones(16, device=DEVICE), 1e-6)


fused_silu = pytest.importorskip("alto_kernels.fused_silu_mul", reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


# bf16: two roundings (dh*u, then the result) against an fp32 oracle; Triton's interpreter
# truncates fp32 -> bf16 instead of rounding, so one element (shape (1, 1)) can be 2 ulps
# (1.6e-2) off there: the bound is 2e-2, not the 1e-2 that norms over many elements keep.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", [(3, 70), (2, 5, 64), (1, 1)])
def test_silu_mul_forward_and_grads_match_the_reference(dtype, tol, shape):
    from alto_kernels import silu_mul_reference

    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    g = (torch.randn(*shape, generator=gen) * 3).to(DEVICE, dtype).requires_grad_()
    u = torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_()
    dh = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    h = fused_silu.silu_mul(g, u)
    dg, du = torch.autograd.grad(h, [g, u], dh)
    g32, u32 = g.detach().float().requires_grad_(), u.detach().float().requires_grad_()
    ref = silu_mul_reference(g32, u32)
    dg_ref, du_ref = torch.autograd.grad(ref, [g32, u32], dh.float())
    assert h.dtype == dtype and h.shape == g.shape
    for name, a, b in (("h", h, ref), ("dg", dg, dg_ref), ("du", du, du_ref)):
        assert rel(a, b) <= tol, f"seed {seed}: {name} {rel(a, b):.2e}"
    with pytest.raises(ValueError, match="must match"):
        fused_silu.silu_mul(g, torch.zeros(7, device=DEVICE, dtype=dtype))
