"""Does one CUDA graph per step pay? Per norm at its recipe, as `train` builds it
(`benchmarks.recipe`): the training step eager vs replayed as one CUDA graph, on one prepared
batch (`ceiling`) and on the pipeline's own batches, and one evaluation of the test split with
`train`'s default `tta`, eager vs graphed. CUDA only: the numbers behind `cuda_graphs=auto`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from benchmarks import recipe
from benchmarks.throughput import format_rate, measure_training
from benchmarks.timing import progress, synchronize, timed
from pipeline import batches, engine, graphs
from pipeline import data as datasets
from pipeline import device as devices
from pipeline.config import TrainConfig


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
        recipe_config = TrainConfig(norm=norm, seed=seed)
        for path in ("ceiling", "pipeline"):
            seconds = {}
            for graphed in (False, True):
                progress(
                    f"{norm}: {path} {'CUDA graph' if graphed else 'eager'} "
                    f"({steps} steps of {recipe_config.batch_size})"
                )
                result = measure_training(
                    train_split,
                    stats,
                    dataclasses.replace(recipe_config, cuda_graphs="on" if graphed else "off"),
                    path=path,
                    steps=steps,
                    warmup_steps=warmup_steps,
                )
                seconds[graphed] = result.seconds / steps
            rows.append(
                GraphSpeed(
                    norm=norm,
                    what=f"training step ({path})",
                    batch_size=recipe_config.batch_size,
                    images=recipe_config.batch_size,
                    eager_seconds=seconds[False],
                    graph_seconds=seconds[True],
                )
            )
        progress(f"{norm}: evaluation, tta {recipe_config.tta}, eager and graphed")
        rows.append(
            measure_evaluation(train_split, test_split, stats, recipe_config, device=device)
        )
    return rows


def measure_evaluation(
    train_split: batches.DeviceSplit,
    test_split: batches.DeviceSplit,
    stats: datasets.DatasetStats,
    config: TrainConfig,
    *,
    device: torch.device,
) -> GraphSpeed:
    """One `engine.evaluate` of the test split as `engine.fit` runs it after each epoch, of the
    recipe's model as `training.build_training` sets it up eager and with CUDA graphs (its
    `graphs.GraphedForward`), each after an untimed one (the graphed one captures there)."""
    seconds = {}
    for graphed in (False, True):
        built = recipe.build(
            dataclasses.replace(config, cuda_graphs="on" if graphed else "off"),
            device=device,
            train_images=len(train_split),
        )
        normalize = batches.Normalizer(stats, device=device, memory_format=built.memory_format)
        evaluated = built.training.evaluated.eval()

        def run(built=built, evaluated=evaluated, normalize=normalize) -> None:
            engine.evaluate(
                evaluated,
                test_split,
                normalize=normalize,
                batch_size=built.training.eval_batch_size,
                autocast_dtype=built.autocast_dtype,
                tta=config.tta,
                graphed=built.training.graphed,
            )
            synchronize(device)

        run()
        seconds[graphed] = timed(run)
    return GraphSpeed(
        norm=config.norm,
        what=f"evaluation (tta {config.tta})",
        batch_size=devices.eval_batch_size_for(device),  # eager and graphed alike
        images=len(test_split),
        eager_seconds=seconds[False],
        graph_seconds=seconds[True],
    )


def report(rows: list[GraphSpeed], *, steps: int, warmup_steps: int) -> list[str]:
    lines = [
        "",
        "### CUDA graphs",
        "",
        f"Each norm at its recipe (`config.RECIPES`): {steps} timed training steps "
        f"after {max(warmup_steps, graphs.GRAPH_WARMUP_STEPS + 1)} untimed ones (the graph's "
        "warm-up and capture among them), `engine.TrainStep` eager vs `cuda_graph=True`; one "
        "evaluation of the test split (`engine.evaluate`, eager vs `graphs.GraphedForward`) "
        "after an untimed one. Eager and graphed run one after the other in this process. "
        + recipe.caption(list(dict.fromkeys(row.norm for row in rows))),
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
