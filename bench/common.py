"""Helpers the bench scripts share: one JSON line per measurement, and timing.

    from common import emit, timed, best_seconds, matmul_peak_gflops   # bench/ is on sys.path when a script runs
"""

import json
import time

import torch


def emit(**row) -> None:
    """One measurement as one JSON line on stdout."""
    print(json.dumps(row), flush=True)


def timed(fn):
    """(seconds, result) of one call of fn."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def best_seconds(fn, repeats: int, device=None) -> float:
    """Fastest of `repeats` calls of fn, after one warm-up call; on a CUDA device, synchronized around each call."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda d: None)
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best observed fp32 GFLOP/s of an (n, n) @ (n, n) product on the current thread count: the yardstick that
    every absolute time is quoted beside, since this machine's speed varies from day to day."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_seconds(lambda: a @ b, repeats) / 1e9
