"""First-call cost of SDPA per new sequence length, by backend (a GPU probe).

The grouped step's padded width changes from batch to batch; a backend that builds a plan (and
compiles kernels) per shape pays that at each new width. Prints the first and second fwd+bwd
time for a few fresh widths, for cuDNN attention and for FlashAttention.

    python benchmarks/sdpa_first_call.py
"""
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def fwd_bwd(L: int, backend) -> float:
    q, k, v = (torch.randn(2, 16, L, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with sdpa_kernel([backend]):
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    for name, backend, widths in (("cudnn", SDPBackend.CUDNN_ATTENTION, (301, 333, 377, 419, 457)),
                                  ("flash", SDPBackend.FLASH_ATTENTION, (302, 334, 378, 420, 458))):
        for L in widths:
            first = fwd_bwd(L, backend)
            second = fwd_bwd(L, backend)
            print(f"{name} L={L}: first {first * 1e3:.1f} ms, second {second * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
