"""The optimizers and the schedule: SGD with Nesterov momentum, Muon for the conv filters
(`MuonSGD`), and the one-cycle learning rate, stepped per batch."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.sgd import sgd

from pipeline.config import OPTIMIZERS, check_choice


def make_optimizer(
    model: nn.Module,
    *,
    learning_rate: float,
    momentum: float,
    weight_decay: float,
    optimizer: str = "sgd",
    muon_lr: float = 0.03,
    muon_momentum: float = 0.9,
    muon_renormalize: bool = True,
    muon_ns_steps: int = 5,
    muon_pointwise: bool = True,
) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; weight decay on conv weights only, never on norms or biases.
    On CUDA the fused kernel, which reads a tensor learning rate on the device (no sync).

    `optimizer="muon"`: `MuonSGD`, Muon for every conv filter but the classifier head c10 (at
    `muon_lr`, `muon_momentum`, `muon_ns_steps` Newton-Schulz iterations; the 1x1 convs only
    with `muon_pointwise`), the same SGD for the rest; one schedule scales both rates.
    """
    check_choice("optimizer", optimizer, OPTIMIZERS)
    fused = True if all(p.is_cuda for p in model.parameters()) else None
    if optimizer == "muon":
        filters = _muon_filters(model, pointwise=muon_pointwise)
        taken = {id(p) for p in filters}
        rest = [p for p in model.parameters() if id(p) not in taken]
        return MuonSGD(
            [  # the SGD groups first: group 0's rate is the `lr` each epoch records
                {"params": [p for p in rest if p.ndim > 1], "weight_decay": weight_decay},
                {"params": [p for p in rest if p.ndim <= 1], "weight_decay": 0.0},
                {
                    "params": filters,
                    "muon": True,
                    "lr": muon_lr,
                    "momentum": muon_momentum,
                    "weight_decay": weight_decay,
                },
            ],
            lr=learning_rate,
            momentum=momentum,
            renormalize=muon_renormalize,
            ns_steps=muon_ns_steps,
            fused=fused,
        )
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=learning_rate,
        momentum=momentum,
        nesterov=momentum > 0,
        fused=fused,
    )


def _muon_filters(model: nn.Module, *, pointwise: bool) -> list[nn.Parameter]:
    """The conv filters Muon updates: all but the c10 head, the 1x1 convs only if `pointwise`."""
    head = {id(p) for name, p in model.named_parameters() if name.startswith("c10.")}
    return [
        p
        for p in model.parameters()
        if p.ndim > 1 and id(p) not in head and (pointwise or p.shape[2:] != (1, 1))
    ]


# The quintic Newton-Schulz iteration's coefficients (Jordan, 2024; torch.optim.Muon's).
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, *, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximately orthogonal matrix near `matrix` (U V^T of its SVD, with singular
    values in roughly 0.7..1.2), by `steps` Newton-Schulz iterations in bf16, as
    torch.optim.Muon computes it (whose function for it is private, and whose optimizer takes
    2-D parameters only)."""
    a, b, c = NEWTON_SCHULZ
    x = matrix.bfloat16()
    wide = x.size(0) <= x.size(1)
    if not wide:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(matrix.dtype)


class MuonSGD(torch.optim.Optimizer):
    """Muon for the groups marked `muon`, SGD with Nesterov momentum for the others, in one
    optimizer: one state dict in the checkpoint, one scheduler scaling every group's rate.

    A Muon group's parameters are conv filters `(out, in, k, k)`: each filter tensor's gradient
    is viewed as an `(out, in*k*k)` matrix, accumulated with momentum (Nesterov), orthogonalized
    (`orthogonalize`) and applied at the group's rate times sqrt(max(1, out / (in*k*k))), after
    torch.optim.Muon's decoupled weight decay. With `renormalize`, each filter tensor's norm is
    reset to sqrt(out) before its step, so its scale cannot drift (the norms that follow make
    the network invariant to it). Other groups are stepped by `torch.optim.sgd.sgd`, the
    functional behind torch.optim.SGD, with the same arguments.
    """

    def __init__(
        self,
        params,
        *,
        lr: float,
        momentum: float,
        renormalize: bool = True,
        ns_steps: int = 5,
        fused: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": 0.0,
            "muon": False,
            "renormalize": renormalize,
            "ns_steps": ns_steps,
            "fused": fused,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                for param in params:
                    self._muon_step(param, group)
                continue
            buffers = [self.state[p].get("momentum_buffer") for p in params]
            sgd(
                params,
                [p.grad for p in params],
                buffers,
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                lr=group["lr"],
                dampening=0.0,
                nesterov=group["momentum"] > 0,
                maximize=False,
                fused=group["fused"],
            )
            for param, buffer in zip(params, buffers, strict=True):
                self.state[param]["momentum_buffer"] = buffer
        return loss

    def _muon_step(self, param: torch.Tensor, group: dict) -> None:
        out = param.shape[0]
        grad = param.grad.reshape(out, -1)
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.contiguous_format)
        buffer = state["momentum_buffer"]
        buffer.mul_(group["momentum"]).add_(grad)
        update = orthogonalize(grad.add(buffer, alpha=group["momentum"]), steps=group["ns_steps"])
        if group["renormalize"]:
            param.mul_(math.sqrt(out) / param.norm().clamp(min=1e-12))
        lr = group["lr"]
        if group["weight_decay"]:
            param.mul_(1 - lr * group["weight_decay"])
        scale = math.sqrt(max(1.0, out / update.shape[1]))
        param.sub_(update.reshape(param.shape) * (lr * scale))


def learning_rate_on_device(optimizer: torch.optim.Optimizer) -> None:
    """Make each param group's learning rate a 0-dim tensor on its parameters' device.

    The scheduler then writes the rate in place (`fill_`) and the optimizer reads it there: a
    step never reads it from the host (on CUDA the fused SGD kernel takes it as a pointer), and
    a CUDA graph of the step follows the schedule.
    Call it after the scheduler is built (its base rates stay floats) and after loading a
    checkpoint. float64 on the CPU, so the update is bit for bit that of a float rate; float32
    on CUDA, the fused kernel's type. Other devices keep a float (their fused kernels untried).
    """
    for group in optimizer.param_groups:
        device = group["params"][0].device
        if device.type not in ("cpu", "cuda"):
            continue
        dtype = torch.float64 if device.type == "cpu" else torch.float32
        group["lr"] = torch.tensor(float(group["lr"]), dtype=dtype, device=device)


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, epochs: int, steps_per_epoch: int, warmup_epochs: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """One cycle, stepped per batch: linear warm-up to the peak, then linear decay to zero."""
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total - 1, round(warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
