"""The clock every question shares (`time.perf_counter`, CUDA synchronized) and its progress."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(
    train_steps: Callable[[int], None], *, warmup_steps: int, steps: int, device: torch.device
) -> tuple[float, float]:
    """(seconds of `warmup_steps` warm-up steps, seconds of the `steps` steps after them)."""
    started = time.perf_counter()
    train_steps(warmup_steps)
    synchronize(device)
    warmed = time.perf_counter()
    train_steps(steps)
    synchronize(device)
    return warmed - started, time.perf_counter() - warmed


def timed(function: Callable[[], None]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started
