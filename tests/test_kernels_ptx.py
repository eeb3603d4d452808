"""The shrink's ticket reduction as compiled for a Hopper GPU, read from its PTX on a CPU.

The interpreter runs a launch's programs one after another, so the CPU tests cannot show a
missed memory ordering in ``lora_shrink``'s ticket reduction (``_common.SHRINK_TICKETS``). Triton
can still compile the kernel for sm_90 here, and the PTX shows whether the ordering the kernel
relies on is there: every thread's stores, then a CTA barrier, then ONE thread's acquire-release
gpu-scope ticket (broadcast through shared memory behind a barrier), then L1-bypassing loads of
the partial sums, then the counter's reset. That is the pattern of CUTLASS's semaphore; a Triton
that lowered the ticket differently (every thread adding, no barrier, relaxed) fails here. It
checks the installed Triton's lowering (the dev machine's 3.9; the GPU image has 3.6), and only
the instruction order: whether the GPU honours it is what ``benchmarks/kernel_check.py`` shows.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles lora_shrink for sm_90 (bf16, R=16, 4 splits) and prints its PTX. The kernels' modules
# pick compiled or interpreted mode at import, so this runs in a process of its own, told a GPU
# is there (nothing is launched).
_COMPILE = r"""
import sys, torch
torch.cuda.is_available = lambda: True
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from alto_kernels.lora_shrink import lora_shrink_kernel
sig = {n: "constexpr" for n in ("R", "ALIGN", "HAS_DROPOUT", "DOT_PREC", "TICKETS", "BLOCK_M", "BLOCK_K", "SPLIT_K",
                                "ROW_SPLIT", "PREFETCH_A")}
sig.update({"x_ptr": "*bf16", "h_ptr": "*fp32", "part_ptr": "*fp32", "sem_ptr": "*i32", "meta_ptr": "*i64",
            "ptrs_ptr": "*i64", "w_ref": "*bf16", "K": "i32", "T": "i32", "stride_xm": "i32", "T_HINT": "i32",
            "seed": "i32", "streams_ptr": "*i64", "width": "i32"})
rows = sys.argv[1] == "rows"  # split over rows: one split, nothing to meet on a ticket
consts = {"R": 16, "ALIGN": 8, "HAS_DROPOUT": False, "DOT_PREC": "tf32", "TICKETS": sys.argv[1] != "0",
          "BLOCK_M": 16 if rows else 32, "BLOCK_K": 128, "SPLIT_K": 1 if rows else 4, "ROW_SPLIT": rows,
          "PREFETCH_A": not rows}
k = triton.compile(ASTSource(lora_shrink_kernel.fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4, "num_stages": 3})
sys.stdout.write(k.asm["ptx"])
"""


def _ptx(tickets) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "kernels"), env.get("PYTHONPATH", "")])
    mode = tickets if isinstance(tickets, str) else "1" if tickets else "0"
    got = subprocess.run([sys.executable, "-c", _COMPILE, mode], env=env, capture_output=True,
                         text=True, timeout=600)
    if got.returncode != 0:
        if "ptxas" in got.stderr or "No such file" in got.stderr or "backend" in got.stderr.lower():
            pytest.skip(f"this Triton cannot compile for sm_90 here: {got.stderr.strip().splitlines()[-1]}")
        raise AssertionError(got.stderr[-3000:])
    return got.stdout


def _instructions(ptx: str) -> list:
    return [ln.strip() for ln in ptx.splitlines()
            if ln.strip() and not ln.strip().startswith(("//", ".loc", "$L"))]


def test_the_ticket_is_one_thread_s_acq_rel_atomic_behind_a_barrier():
    lines = _instructions(_ptx(tickets=True))
    tickets = [i for i, ln in enumerate(lines) if re.search(r"\batom\.global\.gpu\.acq_rel\.add\.u32\b", ln)]
    assert len(tickets) == 1, [lines[i] for i in tickets]
    t = tickets[0]
    # one thread takes it: predicated on tid.x == 0
    pred = re.match(r"@(%p\d+)\s", lines[t])
    assert pred, lines[t]
    setp = [ln for ln in lines[:t] if re.match(rf"setp\.eq\.[bsu]32\s+{re.escape(pred.group(1))},\s*(%r\d+),\s*0;", ln)]
    assert setp, f"{pred.group(1)} is not set by a comparison with 0"
    tid_reg = re.match(r"setp\.eq\.[bsu]32\s+%p\d+,\s*(%r\d+)", setp[-1]).group(1)
    assert any(re.match(rf"mov\.u32\s+{re.escape(tid_reg)},\s*%tid\.x;", ln) for ln in lines[:t])
    # every thread's partial stores are behind a CTA barrier before it
    last_store = max(i for i, ln in enumerate(lines[:t]) if "st.global" in ln)
    assert any(ln.startswith("bar.sync") for ln in lines[last_store:t])
    # the ticket reaches the other threads through shared memory and a barrier
    assert any("st.shared" in ln for ln in lines[t:t + 4]) and any(ln.startswith("bar.sync") for ln in lines[t:t + 6])
    # the last split's loads of the partial sums bypass L1; then the counter is reset
    after = lines[t:]
    assert sum("ld.global.cg" in ln for ln in after) >= 4
    assert any(re.search(r"\batom\.global\.[\w.]*exch", ln) for ln in after)


def test_without_tickets_the_splits_add_atomically_and_take_no_ticket():
    lines = _instructions(_ptx(tickets=False))
    assert not any(".acq_rel" in ln and "atom" in ln for ln in lines)
    assert any(re.search(r"\b(red|atom)\.global\.[\w.]*add\.(v\d\.)?f32\b", ln) for ln in lines)


def test_split_over_rows_stores_its_rows_and_takes_no_ticket_nor_atomic():
    lines = _instructions(_ptx("rows"))
    assert not any(re.search(r"\b(atom|red)\.global", ln) for ln in lines)
    assert any("st.global" in ln for ln in lines)
