"""The fused rotary embedding against the eager formula (``rotary_reference``).

Same set-up as test_kernels.py: without a GPU the kernel runs in Triton's interpreter, at small
sizes, with fresh random inputs each run (the seed is in the failure message).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from alto_kernels import rotary_reference  # noqa: E402

fused_rotary = pytest.importorskip("alto_kernels.fused_rotary", reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _cos_sin(gen, batch, L, D, dtype):
    """Llama's tables: angles of position × inverse frequency, the half repeated."""
    pos = torch.randint(0, 4096, (batch, L), generator=gen).float()
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    return emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)


def _projection_views(gen, B, L, H, D, dtype, unsqueeze_dim):
    """q as attention modules make it: a projection's output viewed per head, then transposed."""
    flat = (torch.randn(B, L, H * D, generator=gen) * 2).to(DEVICE, dtype)
    x = flat.view(B, L, H, D)
    return (x.transpose(1, 2) if unsqueeze_dim == 1 else x).detach().requires_grad_()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("B,L,Hq,Hk,D,cos_batch,unsqueeze_dim", [
    (2, 13, 4, 2, 16, 2, 1),     # GQA, L not a multiple of the block, per-sequence positions
    (1, 9, 3, 3, 24, 1, 1),      # head_dim/2 not a power of two, shared positions, heads not a multiple of HEADS
    (2, 5, 2, 1, 8, 2, 2),       # [B, L, H, D] layout
])
def test_forward_and_grads_match_the_reference(dtype, tol, B, L, Hq, Hk, D, cos_batch, unsqueeze_dim):
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    q = _projection_views(gen, B, L, Hq, D, dtype, unsqueeze_dim)
    k = _projection_views(gen, B, L, Hk, D, dtype, unsqueeze_dim)
    cos, sin = _cos_sin(gen, cos_batch, L, D, dtype)
    dq_out = torch.randn(q.shape, generator=gen).to(DEVICE, dtype)
    dk_out = torch.randn(k.shape, generator=gen).to(DEVICE, dtype)

    qe, ke = fused_rotary.rotary(q, k, cos, sin, unsqueeze_dim)
    dq, dk = torch.autograd.grad((qe, ke), (q, k), (dq_out, dk_out))
    assert qe.stride() == q.stride() and ke.stride() == k.stride()  # the layout of the input
    assert qe.dtype == dq.dtype == dtype

    q32, k32 = (t.detach().float().requires_grad_() for t in (q, k))
    rq, rk = rotary_reference(q32, k32, cos.float(), sin.float(), unsqueeze_dim)
    rdq, rdk = torch.autograd.grad((rq, rk), (q32, k32), (dq_out.float(), dk_out.float()))
    for name, got, want in (("q", qe, rq), ("k", ke, rk), ("dq", dq, rdq), ("dk", dk, rdk)):
        assert rel(got, want) <= tol, f"seed {seed}: {name} {rel(got, want):.2e}"


# Triton's interpreter truncates fp32 -> bf16 (it rounds fp16 to nearest, as GPUs do both).
SIXTEEN_BIT = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_sixteen_bit_results_equal_eager_bit_for_bit(dtype):
    """Each product is rounded before the sum, as eager's separate kernels do."""
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    q = _projection_views(gen, 2, 11, 2, 16, dtype, 1)
    k = _projection_views(gen, 2, 11, 1, 16, dtype, 1)
    cos, sin = _cos_sin(gen, 2, 11, 16, dtype)
    qe, ke = fused_rotary.rotary(q, k, cos, sin)
    rq, rk = rotary_reference(q, k, cos, sin)
    assert torch.equal(qe, rq) and torch.equal(ke, rk)
    g = torch.randn(qe.shape, generator=gen).to(DEVICE, dtype)
    (dq,) = torch.autograd.grad(qe, q, g)
    (rdq,) = torch.autograd.grad(rq, q, g)
    assert torch.equal(dq, rdq)


def test_bad_input_is_refused_with_the_reason():
    q = torch.randn(1, 2, 4, 8, device=DEVICE)
    cos = torch.randn(1, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim 7"):
        fused_rotary.rotary(q[..., :7], q[..., :7], cos[..., :7], cos[..., :7])
    with pytest.raises(ValueError, match="cos .* and sin .* must both be"):
        fused_rotary.rotary(q, q, cos[:, :3], cos[:, :3])
    with pytest.raises(ValueError, match="dtypes"):
        fused_rotary.rotary(q, q, cos.half(), cos.half())
    with pytest.raises(ValueError, match="requires grad"):
        fused_rotary.rotary(q, q, cos.requires_grad_(), cos)
    with pytest.raises(ValueError, match="unsqueeze_dim 3"):
        fused_rotary.rotary(q, q, cos, cos, 3)
    assert fused_rotary.check_rotary(q, q, cos.detach(), cos.detach()) is None
