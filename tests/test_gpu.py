"""The CUDA path: the training step and the evaluation as CUDA graphs against the eager step.
Skipped without a CUDA device (CI is CPU-only); `pytest -m gpu` on a GPU machine runs them."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import make_split_arrays

from pipeline import batches as batching
from pipeline import data, engine, graphs, training
from pipeline import device as devices
from pipeline.config import TrainConfig
from pipeline.model import Net

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def cuda(monkeypatch):
    # The same kernels in both runs: cuDNN's autotuner may otherwise pick other algorithms.
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    return torch.device("cuda")


def _splits(device, *, norm="batch"):
    arrays = make_split_arrays()
    train = batching.to_device(arrays["train_images"], arrays["train_labels"], device=device)
    test = batching.to_device(arrays["test_images"], arrays["test_labels"], device=device)
    stats = data.compute_stats(arrays["train_images"])
    memory_format = devices.memory_format_for(norm, device)
    return train, test, batching.Normalizer(stats, device=device, memory_format=memory_format)


def _trainer(norm, device, *, cuda_graph, ema=0.0, steps_per_epoch=10):
    """The norm's recipe (Muon for the conv filters) as `train` builds it, at batch 24."""
    recipe = TrainConfig(norm=norm, batch_size=24, epochs=5, warmup_epochs=1.0, ema=ema, seed=11)
    torch.manual_seed(recipe.seed)
    model = training.build_model(recipe)
    model = model.to(device=device, memory_format=devices.memory_format_for(norm, device))
    built = training.build_training(
        model, recipe, train_images=recipe.batch_size * steps_per_epoch, cuda_graphs=cuda_graph
    )
    return model, built.step, built.scheduler, built.state.ema


def _batches(train, normalize, *, seed=3):
    generator = torch.Generator().manual_seed(seed)

    def epochs():
        while True:
            yield from batching.train_batches(
                train, batch_size=24, generator=generator, normalize=normalize
            )

    return epochs()


@pytest.mark.parametrize("norm, ema", [("batch", 0.0), ("group", 0.0), ("layer", 0.9)])
def test_the_graphed_step_trains_as_the_eager_step_for_50_steps(cuda, norm, ema):
    train, _, normalize = _splits(cuda, norm=norm)
    runs = {}
    for graphed in (False, True):
        model, step, scheduler, average = _trainer(norm, cuda, cuda_graph=graphed, ema=ema)
        model.train()
        step.reset_sums()
        for images, labels in itertools.islice(_batches(train, normalize), 50):
            step(images, labels)
            scheduler.step()
        assert (step.graph is not None) == graphed
        runs[graphed] = (model, step.sums(), average)
    (eager, eager_sums, eager_average), (graph, graph_sums, graph_average) = runs[0], runs[1]
    # Parameters and buffers (BatchNorm's running statistics, num_batches_tracked) alike.
    for name, tensor in eager.state_dict().items():
        torch.testing.assert_close(graph.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)
    if ema:
        for name, tensor in eager_average.state_dict().items():
            torch.testing.assert_close(
                graph_average.state_dict()[name], tensor, rtol=1e-4, atol=1e-5
            )
    assert graph_sums == pytest.approx(eager_sums, rel=1e-4)
    if norm == "batch":  # the running statistics were updated by every replay
        assert int(graph.C1.norm.num_batches_tracked) == 50


@pytest.mark.parametrize("tta", ["none", "flip-translate"])
def test_the_graphed_evaluation_matches_the_eager_one_with_a_padded_last_batch(cuda, tta):
    _, test, normalize = _splits(cuda)
    torch.manual_seed(2)
    model = Net(norm="batch", groups=4).to(cuda, memory_format=torch.channels_last)
    eager = engine.evaluate(model, test, normalize=normalize, batch_size=16, tta=tta)
    graphed = graphs.GraphedForward(
        model, forward=engine.tta_logits, batch_size=16, tta=tta, autocast_dtype=None
    )
    assert len(test) % 16  # the last batch is partial, so padded
    for _ in range(2):  # captured on the first evaluation, replayed on the second
        result = engine.evaluate(model, test, normalize=normalize, tta=tta, graphed=graphed)
        assert torch.equal(result.predictions, eager.predictions)
        assert result.loss == pytest.approx(eager.loss, rel=1e-5)


def test_neither_the_eager_nor_the_graphed_step_waits_on_the_host(cuda):
    train, _, normalize = _splits(cuda)
    for graphed in (False, True):
        _, step, scheduler, _ = _trainer("batch", cuda, cuda_graph=graphed, ema=0.9)
        batches = _batches(train, normalize)
        for images, labels in itertools.islice(batches, graphs.GRAPH_WARMUP_STEPS + 1):
            step(images, labels)  # warm-up and capture synchronize, by design
            scheduler.step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for images, labels in itertools.islice(batches, 5):  # within the first epoch
                step(images, labels)
                scheduler.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_fit_with_cuda_graphs_reaches_the_eager_weights(cuda):
    train, test, normalize = _splits(cuda)
    results = {}
    for graphed in (False, True):
        recipe = TrainConfig(
            norm="group",
            epochs=2,
            batch_size=32,
            learning_rate=0.05,
            warmup_epochs=0.5,
            seed=4,
            ema=0.8,
            optimizer="sgd",  # the graphed SGD here; _trainer's tests graph the recipe's Muon
        )
        torch.manual_seed(recipe.seed)
        model = training.build_model(recipe).to(cuda)
        built = training.build_training(
            model, recipe, train_images=len(train), eval_batch_size=64, cuda_graphs=graphed
        )
        records = engine.fit(built, engine.Splits(train, test, normalize), recipe)
        results[graphed] = (copy.deepcopy(model.state_dict()), records)
    for name, tensor in results[False][0].items():
        torch.testing.assert_close(results[True][0][name], tensor, rtol=1e-3, atol=1e-4)
    for eager, graph in zip(results[False][1], results[True][1], strict=True):
        assert graph.train_loss == pytest.approx(eager.train_loss, rel=1e-3)
        assert graph.test_acc == pytest.approx(eager.test_acc, abs=0.02)
