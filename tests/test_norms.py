"""The normalization registry and its norms: ghost batch statistics (`norm_batch`), instance
norm, no norm, filter response norm; each checked against its formula on a random tensor."""

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO
from torch import nn

from pipeline import config, norms, plots
from pipeline import device as devices
from pipeline.config import ConfigError, TrainConfig
from pipeline.model import MAX_PARAMETERS, Net, count_parameters, make_norm
from pipeline.norms import FilterResponseNorm2d, GhostBatchNorm2d

NEW_NORMS = ("instance", "none", "frn")


def _random_affine(module: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


# --------------------------------------------------------------------------- the registry


def test_every_view_of_the_registry_keeps_the_three_norms_names_and_numbers():
    assert config.NORMS[:3] == ("batch", "group", "layer")
    assert set(config.NORMS) == set(norms.REGISTRY) >= {"instance", "none", "frn"}
    assert config.STUDY_NORMS == ("batch", "group", "layer")  # the default study
    # chosen on the validation split
    assert [config.RECIPES[norm]["batch_size"] for norm in config.NORMS[:3]] == [128, 256, 128]
    assert set(config.RECIPES["instance"].items()) == set(norms.SHARED_RECIPE.items())
    assert devices.BF16_NORMS == ("group", "layer")  # the measured ones; new norms stay fp32
    assert plots.NORM_COLORS["batch"] == "tab:blue" and len(set(plots.NORM_COLORS.values())) == 6
    assert config.BATCH_STATISTICS_NORMS == ("batch",)
    assert type(make_norm("batch", 8, groups=4)) is nn.BatchNorm2d  # norm_batch 0: as before


def test_every_per_norm_parameter_has_a_shared_value_and_asks_for_the_recipe_by_default():
    """A key in norms.SHARED_RECIPE without its "per norm" value in config (or the other way
    round) would break the first TrainConfig of every norm, not the entry that added it."""
    assert set(config.PER_NORM_VALUES) == set(norms.SHARED_RECIPE)
    defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    assert {name: defaults[name] for name in config.PER_NORM_VALUES} == config.PER_NORM_VALUES


def test_an_unknown_norm_is_refused_naming_every_registered_one():
    allowed = ", ".join(config.NORMS)
    with pytest.raises(ConfigError, match=f"norm must be one of {allowed} .got 'weight'.$"):
        TrainConfig(norm="weight")
    with pytest.raises(ConfigError, match="norm must be one of"):
        config.parse_norms("batch,weight")


def test_a_recipe_naming_a_parameter_that_is_not_per_norm_is_refused_at_the_entry():
    with pytest.raises(ValueError) as refused:
        norms.Norm("scaled", lambda channels, **_: None, "x", "tab:olive", recipe={"momentum": 0.8})
    assert str(refused.value) == (
        "norm 'scaled': recipe key(s) momentum are not per-norm parameters "
        "(allowed: activation, batch_size, learning_rate, optimizer, pool, translate)"
    )


@pytest.mark.slow  # a subprocess: the registry is read when the modules are imported
def test_a_norm_registered_in_one_place_reaches_help_validation_and_the_report(tmp_path):
    """A throwaway entry added to the registry before the pipeline is imported, as an entry
    typed into pipeline/norms.py is: nothing else is edited."""
    script = textwrap.dedent(
        f"""
        import json
        from torch import nn
        from pipeline import norms

        entry = norms.Norm("scaled", lambda channels, **_: nn.GroupNorm(channels, channels),
                           "a throwaway entry", "tab:olive",
                           recipe={{"batch_size": 64, "learning_rate": 0.05}})
        norms.REGISTRY["scaled"] = entry

        from click.testing import CliRunner
        from pipeline import config, plots, report
        from pipeline.cli import cli
        from pipeline.engine import EpochMetrics
        from pipeline.model import Net

        help_text = CliRunner().invoke(cli, ["train", "--help"], terminal_width=200).output
        main_help = CliRunner().invoke(cli, ["main", "--help"], terminal_width=200).output
        try:
            config.TrainConfig(norm="bogus")
        except config.ConfigError as error:
            refused = str(error)
        trained = config.TrainConfig(norm="scaled")
        rows, histories = [], {{}}
        for norm in ("scaled", "batch"):
            rows.append(report.RunRecord(run_id=norm, run_name="train-" + norm,
                                         tags={{"step": "train"}},
                                         params={{"norm": norm, "seed": "1"}}))
            histories[norm] = [EpochMetrics(1, 1.0, 0.5, 1.0, 0.5, 0.1, 1.0, 1.0, 0.5)]
        study = report.build_study(rows, histories)
        path = report.write_report(study, __import__("pathlib").Path({str(tmp_path)!r}))
        print(json.dumps({{
            "help": " ".join(help_text.split()),
            "main_help": " ".join(main_help.split()),
            "refused": refused,
            "batch_size": trained.batch_size,
            "learning_rate": trained.learning_rate,
            "params": sum(p.numel() for p in Net(norm="scaled").parameters()),
            "norms": study.norms,
            "report": path.read_text(),
            "color": plots.NORM_COLORS["scaled"],
        }}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert "scaled: a throwaway entry" in found["help"]
    assert "scaled 64" in found["help"]  # its recipe, in --batch-size's help
    assert "frn 0.2, scaled 0.05)" in found["help"]  # and in --learning-rate's
    assert "frn, scaled (the default study: batch, group, layer)" in found["main_help"]
    assert found["refused"].endswith("none, frn, scaled (got 'bogus')")
    assert found["batch_size"] == 64 and found["learning_rate"] == 0.05
    assert found["params"] <= MAX_PARAMETERS
    assert found["norms"] == ["batch", "scaled"]  # registry order in the report
    assert "| scaled |" in found["report"] and found["color"] == "tab:olive"


# --------------------------------------------------------------------------- ghost batches


def test_norm_batch_equal_to_the_batch_is_batch_norm_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    ghost, plain = GhostBatchNorm2d(6, norm_batch=8), nn.BatchNorm2d(6)
    _random_affine(ghost, generator)
    plain.load_state_dict(ghost.state_dict())
    for _ in range(3):
        x = torch.randn(8, 6, 5, 5, generator=generator)
        assert torch.equal(ghost(x), plain(x))
    for name, buffer in plain.state_dict().items():
        assert torch.equal(ghost.state_dict()[name], buffer), name
    ghost.eval(), plain.eval()
    x = torch.randn(3, 6, 5, 5, generator=generator)
    assert torch.equal(ghost(x), plain(x))


def test_each_ghost_batch_is_normalized_by_its_own_statistics():
    generator = torch.Generator().manual_seed(1)
    ghost = GhostBatchNorm2d(3, norm_batch=2)
    _random_affine(ghost, generator)
    x = 2 + 3 * torch.randn(8, 3, 4, 4, generator=generator)  # (B, C, H, W), 4 groups of 2
    expected = []
    means, variances = [], []
    for group in x.split(2):
        mean = group.mean(dim=(0, 2, 3))
        var = ((group - mean[:, None, None]) ** 2).mean(dim=(0, 2, 3))  # biased
        normalized = (group - mean[:, None, None]) / torch.sqrt(var[:, None, None] + ghost.eps)
        expected.append(normalized * ghost.weight[:, None, None] + ghost.bias[:, None, None])
        means.append(mean)
        variances.append(var * 32 / 31)  # unbiased: 2 images x 4 x 4 positions
    out = ghost(x)
    assert torch.allclose(out, torch.cat(expected), atol=1e-5)
    assert not torch.allclose(out, nn.functional.batch_norm(x, None, None, training=True))
    # Running statistics: BatchNorm2d's momentum towards the mean over the groups.
    assert torch.allclose(ghost.running_mean, 0.1 * torch.stack(means).mean(0), atol=1e-6)
    assert torch.allclose(ghost.running_var, 0.9 + 0.1 * torch.stack(variances).mean(0), atol=1e-5)
    assert int(ghost.num_batches_tracked) == 1
    # Evaluation uses them exactly as BatchNorm2d does, whatever the batch.
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(ghost.state_dict())
    ghost.eval(), plain.eval()
    y = torch.randn(5, 3, 4, 4, generator=generator)
    assert torch.equal(ghost(y), plain(y))


def test_ghost_batches_backpropagate_as_their_formula():
    """The fused kernel's gradients (input, scale, shift) are those of the formula, by autograd."""
    generator = torch.Generator().manual_seed(2)
    ghost = GhostBatchNorm2d(3, norm_batch=4)
    _random_affine(ghost, generator)
    x = (1 + 2 * torch.randn(12, 3, 5, 5, generator=generator)).requires_grad_()
    projection = torch.randn(12, 3, 5, 5, generator=generator)

    def by_formula(x: torch.Tensor) -> torch.Tensor:
        groups = x.reshape(3, 4, 3, 5, 5)
        mean = groups.mean(dim=(1, 3, 4), keepdim=True)
        var = ((groups - mean) ** 2).mean(dim=(1, 3, 4), keepdim=True)
        normalized = ((groups - mean) / torch.sqrt(var + ghost.eps)).reshape(x.shape)
        return normalized * ghost.weight[:, None, None] + ghost.bias[:, None, None]

    parameters = (x, ghost.weight, ghost.bias)
    fused = torch.autograd.grad((ghost(x) * projection).sum(), parameters)
    expected = torch.autograd.grad((by_formula(x) * projection).sum(), parameters)
    for got, want in zip(fused, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_ghost_batches_keep_a_channels_last_input_channels_last():
    """The CPU trains channels_last: the output stays in it (the in-place activation after the
    norm runs its fast kernel on a tensor of its own, not a copy's view), with the values,
    gradients and running statistics of the same batch in NCHW."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(8, 5, 6, 6, generator=generator)
    projection = torch.randn(8, 5, 6, 6, generator=generator)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        ghost = GhostBatchNorm2d(5, norm_batch=2)
        _random_affine(ghost, torch.Generator().manual_seed(4))
        images = x.to(memory_format=layout).requires_grad_()
        out = ghost(images)
        assert out.is_contiguous(memory_format=layout)
        assert out._base is None  # not a view
        gradients = torch.autograd.grad((out * projection).sum(), (images, ghost.weight))
        results.append((out, *gradients, ghost.running_mean, ghost.running_var))
    for nchw, channels_last in zip(*results, strict=True):
        assert torch.allclose(nchw, channels_last, atol=1e-5, rtol=1e-5)


def test_ghost_batches_train_a_model_and_keep_its_checkpoint_keys():
    torch.manual_seed(0)
    model = Net(norm="batch", norm_batch=4)
    assert isinstance(model.C2.norm, GhostBatchNorm2d) and model.C2.norm.norm_batch == 4
    assert model.state_dict().keys() == Net(norm="batch").state_dict().keys()
    assert count_parameters(model) == count_parameters(Net(norm="batch"))
    _one_training_step(model)
    with pytest.raises(ConfigError, match="a batch of 6 images does not split into groups of"):
        model.train()(torch.randn(6, 3, 32, 32))


BAD_NORM_BATCH = [
    ({"norm_batch": -2}, r"norm_batch must be 0 \(the whole batch\) or between 1 and 8192 .got -2"),
    ({"norm_batch": 48}, "norm_batch must divide batch_size 128 into equal groups .got 48."),
    ({"norm_batch": 256}, "norm_batch must divide batch_size 128 into equal groups .got 256."),
    (
        {"norm": "group", "norm_batch": 4},
        r"norm_batch needs a norm with batch statistics \(batch\); got norm=group$",
    ),
    ({"norm": "none", "norm_batch": 4}, "norm_batch needs a norm with batch statistics"),
]


@pytest.mark.parametrize(("options", "message"), BAD_NORM_BATCH)
def test_bad_norm_batch_is_refused_in_one_line(options, message):
    with pytest.raises(ConfigError, match=message) as error:
        TrainConfig(**options)
    assert "\n" not in str(error.value)


def test_norm_batch_resolves_against_the_norms_recipe_and_is_logged():
    trained = TrainConfig(norm="batch", norm_batch=32)
    assert trained.batch_size == 128 and trained.as_params()["norm_batch"] == "32"
    assert TrainConfig().as_params()["norm_batch"] == "0"
    assert TrainConfig(batch_size=96, norm_batch=32).model_options()["norm_batch"] == 32


# --------------------------------------------------------------------------- the new norms


def test_instance_norm_normalizes_each_image_and_channel_on_its_own():
    generator = torch.Generator().manual_seed(2)
    layer = make_norm("instance", 4, groups=2)  # groups does not apply
    _random_affine(layer, generator)
    x = 1 + 2 * torch.randn(3, 4, 5, 5, generator=generator)
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = x.var(dim=(2, 3), keepdim=True, unbiased=False)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * layer.weight[:, None, None]
    expected = expected + layer.bias[:, None, None]
    out = layer(x)
    assert out.shape == x.shape and torch.allclose(out, expected, atol=1e-5)
    assert count_parameters(layer) == 2 * 4


def test_filter_response_norm_and_tlu_follow_the_papers_formula():
    generator = torch.Generator().manual_seed(3)
    layer = make_norm("frn", 4, groups=4)
    assert isinstance(layer, FilterResponseNorm2d) and layer.eps == 1e-6
    assert count_parameters(layer) == 3 * 4  # gamma, beta, tau per channel
    assert all(p.ndim == 1 for p in layer.parameters())  # no weight decay, no Muon on them
    _random_affine(layer, generator)
    x = 1 + 2 * torch.randn(3, 4, 5, 5, generator=generator)
    nu2 = (x**2).mean(dim=(2, 3), keepdim=True)
    gamma, beta, tau = (p.view(1, 4, 1, 1) for p in (layer.weight, layer.bias, layer.tau))
    expected = torch.max(gamma * x / torch.sqrt(nu2 + 1e-6) + beta, tau)
    out = layer(x)
    assert out.shape == x.shape and torch.allclose(out, expected, atol=1e-5)
    assert (out == tau.expand_as(out)).any()  # the threshold bites somewhere
    # Its gradients (input, gamma, beta, tau) are autograd's through the formula.
    x.requires_grad_()
    grad = torch.randn(x.shape, generator=generator)
    params = [x, layer.weight, layer.bias, layer.tau]
    reference = torch.max(gamma * x / torch.sqrt((x**2).mean((2, 3), True) + 1e-6) + beta, tau)
    for got, want in zip(
        torch.autograd.grad(layer(x), params, grad),
        torch.autograd.grad(reference, params, grad),
        strict=True,
    ):
        assert torch.allclose(got, want, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x.bfloat16()).dtype == torch.float32
    # Its TLU is the block's activation: no ReLU after it.
    assert list(dict(Net(norm="frn").C2.named_children())) == ["conv", "norm"]
    with pytest.raises(ConfigError, match="activation does not apply to norm=frn"):
        TrainConfig(norm="frn", activation="silu")


def test_no_norm_gives_the_convs_a_bias_and_he_init():
    torch.manual_seed(0)
    model = Net(norm="none")
    block = model.C4
    assert type(block.norm) is nn.Identity and type(block.conv) is nn.Conv2d
    assert block.conv.bias is not None and torch.equal(block.conv.bias, torch.zeros(32))
    fan_in = block.conv.weight[0].numel()
    assert block.conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.1)
    assert Net(norm="batch").C4.conv.bias is None  # a norm's shift makes the bias redundant
    # He init keeps the activations' scale through the ten un-normalized layers.
    model.eval()
    features = nn.Sequential(*list(model.children())[:-3])(torch.randn(8, 3, 32, 32))
    assert 0.1 < features.std().item() < 10


@pytest.mark.parametrize("norm", NEW_NORMS)
def test_each_new_norm_trains_one_step_on_the_cpu(norm):
    torch.manual_seed(0)
    model = Net(norm=norm)
    assert count_parameters(model) <= MAX_PARAMETERS
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    _one_training_step(model)


def _one_training_step(model: nn.Module) -> None:
    """One SGD step on 8 random images: a finite loss, a gradient for every parameter, and
    parameters that moved."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (8,), generator=generator)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
