import copy

import pytest
import torch
from conftest import make_split_arrays
from reference_training import reference_fit
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline import batches, data, engine, optim, training
from pipeline import device as devices
from pipeline.config import ConfigError, TrainConfig
from pipeline.model import Net

CPU = torch.device("cpu")


def _splits(count=None):
    arrays = make_split_arrays()
    train = batches.to_device(
        arrays["train_images"][:count], arrays["train_labels"][:count], device=CPU
    )
    test = batches.to_device(arrays["test_images"], arrays["test_labels"], device=CPU)
    stats = data.compute_stats(arrays["train_images"])
    return train, test, batches.Normalizer(stats, device=CPU, memory_format=torch.channels_last)


def _fit(model, *, count=None, resume_from=None, on_epoch_end=None, **recipe):
    """`engine.fit` through the one builder, `training.build_training`, as `train` runs it."""
    train, test, normalize = _splits(count)
    return _fit_splits(
        model, train, test, normalize, resume_from=resume_from, on_epoch_end=on_epoch_end, **recipe
    )


def _fit_splits(model, train, test, normalize, *, resume_from=None, on_epoch_end=None, **recipe):
    settings = dict(
        epochs=2,
        batch_size=32,
        learning_rate=0.05,
        label_smoothing=0.0,
        warmup_epochs=0.5,
        seed=0,
        optimizer="sgd",
    )
    settings.update(recipe)
    config = TrainConfig(**settings)
    built = training.build_training(model, config, train_images=len(train), resume_from=resume_from)
    splits = engine.Splits(train, test, normalize)
    return engine.fit(built, splits, config, on_epoch_end=on_epoch_end)


def test_loss_falls_when_overfitting_64_images():
    torch.manual_seed(0)
    model = Net(norm="batch", groups=4).to(memory_format=torch.channels_last)
    records = _fit(model, epochs=12, count=64, learning_rate=0.05)
    assert records[-1].train_loss < 0.5 * records[0].train_loss
    assert records[-1].train_acc > 0.8


def test_same_seed_gives_the_same_metrics_and_a_record_per_epoch():
    def run():
        torch.manual_seed(3)
        return _fit(Net(norm="group", groups=4), epochs=2, seed=3)

    first, second = run(), run()
    assert [r.epoch for r in first] == [1, 2]
    strip = [{k: v for k, v in r.metrics().items() if k != "epoch_seconds"} for r in first]
    assert strip == [{k: v for k, v in r.metrics().items() if k != "epoch_seconds"} for r in second]


def test_evaluation_does_not_depend_on_its_batch_size():
    _, test, normalize = _splits()
    model = Net(norm="group", groups=4)
    assert devices.eval_batch_size_for(CPU) == 128
    default = engine.evaluate(model, test, normalize=normalize, tta="flip-translate")
    odd = engine.evaluate(model, test, normalize=normalize, tta="flip-translate", batch_size=7)
    assert torch.equal(default.predictions, odd.predictions)
    assert default.loss == pytest.approx(odd.loss, rel=1e-5)


def test_test_time_augmentation_leaves_training_untouched():
    """The README's results rest on this: a run with another `tta` trains the same weights."""

    def weights(tta):
        torch.manual_seed(4)
        model = Net(norm="batch", groups=4)
        records = _fit(model, epochs=2, seed=4, tta=tta, count=96)
        return model.state_dict(), [(r.train_loss, r.train_acc) for r in records]

    flip, translated = weights("flip"), weights("flip-translate")
    assert flip[1] == translated[1]
    for name, tensor in flip[0].items():
        assert torch.equal(tensor, translated[0][name]), name


def test_callback_sees_every_epoch_and_learning_rate_follows_one_cycle():
    seen = []
    torch.manual_seed(0)
    _fit(
        Net(norm="layer", groups=1),
        epochs=4,
        warmup_epochs=1,
        on_epoch_end=lambda record, state: seen.append((record, state.epoch)),
    )
    assert [epoch for _, epoch in seen] == [1, 2, 3, 4]
    rates = [record.lr for record, _ in seen]
    assert rates[0] < rates[1] and rates[1] > rates[2] > rates[3] > 0


