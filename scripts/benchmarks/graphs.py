"""Does one CUDA graph per step pay? Per norm at its recipe batch size: the training step eager
vs replayed as one CUDA graph, on one prepared batch (`ceiling`) and on the pipeline's own
batches, and one evaluation of the test split with `train`'s default `tta`, eager vs graphed.
CUDA only: the numbers behind `cuda_graphs=auto`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.throughput import format_rate, measure_training
from benchmarks.timing import progress, synchronize, timed
from pipeline import batches, engine, graphs
from pipeline import data as datasets
from pipeline import device as devices
from pipeline.config import TrainConfig
from pipeline.model import Net


@dataclass(frozen=True)
class GraphSpeed:
    """Seconds per unit of work (a training step, or one evaluation of the test split), eager
    and as CUDA graphs, measured one after the other in the same process."""

    norm: str
    what: str
    batch_size: int
    images: int  # per unit of work
    eager_seconds: float
    graph_seconds: float


def measure(
    train_split: batches.DeviceSplit,
    test_split: batches.DeviceSplit,
    stats: datasets.DatasetStats,
    *,
    norms: list[str],
    device: torch.device,
    steps: int,
    warmup_steps: int,
    seed: int,
) -> list[GraphSpeed]:
    rows = []
    for norm in norms:
        recipe = TrainConfig(norm=norm)
        memory_format = devices.memory_format_for(norm, device)
        autocast_dtype = devices.resolve_precision("auto", device, norm=norm)
        for path in ("ceiling", "pipeline"):
            seconds = {}
            for graphed in (False, True):
                progress(
                    f"{norm}: {path} {'CUDA graph' if graphed else 'eager'} "
                    f"({steps} steps of {recipe.batch_size})"
                )
                result = measure_training(
                    train_split,
                    stats,
                    norm=norm,
                    path=path,
                    memory_format=memory_format,
                    autocast_dtype=autocast_dtype,
                    batch_size=recipe.batch_size,
                    steps=steps,
                    warmup_steps=warmup_steps,
                    seed=seed,
                    cuda_graph=graphed,
                )
                seconds[graphed] = result.seconds / steps
            rows.append(
                GraphSpeed(
                    norm=norm,
                    what=f"training step ({path})",
                    batch_size=recipe.batch_size,
                    images=recipe.batch_size,
                    eager_seconds=seconds[False],
                    graph_seconds=seconds[True],
                )
            )
        progress(f"{norm}: evaluation, tta {recipe.tta}, eager and graphed")
        rows.append(
            measure_evaluation(
                test_split,
                stats,
                norm=norm,
                tta=recipe.tta,
                memory_format=memory_format,
                autocast_dtype=autocast_dtype,
                seed=seed,
            )
        )
    return rows


def measure_evaluation(
    test_split: batches.DeviceSplit,
    stats: datasets.DatasetStats,
    *,
    norm: str,
    tta: str,
    memory_format: torch.memory_format,
    autocast_dtype: torch.dtype | None,
    seed: int,
) -> GraphSpeed:
    """One `engine.evaluate` of the test split, eager and graphed, each after an untimed one
    (the graphed one captures there)."""
    device = test_split.images.device
    batch_size = devices.eval_batch_size_for(device)
    torch.manual_seed(seed)
    model = Net(norm=norm, groups=TrainConfig().groups)
    model = model.to(device, memory_format=memory_format).eval()
    normalize = batches.Normalizer(stats, device=device, memory_format=memory_format)
    graphed = graphs.GraphedForward(
        model,
        forward=engine.tta_logits,
        batch_size=batch_size,
        tta=tta,
        autocast_dtype=autocast_dtype,
    )
    seconds = {}
    for forward in (None, graphed):

        def run(forward=forward) -> None:
            engine.evaluate(
                model,
                test_split,
                normalize=normalize,
                batch_size=batch_size,
                autocast_dtype=autocast_dtype,
                tta=tta,
                graphed=forward,
            )
            synchronize(device)

        run()
        seconds[forward is not None] = timed(run)
    return GraphSpeed(
        norm=norm,
        what=f"evaluation (tta {tta})",
        batch_size=batch_size,
        images=len(test_split),
        eager_seconds=seconds[False],
        graph_seconds=seconds[True],
    )


def report(rows: list[GraphSpeed], *, steps: int, warmup_steps: int) -> list[str]:
    lines = [
        "",
        "### CUDA graphs",
        "",
        f"Each norm at its recipe batch size (`config.RECIPES`): {steps} timed training steps "
        f"after {max(warmup_steps, graphs.GRAPH_WARMUP_STEPS + 1)} untimed ones (the graph's "
        "warm-up and capture among them), `engine.TrainStep` eager vs `cuda_graph=True`; one "
        "evaluation of the test split (`engine.evaluate`, eager vs `graphs.GraphedForward`) "
        "after an untimed one. Eager and graphed run one after the other in this process.",
        "",
        "| norm | what | batch | eager ms | graph ms | eager images/s | graph images/s "
        "| graph / eager |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.norm} | {row.what} | {row.batch_size} | {1000 * row.eager_seconds:.2f} | "
            f"{1000 * row.graph_seconds:.2f} | {format_rate(row.images / row.eager_seconds)} | "
            f"{format_rate(row.images / row.graph_seconds)} | "
            f"{row.eager_seconds / row.graph_seconds:.2f}x |"
        )
    lines.append("")
    return lines
