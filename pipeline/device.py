"""Where and how a training runs: the device, the autocast precision, the memory layout, the
thread count and whether the steps replay as CUDA graphs, each resolved from a setting and what
this machine has."""

from __future__ import annotations

import os

import torch

from pipeline.config import CUDA_GRAPHS, ConfigError, check_choice
from pipeline.norms import REGISTRY


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda > mps > cpu; an explicit device that is absent is an error."""
    cuda, mps = torch.cuda.is_available(), _mps_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise ValueError(f"device {name!r} is not available on this machine (use auto or cpu)")
    return torch.device(name)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


# Norms whose training runs in bf16 autocast under precision=auto on a CPU with native bf16:
# those where it is faster there *and* as accurate as fp32 over 3 seeds (paired by seed, the
# mean difference within fp32's seed spread; docs/speed.md#does-bf16-hold-the-accuracy).
# Layer norm: 1.71x, -0.17 points (fp32 spread 0.65); group norm (FloatGroupNorm): 1.19x, +0.38
# (spread 0.66). Not batch norm: 1.84x, but -0.39 points where fp32's spread is 0.03. Each
# norm's registry entry (pipeline/norms.py, `bf16`) holds the verdict; unmeasured norms are fp32.
BF16_NORMS: tuple[str, ...] = tuple(name for name, entry in REGISTRY.items() if entry.bf16)


# torch's checks for the CPU extensions that compute bf16 natively, by the name runs log.
_NATIVE_BF16_CHECKS = (
    ("avx512_bf16", "_is_avx512_bf16_supported"),
    ("amx", "_is_amx_tile_supported"),
)


def _native_bf16_extensions() -> list[str]:
    return [flag for flag, check in _NATIVE_BF16_CHECKS if getattr(torch.cpu, check, bool)()]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles), as torch detects it.
    Without it bf16 is emulated and several times slower than fp32."""
    return bool(_native_bf16_extensions())


def cpu_capability() -> str:
    """torch's vector instruction set on this CPU and its native bf16 extensions, as logged with
    each run: `AVX512+avx512_bf16`, `AVX2`."""
    return "+".join([torch.backends.cpu.get_cpu_capability(), *_native_bf16_extensions()])


def resolve_precision(
    precision: str, device: torch.device, *, norm: str = "batch"
) -> torch.dtype | None:
    """The autocast dtype for `precision`, or None for plain fp32.

    `auto` is bf16 for the norms of `BF16_NORMS` on a CPU with native bf16, fp32 elsewhere: bf16
    autocast measured slower than fp32 on an AVX2 CPU (emulated) and on an H200 (docs/speed.md).
    """
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cpu" and norm in BF16_NORMS:
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None


def precision_name(autocast_dtype: torch.dtype | None) -> str:
    """How a run names the precision it trained in, with `precision`'s own spelling: `bf16`,
    `fp16`, or `fp32` for no autocast (logged as `resolved.precision` and `autocast`)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(autocast_dtype, "fp32")


def resolve_cuda_graphs(
    mode: str, device: torch.device, *, compile: str = "off"
) -> tuple[bool, str]:
    """Whether `cuda_graphs=mode` replays the steps as CUDA graphs on `device`, and why not.

    `auto` is on for CUDA; `on` without CUDA is an error; a torch.compile'd model (its own
    compiled code, not captured here) runs eagerly, with the reason returned for the run's log.
    """
    check_choice("cuda_graphs", mode, CUDA_GRAPHS)
    if mode == "off":
        return False, "cuda_graphs=off"
    if device.type != "cuda":
        if mode == "on":
            raise ConfigError(f"cuda_graphs=on needs a CUDA device (got {device.type})")
        return False, f"no CUDA device (device {device.type})"
    if compile == "on":
        return False, "compile=on: a torch.compile'd model is not captured; it runs eagerly"
    return True, ""


def eval_batch_size_for(device: torch.device) -> int:
    """Evaluation batch size: 128 on the CPU (cache-sized activations; faster than 1,024 for
    every norm and `tta`, docs/speed.md), 1,024 on a GPU, which larger batches keep busy."""
    return 128 if device.type == "cpu" else 1024


def memory_format_for(norm: str, device: torch.device) -> torch.memory_format:
    """The faster layout measured for `norm` on `device` (docs/speed.md, layouts table):
    channels_last on the CPU for every norm; on CUDA channels_last for batch norm, NCHW for
    group and layer norm, whose CUDA kernels want it (the registry's `cuda_channels_last`;
    NCHW for a norm not measured)."""
    if device.type == "cuda" and not REGISTRY[norm].cuda_channels_last:
        return torch.contiguous_format
    return torch.channels_last


def configure_backend(device: torch.device) -> None:
    """One intra-op thread per core (small convs lose time to oversubscription; PIPELINE_THREADS
    overrides it, e.g. for runs side by side); on CUDA, cuDNN picks its fastest conv kernels."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = int(os.environ.get("PIPELINE_THREADS") or 0) or cores or 1
    torch.set_num_threads(max(1, threads))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
