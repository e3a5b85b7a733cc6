"""The training step and the loops: `fit(training, splits, recipe, on_epoch_end)` -> one record
per epoch. No MLflow here: `fit` reports through a plain callback."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from pipeline import graphs
from pipeline.batches import DeviceSplit, Normalizer, eval_batches, train_batches
from pipeline.config import DEFAULT_TTA, TTA_MODES, TrainConfig, check_choice
from pipeline.device import eval_batch_size_for
from pipeline.graphs import GraphedForward

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
    logits: torch.Tensor | None = None  # (N, classes) float32 on the CPU, the TTA average


@dataclass(frozen=True)
class TestBatchStatistics:
    """`bn_stats=test-batch`: every batch norm layer normalizes with the statistics of the
    batch it sees (Schneider et al., 2020; Nado et al., 2020), never its running ones. The
    batches have a size of their own, `batch_size`, over a shuffle of the split seeded by
    `seed` (an image-folder split is stored class by class: one class is not a test batch);
    the last partial batch joins the one before, and each TTA view is normalized on its own.
    Group and layer norm are per image, so it changes nothing for them."""

    batch_size: int
    seed: int

    def batches(self, count: int) -> list[torch.Tensor]:
        """The indices of each batch: a seeded permutation of range(count), in batches of
        `batch_size`, the remainder merged into the last full one."""
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed))
        starts = list(range(0, count, self.batch_size))
        if len(starts) > 1 and count - starts[-1] < self.batch_size:
            starts.pop()  # the partial batch joins the one before
        ends = [*starts[1:], count]
        return [order[start:end] for start, end in zip(starts, ends, strict=True)]


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[int]:
    """Within it, the model's batch norm layers (every `nn.BatchNorm2d`, ghost batch norm
    included) normalize with their input's statistics in eval mode, and update nothing: their
    running statistics are set aside (a layer without them takes batch statistics, as torch's
    BatchNorm does) and put back on exit. Yields how many layers it switched."""
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    layers = [m for m in model.modules() if isinstance(m, kinds)]
    kept = [(layer.running_mean, layer.running_var) for layer in layers]
    try:
        for layer in layers:
            layer.running_mean, layer.running_var = None, None
        yield len(layers)
    finally:
        for layer, (mean, var) in zip(layers, kept, strict=True):
            layer.running_mean, layer.running_var = mean, var


# --------------------------------------------------------------------------- loops


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
        elif self.eager_steps < graphs.GRAPH_WARMUP_STEPS:
            self.eager_steps += 1
            graphs.on_side_stream(self.device, lambda: self._step(images, labels))
        else:
            self.graph, self.static_images, self.static_labels = graphs.capture_step(
                self._step, images, labels
            )
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
    test_batch: TestBatchStatistics | None = None,
) -> Evaluation:
    """Loss and accuracy on `split`, with test-time augmentation `tta` (see `tta_logits`), in
    batches of `batch_size` (default: `eval_batch_size_for` the split's device). `graphed`, a
    `GraphedForward` of `model` with the same `tta`, replays the forward passes as a CUDA
    graph (its batch size is then the evaluation's). `test_batch` normalizes batch norm with
    the statistics of each test batch instead (its own batches; see `TestBatchStatistics`);
    predictions and logits come back in the split's order either way."""
    check_choice("tta", tta, TTA_MODES)
    if graphed is not None:
        if graphed.model is not model or graphed.tta != tta:
            raise ValueError("graphed must be a GraphedForward of this model and tta")
        if test_batch is not None:
            raise ValueError("a graphed forward pads its batches: no test-batch statistics")
        batch_size = graphed.batch_size
    batch_size = batch_size or eval_batch_size_for(split.images.device)
    if isinstance(model, nn.Module) and hasattr(model, "eval") and not _is_graph_module(model):
        model.eval()
    if test_batch is None:
        batches = eval_batches(split, batch_size=batch_size, normalize=normalize)
        logits, loss = _logits(
            model, batches, autocast_dtype=autocast_dtype, tta=tta, graphed=graphed
        )
    else:
        indices = test_batch.batches(len(split))
        batches = ((normalize(split.images[i]), split.labels[i]) for i in indices)
        with batch_statistics(model):
            shuffled, loss = _logits(model, batches, autocast_dtype=autocast_dtype, tta=tta)
        logits = torch.empty_like(shuffled)
        logits[torch.cat(indices).to(logits.device)] = shuffled
    predicted = logits.argmax(dim=1).cpu()
    labels = split.labels.cpu()
    return Evaluation(
        loss=loss.item() / len(split),
        accuracy=(predicted == labels).float().mean().item(),
        predictions=predicted,
        labels=labels,
        logits=logits.cpu(),
    )


def _logits(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    autocast_dtype: torch.dtype | None,
    tta: str,
    graphed: GraphedForward | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 TTA logits of every batch, in order, on the batches' device, and the summed
    cross-entropy, added batch by batch on the device (no host read)."""
    parts, loss_sum = [], None
    for images, labels in batches:
        if graphed is not None:
            logits = graphed(images).clone()  # the graph's output buffer is reused
        else:
            with torch.autocast(
                images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                logits = tta_logits(model, images, tta)
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        loss_sum = loss if loss_sum is None else loss_sum + loss
        parts.append(logits)
    return torch.cat(parts), loss_sum


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


@dataclass(frozen=True)
class Splits:
    """The device-resident splits a training steps and scores on, and their normalisation."""

    train: DeviceSplit
    test: DeviceSplit
    normalize: Normalizer
    val: DeviceSplit | None = None  # held out of the training images, when val_size > 0


@dataclass
class Training:
    """What `fit` steps with, as `training.build_training` makes it from a recipe: the step
    (model, optimizer, loss, weight average), the schedule, the checkpointable state and what
    each epoch evaluates."""

    step: TrainStep
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: TrainingState
    evaluated: nn.Module  # the model, or its weight average when `ema` > 0
    steps_per_epoch: int
    autocast_dtype: torch.dtype | None = None
    eval_batch_size: int | None = None  # None: device.eval_batch_size_for the split's device
    graphed: GraphedForward | None = None  # the evaluation's forward passes as a CUDA graph


def fit(
    training: Training,
    splits: Splits,
    recipe: TrainConfig,
    *,
    on_epoch_end: Callable[[EpochMetrics, TrainingState], None] | None = None,
) -> list[EpochMetrics]:
    """Train for `recipe.epochs` (after the epochs `training.state` has done), evaluating after
    each epoch with `recipe.tta` (on the validation split too, when there is one); returns one
    record per epoch run here. `on_epoch_end(record, state)` is called after every epoch
    (logging, checkpointing). With a weight average (`recipe.ema` > 0), the average is what each
    epoch evaluates, and the model holds it on return.
    """
    state, epochs = training.state, recipe.epochs
    records = []
    for epoch in range(state.epoch + 1, epochs + 1):
        started = time.perf_counter()
        lr = float(state.optimizer.param_groups[0]["lr"])
        batches = train_batches(
            splits.train,
            batch_size=recipe.batch_size,
            generator=state.generator,
            normalize=splits.normalize,
            translate=recipe.translate,
            cutout=recipe.cutout,
        )
        train_loss, train_acc = train_one_epoch(
            training.step,
            batches,
            scheduler=training.scheduler,
            steps=training.steps_per_epoch,
            description=f"epoch {epoch}/{epochs}",
        )
        validation = None if splits.val is None else _evaluate(training, splits.val, splits, recipe)
        result = _evaluate(training, splits.test, splits, recipe)
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
    if state.ema is not None:
        state.model.load_state_dict(state.ema.module.state_dict())
    return records


def _evaluate(training: Training, split: DeviceSplit, splits: Splits, recipe: TrainConfig):
    return evaluate(
        training.evaluated,
        split,
        normalize=splits.normalize,
        batch_size=training.eval_batch_size,
        autocast_dtype=training.autocast_dtype,
        tta=recipe.tta,
        graphed=training.graphed,  # the same forward graph serves both splits
    )