def test_evaluate_accuracy_agrees_with_its_predictions():
    _, test, normalize = _splits()
    result = engine.evaluate(Net(norm="batch", groups=4), test, normalize=normalize)
    assert result.predictions.shape == result.labels.shape == (len(test),)
    assert result.accuracy == (result.predictions == result.labels).float().mean().item()


def test_resuming_from_a_checkpoint_reaches_the_same_weights_bit_for_bit():
    torch.manual_seed(7)
    full_model = Net(norm="batch", groups=4, dropout=0.1)
    start = copy.deepcopy(full_model.state_dict())
    checkpoints = {}

    def keep(record, state):
        checkpoints[record.epoch] = copy.deepcopy(state.state_dict())

    full = _fit(full_model, epochs=3, seed=7, on_epoch_end=keep)

    torch.manual_seed(7)
    resumed_model = Net(norm="batch", groups=4, dropout=0.1)
    resumed_model.load_state_dict(start)
    rest = _fit(resumed_model, epochs=3, seed=7, resume_from=checkpoints[1])
    assert [r.epoch for r in rest] == [2, 3]
    for name, tensor in full_model.state_dict().items():
        assert torch.equal(tensor, resumed_model.state_dict()[name]), name
    assert rest[-1].test_acc == full[-1].test_acc and rest[-1].train_loss == full[-1].train_loss


def test_devices_and_precision_resolve_sensibly():
    assert devices.resolve_device("cpu") == CPU
    assert devices.resolve_device("auto").type in {"cpu", "cuda", "mps"}
    assert devices.resolve_precision("fp32", CPU) is None
    assert devices.resolve_precision("bf16", CPU) is torch.bfloat16
    assert devices.resolve_precision("auto", torch.device("cuda"), norm="batch") is None
    # One spelling for a precision, `precision`'s own, wherever a run logs it.
    for precision in ("fp32", "bf16"):
        assert devices.precision_name(devices.resolve_precision(precision, CPU)) == precision
    assert devices.precision_name(torch.float16) == "fp16"


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_for_measured_norms_on_a_cpu_with_native_bf16(
    native, monkeypatch
):
    monkeypatch.setattr(devices, "BF16_NORMS", ("batch",))  # the decision, whatever the table
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert devices.cpu_has_native_bf16() is native
    assert ("avx512_bf16" in devices.cpu_capability()) is native
    for norm in ("batch", "group", "layer"):
        expected = torch.bfloat16 if native and norm in devices.BF16_NORMS else None
        assert devices.resolve_precision("auto", CPU, norm=norm) is expected, norm
        assert devices.resolve_precision("fp32", CPU, norm=norm) is None
    assert devices.memory_format_for("group", CPU) == torch.channels_last
    assert devices.memory_format_for("batch", torch.device("cuda")) == torch.channels_last
    assert devices.memory_format_for("layer", torch.device("cuda")) == torch.contiguous_format


def test_ema_is_what_each_epoch_evaluates_and_what_the_model_holds_at_the_end():
    torch.manual_seed(5)
    model = Net(norm="batch", groups=4)
    seen = {}

    def keep(record, state):
        seen[record.epoch] = (record, copy.deepcopy(state.ema.module.state_dict()))

    records = _fit(model, epochs=2, seed=5, ema=0.9, on_epoch_end=keep)
    _, test, normalize = _splits()
    averaged = Net(norm="batch", groups=4)
    averaged.load_state_dict(seen[2][1])
    assert engine.evaluate(averaged, test, normalize=normalize).accuracy == records[-1].test_acc
    for name, tensor in model.state_dict().items():  # fit leaves the average in the model
        assert torch.equal(tensor, seen[2][1][name]), name


def test_resuming_with_ema_reaches_the_same_weights_bit_for_bit():
    checkpoints = {}
    torch.manual_seed(8)
    full_model = Net(norm="layer", groups=1)
    start = copy.deepcopy(full_model.state_dict())
    _fit(
        full_model,
        epochs=3,
        seed=8,
        ema=0.95,
        cutout=8,
        on_epoch_end=lambda record, state: checkpoints.__setitem__(
            record.epoch, copy.deepcopy(state.state_dict())
        ),
    )
    assert "ema" in checkpoints[1]
    resumed_model = Net(norm="layer", groups=1)
    resumed_model.load_state_dict(start)
    _fit(resumed_model, epochs=3, seed=8, ema=0.95, cutout=8, resume_from=checkpoints[1])
    for name, tensor in full_model.state_dict().items():
        assert torch.equal(tensor, resumed_model.state_dict()[name]), name


