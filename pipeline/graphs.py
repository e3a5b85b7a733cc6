"""CUDA graphs (GPU only): the training step and the evaluation's forward passes captured once
and replayed, a launch per step instead of hundreds. The arithmetic is the eager code's;
`engine` decides when to use them (`cuda_graphs`, resolved by `device.resolve_cuda_graphs`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# Eager steps before a CUDA graph is captured: cuDNN picks its kernels, the optimizer and the
# weight average make their state, the allocator settles (PyTorch's CUDA graph recipe).
GRAPH_WARMUP_STEPS = 3


def on_side_stream(device: torch.device, work: Callable[[], object]) -> None:
    """Run `work` eagerly on a side stream, as a warm-up before a capture must."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        work()
    torch.cuda.current_stream(device).wait_stream(side)


def capture_step(
    step: Callable[[torch.Tensor, torch.Tensor], None], images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
    """`step(images, labels)` captured once into a CUDA graph over static copies of the batch;
    returns (graph, static images, static labels). The capture runs nothing: replay it for the
    step. zero_grad(set_to_none) inside the capture lets backward allocate the gradients from
    the graph's pool, and every replay writes them anew."""
    static_images, static_labels = images.clone(), labels.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static_images, static_labels)
    return graph, static_images, static_labels


class GraphedForward:
    """`forward(model, images, tta)` (engine.tta_logits) at one batch size as a CUDA graph,
    captured on the first call after eager warm-up passes; a smaller batch is padded into the
    static input (every norm evaluates each image on its own, so the padding changes no real
    logit).
    The model must already be in eval mode; its weights are read in place at every replay."""

    def __init__(
        self,
        model: nn.Module,
        *,
        forward: Callable[[nn.Module, torch.Tensor, str], torch.Tensor],
        batch_size: int,
        tta: str,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        self.model = model
        self.forward = forward  # engine.tta_logits
        self.batch_size = batch_size
        self.tta = tta
        self.autocast_dtype = autocast_dtype
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_images: torch.Tensor | None = None
        self.static_logits: torch.Tensor | None = None

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(
            images.device.type,
            dtype=self.autocast_dtype,
            enabled=self.autocast_dtype is not None,
            cache_enabled=False,
        ):
            return self.forward(self.model, images, self.tta)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        count = len(images)
        if count > self.batch_size:
            raise ValueError(f"a batch of {count} images exceeds the graph's {self.batch_size}")
        if self.graph is None:
            self.static_images = torch.zeros(
                (self.batch_size, *images.shape[1:]), dtype=images.dtype, device=images.device
            ).contiguous(memory_format=_memory_format_of(images))
            self.static_images[:count].copy_(images)
            for _ in range(2):
                on_side_stream(images.device, lambda: self._logits(self.static_images))
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_logits = self._logits(self.static_images)
        else:
            self.static_images[:count].copy_(images)
        self.graph.replay()
        return self.static_logits[:count]


def _memory_format_of(images: torch.Tensor) -> torch.memory_format:
    if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
