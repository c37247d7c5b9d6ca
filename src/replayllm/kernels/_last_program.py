"""Ordering for "the last program to finish does the rest" (decode attention's fused merge, the greedy draw):
each program stores its partial result, makes it visible GPU-wide and counts itself in on a counter; the one
that counts last reads everyone's partials (from L2: `.cg` loads) and resets the counter for the next launch.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _count_in(counter_ptr, expected, like, FENCE: tl.constexpr):
    """After this program's partials are stored: a fence in every thread (FENCE: on a GPU; the interpreter runs
    programs one by one and has no PTX), the block's barrier, then one acquire-release add on the counter. True
    for the program that counts `expected`-th, which then owns the partials; it must reset the counter.
    `like`: any int32 scalar of the program, which the fence's asm takes as its (unused) operand."""
    if FENCE:
        tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, 0;", "=r,r", [like], dtype=tl.int32,
                                  is_pure=False, pack=1)
    tl.debug_barrier()
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == expected - 1