class _Recorder(torch.nn.Module):
    """Logits = per-channel means (4 classes from 3 channels + 1); records every input."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, images):
        self.seen.append(images.clone())
        means = images.mean(dim=(2, 3))
        return torch.cat([means, images[:, :1, 0, :1].reshape(-1, 1)], dim=1)


def test_tta_views_are_the_image_its_mirror_and_two_one_pixel_shifts():
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    for tta, calls in (("none", 1), ("flip", 2), ("flip-translate", 6)):
        model = _Recorder()
        logits = engine.tta_logits(model, images, tta)
        assert len(model.seen) == calls, tta
        assert logits.shape == (2, 4)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[..., :6, :6], padded[..., 2:, 2:]
    expected = [images, images.flip(3), up_left, up_left.flip(3), down_right, down_right.flip(3)]
    for seen, view in zip(model.seen, expected, strict=True):
        assert torch.equal(seen, view)
    # Half the mirror pair, half the mean of the two shifted mirror pairs.
    pair = [model.forward(v) for v in expected]
    want = ((pair[0] + pair[1]) / 2 + ((pair[2] + pair[3]) / 2 + (pair[4] + pair[5]) / 2) / 2) / 2
    assert torch.allclose(logits, want)


def test_evaluate_rejects_an_unknown_tta():
    train, test, normalize = _splits(64)
    with pytest.raises(ConfigError, match="tta must be one of none, flip, flip-translate"):
        engine.evaluate(Net(norm="batch", groups=4), test, normalize=normalize, tta="x")


def test_translate_zero_trains_on_unshifted_images():
    model = Net(norm="batch", groups=4)
    records = _fit(model, epochs=1, translate=0, tta="flip-translate", count=64)
    assert len(records) == 1 and 0.0 <= records[0].test_acc <= 1.0


# --------------------------------------------------------------------------- the sync-free step


@pytest.mark.parametrize(
    "norm, ema, cutout", [("batch", 0.0, 0), ("group", 0.9, 8), ("layer", 0.0, 0)]
)
def test_the_step_trains_bit_for_bit_as_the_batch_by_batch_loop(norm, ema, cutout):
    """Draws ahead, a device learning rate and the host-free average change no bit on the CPU:
    the same weights, losses, learning rates and final test accuracy for a seed."""
    train, test, normalize = _splits(96)
    torch.manual_seed(5)
    model = Net(norm=norm, groups=4).to(memory_format=torch.channels_last)
    reference = copy.deepcopy(model)
    options = dict(epochs=2, batch_size=32, learning_rate=0.05, seed=5, ema=ema, cutout=cutout)
    records = _fit_splits(
        model, train, test, normalize, label_smoothing=0.1, warmup_epochs=0.5, **options
    )
    expected, evaluated = reference_fit(reference, train, normalize=normalize, **options)
    assert [(r.train_loss, r.train_acc, r.lr) for r in records] == expected
    for name, tensor in evaluated.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    final = engine.evaluate(evaluated, test, normalize=normalize)
    assert records[-1].test_acc == final.accuracy and records[-1].test_loss == final.loss


def test_the_weight_average_update_is_torchs_without_the_host_read():
    torch.manual_seed(0)
    model = Net(norm="batch", groups=4)
    ours = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    torchs = copy.deepcopy(ours)
    for update in range(3):
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.add_(torch.rand_like(tensor.float()).to(tensor.dtype) + 1)
        engine.update_average(ours, model, first=update == 0)
        torchs.update_parameters(model)
        for (name, mine), theirs in zip(
            ours.state_dict().items(), torchs.state_dict().values(), strict=True
        ):
            assert torch.equal(mine, theirs), (update, name)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_the_learning_rate_lives_on_the_device_and_follows_the_schedule():
    model = Net(norm="batch", groups=4)
    optimizer = optim.make_optimizer(model, learning_rate=0.4, momentum=0.9, weight_decay=0)
    scheduler = optim.make_scheduler(optimizer, epochs=2, steps_per_epoch=5, warmup_epochs=1)
    optim.learning_rate_on_device(optimizer)
    rates = optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"]
    assert all(isinstance(r, torch.Tensor) and r.dtype == torch.float64 for r in rates)
    seen = []
    for _ in range(6):
        seen.append(float(rates[0]))
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] is rates[0]  # written in place, never replaced
    assert seen == pytest.approx([0.4 * (s + 1) / 6 for s in range(5)] + [0.4])


def _resumes_bit_for_bit(norm: str, *, seed: int, edit=lambda checkpoint: None, **options):
    """Two epochs straight through, and the same from epoch 1's checkpoint (after `edit`):
    the same weights to the last bit."""
    torch.manual_seed(seed)
    full_model = Net(norm=norm, groups=4)
    start = copy.deepcopy(full_model.state_dict())
    checkpoints = {}

    def keep(record, state):
        checkpoints[record.epoch] = copy.deepcopy(state.state_dict())

    options = dict(epochs=2, seed=seed, count=96, **options)
    _fit(full_model, on_epoch_end=keep, **options)
    edit(checkpoints[1])
    resumed = Net(norm=norm, groups=4)
    resumed.load_state_dict(start)
    _fit(resumed, resume_from=checkpoints[1], **options)
    for name, tensor in full_model.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_a_checkpoint_with_float_learning_rates_resumes_bit_for_bit():
    """Checkpoints written before the rate moved to the device hold floats; they still resume."""

    def as_written_before(checkpoint):
        for group in checkpoint["optimizer"]["param_groups"]:
            group["lr"] = float(group["lr"])

    _resumes_bit_for_bit("layer", seed=8, edit=as_written_before)


# --------------------------------------------------------------------------- Muon


def test_muon_overfits_64_images():
    torch.manual_seed(0)
    model = Net(norm="batch", groups=4).to(memory_format=torch.channels_last)
    records = _fit(model, epochs=12, count=64, optimizer="muon", muon_lr=0.03)
    assert records[-1].train_loss < 0.5 * records[0].train_loss
    assert records[-1].train_acc > 0.8


def test_muon_takes_every_conv_filter_but_the_head_and_sgd_steps_the_rest_as_torch_does():
    torch.manual_seed(1)
    model = Net(norm="layer", groups=4)
    reference = copy.deepcopy(model)
    muon = optim.make_optimizer(
        model, learning_rate=0.1, momentum=0.9, weight_decay=5e-4, optimizer="muon"
    )
    filters = {id(p) for g in muon.param_groups if g["muon"] for p in g["params"]}
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert filters == {id(w) for w in convs if w is not model.c10.weight}
    sgd = torch.optim.SGD(
        [
            {"params": [reference.c10.weight], "weight_decay": 5e-4},
            {"params": [p for p in reference.parameters() if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=0.1,
        momentum=0.9,
        nesterov=True,
    )
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        for net, optimizer in ((model, muon), (reference, sgd)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(images), labels).backward()
            optimizer.step()
        # Identical until here, so the SGD parameters (not the filters) must match exactly.
        for p in [*reference.parameters()]:
            if p.ndim <= 1 or p is reference.c10.weight:
                name = next(n for n, q in reference.named_parameters() if q is p)
                assert torch.equal(dict(model.named_parameters())[name], p), name
        model.load_state_dict(reference.state_dict())  # filters too, for the next round


def test_orthogonalize_gives_singular_values_near_one_for_wide_and_tall_matrices():
    torch.manual_seed(2)
    for shape in ((24, 144), (32, 16)):
        update = optim.orthogonalize(torch.randn(shape) * 5)
        values = torch.linalg.svdvals(update.float())
        assert update.shape == shape and update.dtype == torch.float32
        assert 0.5 < values.min() and values.max() < 1.5


def test_muon_renormalizes_each_filter_tensor_to_the_root_of_its_outputs():
    torch.manual_seed(3)
    model = Net(norm="batch", groups=4)
    with torch.no_grad():
        model.C3.conv.weight.mul_(7)
    optimizer = optim.make_optimizer(
        model, learning_rate=0.1, momentum=0.9, weight_decay=0, optimizer="muon", muon_lr=1e-6
    )
    torch.nn.functional.cross_entropy(
        model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,))
    ).backward()
    optimizer.step()
    assert model.C3.conv.weight.norm().item() == pytest.approx(24**0.5, rel=1e-4)


def test_resuming_a_muon_run_reaches_the_same_weights_bit_for_bit():
    _resumes_bit_for_bit("group", seed=6, optimizer="muon", muon_momentum=0.85)


def test_cuda_graphs_resolve_to_on_for_cuda_only():
    cuda = torch.device("cuda")
    assert devices.resolve_cuda_graphs("auto", cuda) == (True, "")
    assert devices.resolve_cuda_graphs("on", cuda) == (True, "")
    used, why = devices.resolve_cuda_graphs("auto", CPU)
    assert not used and "no CUDA device" in why
    used, why = devices.resolve_cuda_graphs("auto", cuda, compile="on")
    assert not used and "compile=on" in why
    assert devices.resolve_cuda_graphs("off", cuda)[0] is False
    with pytest.raises(ConfigError, match="cuda_graphs=on needs a CUDA device"):
        devices.resolve_cuda_graphs("on", CPU)
    with pytest.raises(ValueError, match="a CUDA graph needs a model on a CUDA device"):
        optimizer = optim.make_optimizer(
            Net(norm="batch", groups=4), learning_rate=0.1, momentum=0, weight_decay=0
        )
        engine.TrainStep(
            Net(norm="batch", groups=4),
            optimizer=optimizer,
            loss_fn=torch.nn.CrossEntropyLoss(),
            autocast_dtype=None,
            cuda_graph=True,
        )


# --------------------------------------------------------------------------- test-batch statistics


def test_test_batches_cover_the_split_once_in_a_seeded_order_the_remainder_joining_the_last():
    batches = engine.TestBatchStatistics(batch_size=32, seed=3).batches(100)
    assert [len(b) for b in batches] == [32, 32, 36]
    assert sorted(torch.cat(batches).tolist()) == list(range(100))
    again = engine.TestBatchStatistics(batch_size=32, seed=3).batches(100)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    other = engine.TestBatchStatistics(batch_size=32, seed=4).batches(100)
    assert not torch.equal(batches[0], other[0])
    assert [len(b) for b in engine.TestBatchStatistics(batch_size=64, seed=0).batches(20)] == [20]


def test_batch_statistics_normalize_with_the_batch_and_leave_the_running_ones_alone():
    torch.manual_seed(0)
    layer = torch.nn.BatchNorm2d(3).eval()
    layer.running_mean.fill_(5.0)
    images = torch.randn(8, 3, 4, 4) * 2 + 1
    with torch.no_grad(), engine.batch_statistics(layer) as switched:
        ours = layer(images)
    expected = torch.nn.functional.batch_norm(
        images, None, None, layer.weight, layer.bias, training=True, eps=layer.eps
    )
    assert switched == 1 and torch.allclose(ours, expected, atol=1e-6)
    assert torch.equal(layer.running_mean, torch.full((3,), 5.0))  # put back, not updated
    assert not torch.allclose(layer(images), expected, atol=1e-3)  # running stats again


def test_evaluate_with_test_batch_statistics_returns_the_splits_order():
    _, test, normalize = _splits()
    torch.manual_seed(1)
    batch_norm = Net(norm="batch", groups=4)
    whole = engine.TestBatchStatistics(batch_size=len(test), seed=7)
    result = engine.evaluate(batch_norm, test, normalize=normalize, tta="none", test_batch=whole)
    batch_norm.train()  # one batch: train mode's forward over the whole split, in its order
    with torch.no_grad():
        expected = batch_norm(normalize(test.images)).float()
    assert torch.allclose(result.logits, expected, atol=1e-4)
    assert torch.equal(result.predictions, expected.argmax(dim=1))
    running = engine.evaluate(batch_norm, test, normalize=normalize, tta="none")
    assert not torch.allclose(running.logits, result.logits, atol=1e-3)
    # Group norm is per image: test-batch statistics change nothing.
    group_norm = Net(norm="group", groups=4)
    small = engine.TestBatchStatistics(batch_size=16, seed=7)
    plain = engine.evaluate(group_norm, test, normalize=normalize)
    shuffled = engine.evaluate(group_norm, test, normalize=normalize, test_batch=small)
    assert torch.allclose(plain.logits, shuffled.logits, atol=1e-5)
    assert torch.equal(plain.predictions, shuffled.predictions)
