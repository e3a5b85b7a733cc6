"""Training and evaluation loops. No MLflow here: `fit` reports through a plain callback."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.sgd import sgd
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from pipeline.config import (
    CUDA_GRAPHS,
    DEFAULT_TTA,
    OPTIMIZERS,
    TTA_MODES,
    ConfigError,
    check_choice,
)
from pipeline.data import DeviceSplit, Normalizer, eval_batches, train_batches
from pipeline.norms import REGISTRY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch's record; the field names are the metric keys every run logs."""

    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    lr: float
    epoch_seconds: float
    # On the validation split, when the run holds one out (val_size > 0).
    val_loss: float | None = None
    val_acc: float | None = None

    def metrics(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if k != "epoch" and v is not None}

    def describe(self, epochs: int) -> str:
        """One line for a person: `epoch  3/20  train loss ... acc ...  val ...  test ...`."""
        val = ""
        if self.val_loss is not None and self.val_acc is not None:
            val = f"val loss {self.val_loss:.4f} acc {100 * self.val_acc:5.2f}%  "
        return (
            f"epoch {self.epoch:>2}/{epochs}  "
            f"train loss {self.train_loss:.4f} acc {100 * self.train_acc:5.2f}%  {val}"
            f"test loss {self.test_loss:.4f} acc {100 * self.test_acc:5.2f}%  "
            f"lr {self.lr:.4f}  {self.epoch_seconds:5.1f}s"
        )


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    predictions: torch.Tensor  # (N,) int64 on the CPU
    labels: torch.Tensor  # (N,) int64 on the CPU


# --------------------------------------------------------------------------- devices


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


