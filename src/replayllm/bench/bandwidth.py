"""The device's memory-bandwidth ceiling, measured in the same run as the numbers compared with it."""

from __future__ import annotations

import statistics

import torch


def measure_copy_gbps(device: torch.device, nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written (median of `repeats`).

    Two buffers of `nbytes` each, far larger than L2, filled with random data (zeros can run faster).
    """
    if device.type != "cuda":
        raise ValueError("the copy bandwidth is measured on a CUDA device")
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * n * 4 / statistics.median(times) / 1e9
