"""Programmatic dependent launch (PDL, compute capability 9.0+): let a kernel be launched while the one before it
in the stream is still running, so the launch latency between the decode step's ~360 kernels overlaps work.

A kernel launched with PDL may start before its predecessor has finished, so it must not touch memory the
predecessor writes until `griddepcontrol.wait` returns (the predecessor has completed and its writes are
visible). The rule here is the simplest safe one: with USE_PDL every program of every kernel on the decode path
waits first, unconditionally, then allows its own dependents to launch. Since each kernel completes only after
its wait returned, completion is ordered along the whole chain, as without PDL; kernels without PDL (torch's)
simply let their dependents start when they complete. The engine turns it on where the GPU has it
(GPUBackend.supports_pdl).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pdl_wait(USE_PDL: tl.constexpr):
    """With USE_PDL: wait until the previous kernel has completed, then let the next one launch."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def launch_options(pdl: bool) -> dict:
    """Keyword arguments of a Triton launch for `pdl` (nothing when off, which the interpreter also accepts)."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl else {"USE_PDL": False}