# --------------------------------------------------------------------------- optimisation


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
) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; weight decay on conv weights only, never on norms or biases.
    On CUDA the fused kernel, which reads a tensor learning rate on the device (no sync).

    `optimizer="muon"`: `MuonSGD`, Muon for every conv filter but the classifier head c10 (at
    `muon_lr`, `muon_momentum`), the same SGD for the rest; one schedule scales both rates.
    """
    check_choice("optimizer", optimizer, OPTIMIZERS)
    fused = True if all(p.is_cuda for p in model.parameters()) else None
    if optimizer == "muon":
        head = {id(p) for name, p in model.named_parameters() if name.startswith("c10.")}
        filters = [p for p in model.parameters() if p.ndim > 1 and id(p) not in head]
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


# --------------------------------------------------------------------------- loops


# Eager steps before a CUDA graph is captured: cuDNN picks its kernels, the optimizer and the
# weight average make their state, the allocator settles (PyTorch's CUDA graph recipe).
GRAPH_WARMUP_STEPS = 3


@torch.no_grad()
def update_average(average: AveragedModel, model: nn.Module, *, first: bool) -> None:
    """`average.update_parameters(model)` for a weight average over parameters and buffers,
    without its `if n_averaged == 0` on the host: the caller knows whether this is the first
    update (a copy). The same arithmetic, grouped by dtype as torch groups it."""
    averaged = [*average.module.parameters(), *average.module.buffers()]
    current = [*model.parameters(), *model.buffers()]
    if first:
        for mine, theirs in zip(averaged, current, strict=True):
            mine.detach().copy_(theirs.detach())
    else:
        by_dtype: dict[torch.dtype, tuple[list, list]] = {}
        for mine, theirs in zip(averaged, current, strict=True):
            pair = by_dtype.setdefault(mine.dtype, ([], []))
            pair[0].append(mine.detach())
            pair[1].append(theirs.detach())
        for mine, theirs in by_dtype.values():
            average.multi_avg_fn(mine, theirs, average.n_averaged)
    average.n_averaged += 1


class TrainStep:
    """One training step on a batch: forward, loss, backward, SGD step, the weight average's
    update and the epoch's loss and accuracy sums, all on the device with no host sync.

    With `cuda_graph`, the first `GRAPH_WARMUP_STEPS` run eagerly on a side stream, then the
    whole step is captured once into one CUDA graph with static input buffers and replayed:
    a launch per step instead of hundreds. The learning rate must be a device tensor
    (`learning_rate_on_device`) and the batch shape fixed (`train_batches` drops the last
    partial batch).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module,
        autocast_dtype: torch.dtype | None,
        average: AveragedModel | None = None,
        cuda_graph: bool = False,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.autocast_dtype = autocast_dtype
        self.average = average
        # One host read, before any step: a resumed average has been started already.
        self.average_started = average is not None and int(average.n_averaged) > 0
        self.device = next(model.parameters()).device
        self.cuda_graph = cuda_graph
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a model on a CUDA device (got {self.device})")
        if cuda_graph and average is not None:
            # AveragedModel keeps its update counter where it was made, the CPU unless told:
            # a CPU tensor's update is not captured, so replays would not count.
            average.n_averaged = average.n_averaged.to(self.device)
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.seen = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0
        self.static_images: torch.Tensor | None = None
        self.static_labels: torch.Tensor | None = None

    def reset_sums(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()
        self.seen = 0

    def sums(self) -> tuple[float, float]:
        """(mean loss, accuracy) since `reset_sums`: the one host read of an epoch."""
        if self.seen == 0:
            raise ValueError("the training split is smaller than one batch; lower batch_size")
        return self.loss_sum.item() / self.seen, self.correct.item() / self.seen

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.seen += len(labels)
        if not self.cuda_graph:
            self._step(images, labels)
        elif self.graph is not None:
            self.static_images.copy_(images)
            self.static_labels.copy_(labels)
            self.graph.replay()
        elif self.eager_steps < GRAPH_WARMUP_STEPS:
            self.eager_steps += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._step(images, labels)
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            self.static_images, self.static_labels = images.clone(), labels.clone()
            self.graph = torch.cuda.CUDAGraph()
            # zero_grad(set_to_none) inside the capture: backward allocates the gradients
            # from the graph's pool, and every replay writes them anew.
            with torch.cuda.graph(self.graph):
                self._step(self.static_images, self.static_labels)
            self.graph.replay()  # the capture ran nothing: this is the step

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype,
            enabled=self.autocast_dtype is not None,
            cache_enabled=False if self.cuda_graph else None,  # a graph cannot use the cache
        ):
            logits = self.model(images)
            loss = self.loss_fn(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.average is not None:
            update_average(self.average, self.model, first=not self.average_started)
            self.average_started = True
        self.loss_sum += loss.detach() * len(labels)
        self.correct += (logits.argmax(dim=1) == labels).sum()


class GraphedForward:
    """`tta_logits(model, images, tta)` at one batch size as a CUDA graph, captured on the
    first call after eager warm-up passes; a smaller batch is padded into the static input
    (every norm evaluates each image on its own, so the padding changes no real logit).
    The model must already be in eval mode; its weights are read in place at every replay."""

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int,
        tta: str,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        self.model = model
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
            return tta_logits(self.model, images, self.tta)

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
            side = torch.cuda.Stream(images.device)
            side.wait_stream(torch.cuda.current_stream(images.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._logits(self.static_images)
            torch.cuda.current_stream(images.device).wait_stream(side)
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


def train_one_epoch(
    step: TrainStep,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    steps: int,
    description: str = "train",
) -> tuple[float, float]:
    """One pass over `batches`, a `step` each; returns (mean loss, accuracy) of the augmented
    training data, read from the device once, at the end."""
    step.model.train()
    step.reset_sums()
    bar = tqdm(total=steps, desc=description, unit="batch", leave=False, mininterval=1.0)
    for images, labels in batches:
        step(images, labels)
        scheduler.step()  # writes the next rate into the device tensor the step reads
        bar.update()
    bar.close()
    return step.sums()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: DeviceSplit,
    *,
    normalize: Normalizer,
    batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    tta: str = DEFAULT_TTA,
    graphed: GraphedForward | None = None,
) -> Evaluation:
    """Loss and accuracy on `split`, with test-time augmentation `tta` (see `tta_logits`), in
    batches of `batch_size` (default: `eval_batch_size_for` the split's device). `graphed`, a
    `GraphedForward` of `model` with the same `tta`, replays the forward passes as a CUDA
    graph (its batch size is then the evaluation's)."""
    check_choice("tta", tta, TTA_MODES)
    if graphed is not None:
        if graphed.model is not model or graphed.tta != tta:
            raise ValueError("graphed must be a GraphedForward of this model and tta")
        batch_size = graphed.batch_size
    batch_size = batch_size or eval_batch_size_for(split.images.device)
    if isinstance(model, nn.Module) and hasattr(model, "eval") and not _is_graph_module(model):
        model.eval()
    device = split.images.device
    loss_sum = torch.zeros((), device=device)
    predictions = []
    for images, labels in eval_batches(split, batch_size=batch_size, normalize=normalize):
        if graphed is not None:
            logits = graphed(images)
        else:
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                logits = tta_logits(model, images, tta)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
        predictions.append(logits.argmax(dim=1))
    predicted = torch.cat(predictions).cpu()
    labels = split.labels.cpu()
    return Evaluation(
        loss=loss_sum.item() / len(split),
        accuracy=(predicted == labels).float().mean().item(),
        predictions=predicted,
        labels=labels,
    )


def tta_logits(model: nn.Module, images: torch.Tensor, tta: str) -> torch.Tensor:
    """fp32 logits of `images` averaged over test-time views.

    "none": the image alone. "flip": the image and its mirror (one extra forward pass).
    "flip-translate": half the "flip" logits plus half those of the image shifted one pixel
    up-left and one pixel down-right (reflected borders), each with its mirror: six passes.
    """
    logits = model(images).float()
    if tta == "none":
        return logits
    logits = (logits + model(images.flip(3)).float()) / 2
    if tta == "flip":
        return logits
    height, width = images.shape[-2:]
    padded = nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[..., :height, :width], padded[..., 2:, 2:]]
    translated = sum((model(v).float() + model(v.flip(3)).float()) / 2 for v in shifted) / 2
    return (logits + translated) / 2


def _is_graph_module(model: nn.Module) -> bool:
    # A model loaded from MLflow's pt2 format is an exported GraphModule whose .eval() raises.
    return type(model).__name__ == "GraphModule" or hasattr(model, "module_call_graph")


@dataclass
class TrainingState:
    """What a checkpoint holds; enough to continue a run bit for bit on the CPU."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    epoch: int = 0  # epochs completed
    ema: AveragedModel | None = None  # the exponential moving average of the weights, if kept

    def state_dict(self) -> dict:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "epoch": self.epoch,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError("the checkpoint has no weight average; resume with ema=0")
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch = int(state["epoch"])


def fit(
    model: nn.Module,
    train_split: DeviceSplit,
    test_split: DeviceSplit,
    *,
    val_split: DeviceSplit | None = None,
    normalize: Normalizer,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    momentum: float,
    weight_decay: float,
    label_smoothing: float,
    warmup_epochs: float,
    seed: int,
    ema: float = 0.0,
    cutout: int = 0,
    translate: int = 4,
    tta: str = DEFAULT_TTA,
    autocast_dtype: torch.dtype | None = None,
    eval_batch_size: int | None = None,
    optimizer: str = "sgd",
    muon_lr: float = 0.03,
    muon_momentum: float = 0.9,
    muon_renormalize: bool = True,
    cuda_graphs: bool = False,
    resume_from: dict | None = None,
    on_epoch_end: Callable[[EpochMetrics, TrainingState], None] | None = None,
) -> list[EpochMetrics]:
    """Train for `epochs`, evaluating after each (on `val_split` too, when given); returns one
    record per epoch run here.

    `on_epoch_end(record, state)` is called after every epoch (logging, checkpointing).
    `resume_from` is a `TrainingState.state_dict()`: training continues after its epoch.
    With `ema` > 0 (its per-step decay) a moving average of the weights (and BatchNorm buffers)
    is updated after every step; it is what each epoch evaluates, and `model` holds it on return.
    `cutout` > 0 blanks a `cutout`-pixel square of every training image; `translate` is the
    largest random shift (pixels) of the training images; `tta` is how each epoch evaluates.
    `optimizer` and the `muon_*` options are `make_optimizer`'s.
    `cuda_graphs` (CUDA only) replays the training step and the evaluation's forward passes
    as CUDA graphs (`TrainStep`, `GraphedForward`): the same arithmetic, one launch a step.
    """
    device = train_split.images.device
    steps = len(train_split) // batch_size
    if steps == 0:
        raise ValueError(
            f"batch_size must be at most the training split's {len(train_split)} images "
            f"(got {batch_size})"
        )
    generator = torch.Generator().manual_seed(seed)
    optim = make_optimizer(
        model,
        learning_rate=learning_rate,
        momentum=momentum,
        weight_decay=weight_decay,
        optimizer=optimizer,
        muon_lr=muon_lr,
        muon_momentum=muon_momentum,
        muon_renormalize=muon_renormalize,
    )
    scheduler = make_scheduler(
        optim, epochs=epochs, steps_per_epoch=steps, warmup_epochs=warmup_epochs
    )
    average = None
    if ema > 0:
        average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema), use_buffers=True)
    state = TrainingState(model, optim, scheduler, generator, ema=average)
    if resume_from is not None:
        state.load_state_dict(resume_from)
    learning_rate_on_device(optim)
    step = TrainStep(
        model,
        optimizer=optim,
        loss_fn=nn.CrossEntropyLoss(label_smoothing=label_smoothing),
        autocast_dtype=autocast_dtype,
        average=average,
        cuda_graph=cuda_graphs,
    )
    evaluated = model if average is None else average.module
    graphed = None
    if cuda_graphs:
        graphed = GraphedForward(
            evaluated,
            batch_size=eval_batch_size or eval_batch_size_for(device),
            tta=tta,
            autocast_dtype=autocast_dtype,
        )
    records = []
    for epoch in range(state.epoch + 1, epochs + 1):
        started = time.perf_counter()
        lr = float(optim.param_groups[0]["lr"])
        train_loss, train_acc = train_one_epoch(
            step,
            train_batches(
                train_split,
                batch_size=batch_size,
                generator=generator,
                normalize=normalize,
                translate=translate,
                cutout=cutout,
            ),
            scheduler=scheduler,
            steps=steps,
            description=f"epoch {epoch}/{epochs}",
        )
        validation = None
        if val_split is not None:
            validation = evaluate(
                evaluated,
                val_split,
                normalize=normalize,
                batch_size=eval_batch_size,
                autocast_dtype=autocast_dtype,
                tta=tta,
                graphed=graphed,  # the same forward graph serves both splits
            )
        result = evaluate(
            evaluated,
            test_split,
            normalize=normalize,
            batch_size=eval_batch_size,
            autocast_dtype=autocast_dtype,
            tta=tta,
            graphed=graphed,
        )
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"training diverged at epoch {epoch} (loss {train_loss}); lower learning_rate"
            )
        record = EpochMetrics(
            epoch=epoch,
            train_loss=train_loss,
            train_acc=train_acc,
            test_loss=result.loss,
            test_acc=result.accuracy,
            lr=lr,
            epoch_seconds=time.perf_counter() - started,
            val_loss=None if validation is None else validation.loss,
            val_acc=None if validation is None else validation.accuracy,
        )
        state.epoch = epoch
        records.append(record)
        # The CLI echoes each epoch through its callback; a caller without one can log this.
        log.debug("%s", record.describe(epochs))
        if on_epoch_end is not None:
            on_epoch_end(record, state)
    if average is not None:
        model.load_state_dict(average.module.state_dict())
    return records
