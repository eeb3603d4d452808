"""Registers, spills and shared memory of the dX pass's configs as ptxas builds them for sm_90.

Nsight Compute found ``lora_bwd_dx`` limited to a quarter of an H100's warps by its registers
(BENCHMARKS.md, Kernels). This compiles the kernel for sm_90 (bf16, rank 16, gradient sink, no
dropout) with each of its configs, committed and candidate (``SPLIT_ROLES``), and reads each
cubin's resource use with ``cuobjdump``. Nothing is launched, so it runs without a GPU; the
numbers are the installed Triton's (the GPU image's may differ).

    python benchmarks/kernel_regs.py --out benchmarks/results/kernel_regs_<triton>.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_check import import_alto_kernels  # noqa: E402

CONSTEXPRS = ("R", "ALIGN", "HAS_DROPOUT", "COMPUTE_DX", "COMPUTE_DA", "DOT_PREC", "GRAD_SINK", "ADD_DX", "BLOCK_M",
              "BLOCK_K", "SPLIT_ROLES")
ARGS = {"x_ptr": "*bf16", "g_ptr": "*fp32", "dx_ptr": "*bf16", "da_ptr": "*fp32", "meta_ptr": "*i64",
        "ptrs_ptr": "*i64", "w_ref": "*bf16", "K": "i32", "stride_xm": "i32", "stride_dxm": "i32", "T_HINT": "i32",
        "seed": "i32", "streams_ptr": "*i64", "width": "i32"}


def resources(cubin: bytes, cuobjdump: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    got = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", text)
    if got is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {text[-500:]}")
    return {"registers": int(got[1]), "stack_bytes": int(got[2])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    import torch
    torch.cuda.is_available = lambda: True  # the kernels' modules pick compiled mode at import
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import_alto_kernels()
    from alto_kernels.lora_bwd_dx import BWD_DX_CONFIGS, SPLIT_ROLES_CONFIGS, lora_bwd_dx_kernel

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    sig = {**{n: "constexpr" for n in CONSTEXPRS}, **ARGS}
    seen, rows = set(), []
    for c in [*BWD_DX_CONFIGS, *SPLIT_ROLES_CONFIGS]:
        conf = {"SPLIT_ROLES": False, **c.kwargs}
        name = json.dumps({**conf, "num_warps": c.num_warps, "num_stages": c.num_stages}, sort_keys=True)
        if name in seen:
            continue
        seen.add(name)
        consts = {"R": args.rank, "ALIGN": 8, "HAS_DROPOUT": False, "COMPUTE_DX": True, "COMPUTE_DA": True,
                  "DOT_PREC": "tf32", "GRAD_SINK": True, "ADD_DX": False, **conf}
        k = triton.compile(ASTSource(lora_bwd_dx_kernel.fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": c.num_warps, "num_stages": c.num_stages})
        row = {"config": json.loads(name), "shared_bytes": k.metadata.shared, **resources(k.asm["cubin"], cuobjdump)}
        # warps an SM can hold by registers alone (65,536 a SM, allocated per warp in 256s)
        per_warp = -(-row["registers"] * 32 // 256) * 256
        row["warps_by_registers"] = min(64, 65536 // per_warp // c.num_warps * c.num_warps)
        rows.append(row)
        print(f"{row['config']}: {row['registers']} registers, {row['stack_bytes']} B stack, "
              f"{row['shared_bytes']} B shared, {row['warps_by_registers']} warps a SM by registers", flush=True)
    out = {"kernel": "lora_bwd_dx", "target": "sm_90", "triton": triton.__version__, "torch": torch.__version__,
           "case": f"bf16 R={args.rank}, gradient sink, no dropout, dX and dA",
           "command": "python " + " ".join(sys.argv), "configs": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
