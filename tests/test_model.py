import pytest
import torch
from conftest import VAL_SIZE
from torch import nn

from pipeline.config import MAX_EPOCHS, NORMS, ConfigError, TrainConfig
from pipeline.model import (
    LAYER_PLAN,
    MAX_PARAMETERS,
    Net,
    count_parameters,
    receptive_fields,
    summary,
    whitening_filters,
)

VARIANTS = [
    ("batch", 4),
    ("group", 2),
    ("group", 4),
    ("group", 8),
    ("layer", 1),
    ("instance", 4),
    ("none", 4),
    ("frn", 4),
]


def test_the_variants_cover_every_registered_norm():
    assert {norm for norm, _ in VARIANTS} == set(NORMS)


@pytest.mark.parametrize("norm", NORMS)
def test_every_option_combination_of_every_norm_stays_within_the_budget(norm):
    """Every combination of the options that build the model at their default widths (the
    activation and the pool cost no parameter: tested below); `norm_batch` for batch norm."""
    counts = set()
    for order in ("norm-act", "act-norm"):
        for standardize in (None, True, False):
            for residual in (False, True):
                for conv_groups in (1, 2, 4):
                    for whiten in (False, True):
                        for norm_batch in (0, 4) if norm == "batch" else (0,):
                            model = Net(
                                norm=norm,
                                order=order,
                                standardize=standardize,
                                residual=residual,
                                conv_groups=conv_groups,
                                whiten=whiten,
                                norm_batch=norm_batch,
                            )
                            counts.add(count_parameters(model))
    assert max(counts) <= MAX_PARAMETERS


@pytest.mark.parametrize(("norm", "groups"), VARIANTS)
def test_every_variant_stays_under_the_parameter_budget(norm, groups):
    model = Net(norm=norm, groups=groups)
    counted = count_parameters(model)
    # Counted independently of the helper: every tensor in the state that requires grad.
    assert counted == sum(p.numel() for _, p in model.named_parameters())
    assert 40_000 < counted <= MAX_PARAMETERS


@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("activation", ["relu", "silu", "gelu", "mish"])
@pytest.mark.parametrize(("norm", "groups"), VARIANTS)
def test_every_activation_and_pool_costs_no_parameter_and_keeps_the_plan(
    norm, groups, activation, pool
):
    model = Net(norm=norm, groups=groups, activation=activation, pool=pool)
    assert count_parameters(model) == count_parameters(Net(norm=norm, groups=groups))
    assert count_parameters(model) <= MAX_PARAMETERS
    own = ["conv", "norm"] if norm == "frn" else ["conv", "norm", activation]  # frn: its TLU
    assert list(dict(model.C2.named_children())) == own
    pools = (model.P1, model.P2)
    assert all(type(p) is (nn.AvgPool2d if pool == "avg" else nn.MaxPool2d) for p in pools)
    assert (
        receptive_fields(model)[-3].receptive_field == receptive_fields(Net())[-3].receptive_field
    )
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_activation_and_pool_are_checked_with_the_allowed_values():
    with pytest.raises(ConfigError, match="activation must be one of relu, silu, gelu, mish"):
        TrainConfig(activation="tanh")
    with pytest.raises(ConfigError, match="pool must be one of max, avg .got 'min'."):
        TrainConfig(pool="min")


@pytest.mark.parametrize(("norm", "groups"), VARIANTS)
def test_forward_gives_class_logits(norm, groups):
    logits = Net(norm=norm, groups=groups)(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10)


def test_the_layer_plan_is_kept_in_order_and_each_layer_runs_once():
    model = Net(norm="batch", groups=4)
    names = [name for name, _ in model.named_children() if name in LAYER_PLAN]
    assert tuple(names) == LAYER_PLAN
    calls = []
    for name, module in model.named_children():
        module.register_forward_hook(lambda *_, name=name: calls.append(name))
    model(torch.randn(2, 3, 32, 32))
    assert [c for c in calls if c in LAYER_PLAN] == list(LAYER_PLAN)
    convs = {
        name: [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        for name, module in model.named_children()
    }
    for name in LAYER_PLAN:
        expected = {"C": (3, 3), "c": (1, 1)}.get(name[0])
        if expected:
            assert len(convs[name]) == 1 and convs[name][0].kernel_size == expected, name
        else:
            assert convs[name] == [], name


def _measured_receptive_field(model, upto):
    """Measure the receptive field by back-propagating from one output unit through the
    model's convolutions and pools (norms dropped: their statistics span the whole map)."""
    layers = []
    for name, module in model.named_children():
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d):
                probe = nn.Conv2d(
                    1, 1, layer.kernel_size, padding=layer.padding, stride=layer.stride, bias=False
                )
                nn.init.constant_(probe.weight, 1.0)
                layers.append(probe)
            elif isinstance(layer, nn.MaxPool2d):
                # Same geometry as the max-pool, but its gradient reaches every input.
                layers.append(nn.AvgPool2d(layer.kernel_size, layer.stride))
        if name == upto:
            break
    image = torch.ones(1, 1, 64, 64, requires_grad=True)  # big enough to avoid the border
    out = nn.Sequential(*layers)(image)
    out[0, 0, out.shape[2] // 2, out.shape[3] // 2].backward()
    rows = image.grad[0, 0].abs().sum(dim=1).nonzero()
    return int(rows.max() - rows.min() + 1)


@pytest.mark.parametrize("layer", ["C1", "C2", "P1", "C5", "P2", "C8", "C9"])
def test_receptive_field_matches_a_gradient_measurement(layer):
    model = Net(norm="batch", groups=4)
    computed = {row.layer: row.receptive_field for row in receptive_fields(model)}
    assert computed[layer] == _measured_receptive_field(model, layer)


def test_receptive_field_grows_and_gap_sees_the_whole_image():
    rows = receptive_fields(Net(norm="layer", groups=1))
    fields = [row.receptive_field for row in rows]
    assert fields == sorted(fields)
    gap = next(row for row in rows if row.layer == "GAP")
    assert gap.receptive_field >= 32 and gap.output_size == 1


def test_groups_that_do_not_divide_a_layer_are_rejected_naming_it():
    with pytest.raises(ConfigError, match=r"C1 has 16 channels \(got groups=5"):
        Net(norm="group", groups=5)
    with pytest.raises(ConfigError, match="groups=0"):
        Net(norm="group", groups=0)
    with pytest.raises(ConfigError, match="norm must be one of batch, group, layer, instance"):
        Net(norm="weight", groups=1)


def test_summary_lists_each_layer_and_the_total():
    model = Net(norm="group", groups=4)
    text = summary(model)
    for name in LAYER_PLAN:
        assert f"\n{name}" in text
    assert f"{count_parameters(model):,}" in text


def test_relu_before_norm_swaps_only_the_order():
    model = Net(norm="group", groups=4, order="act-norm")
    assert [name for name, _ in model.C4.named_children()] == ["conv", "relu", "norm"]
    assert count_parameters(model) == count_parameters(Net(norm="group", groups=4))
    with pytest.raises(ConfigError, match="order must be one of norm-act, act-norm"):
        Net(norm="batch", order="sideways")


@pytest.mark.parametrize("norm", NORMS)
def test_whitening_c1_decorrelates_patches_without_changing_the_budget(norm):
    torch.manual_seed(0)
    # Neighbouring pixels correlated, as in natural images.
    images = nn.functional.avg_pool2d(torch.randn(64, 3, 34, 34), 3, stride=1)
    plain, whitened = Net(norm=norm), Net(norm=norm, whiten=True)
    assert count_parameters(whitened) == count_parameters(plain)
    assert type(whitened.C1.conv) is nn.Conv2d  # no weight standardization on C1
    assert type(whitened.C2.conv) is type(plain.C2.conv)
    whitened.init_whitening(images)
    out = nn.functional.conv2d(images, whitened.C1.conv.weight)
    channels = whitened.C1.conv.out_channels
    features = out.permute(0, 2, 3, 1).reshape(-1, channels)
    half = features[:, : channels // 2]  # the other half are their negatives
    covariance = torch.cov(half.T)
    assert torch.allclose(covariance.diagonal(), torch.ones(channels // 2), atol=0.02)
    assert (covariance - torch.diag(covariance.diagonal())).abs().max() < 0.02
    assert torch.allclose(features[:, channels // 2 :], -half)


def test_whitening_needs_enough_patch_dimensions():
    with pytest.raises(ConfigError, match="C1 has 64 channels"):
        whitening_filters(torch.randn(8, 3, 8, 8), 64)


def test_train_setup_whitens_c1_from_the_training_images(image_folder):
    from pipeline import training

    config = TrainConfig(
        norm="layer", whiten=True, data=str(image_folder), device="cpu", val_size=VAL_SIZE
    )
    setup = training.prepare_training(config)
    images = setup.splits.normalize(setup.splits.train.images[: training.WHITENING_IMAGES])
    expected = whitening_filters(images, setup.model.C1.conv.out_channels)
    assert torch.allclose(setup.model.C1.conv.weight, expected.float())
    plain = training.prepare_training(
        TrainConfig(norm="layer", data=str(image_folder), val_size=VAL_SIZE)
    )
    assert not torch.allclose(plain.model.C1.conv.weight, expected.float())


def test_trainings_past_the_budget_are_measurements_never_registered():
    assert TrainConfig(norm="group").registered_model == "cifar10-group"
    assert not TrainConfig(epochs=MAX_EPOCHS).beyond_budget
    ceiling = TrainConfig(norm="group", epochs=100)
    assert ceiling.beyond_budget and ceiling.registered_model == ""
    assert ceiling.as_params()["registered_model"] == ""


def test_residual_adds_each_block_input_where_channels_match_and_no_parameter():
    plain, residual = Net(norm="batch"), Net(norm="batch", residual=True)
    assert count_parameters(residual) == count_parameters(plain)
    adding = [name for name, module in residual.named_children() if getattr(module, "residual", 0)]
    assert adding == ["C5", "C8", "C9"]  # C4->C5, C7->C8->C9 at the default widths
    residual.eval()
    x = torch.randn(2, 32, 8, 8)
    block = residual.C8
    assert torch.allclose(block(x), x + nn.Sequential(*block.children())(x))
    assert Net(norm="batch", residual=True, widths={"C4": 24}).C4.residual  # C3 -> C4 now


def test_grouped_convs_split_c2_to_c9_and_free_parameters():
    dense, grouped = Net(norm="layer"), Net(norm="layer", conv_groups=4)
    assert grouped.C1.conv.groups == 1 and grouped.c3.conv.groups == 1
    assert all(getattr(grouped, name).conv.groups == 4 for name in ("C2", "C5", "C9"))
    assert count_parameters(grouped) < count_parameters(dense) * 0.5
    assert grouped(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="C2 has 16 in, 24 out .got conv_groups=3."):
        Net(norm="batch", conv_groups=3)


def test_group_norm_runs_in_fp32_under_bf16_autocast_and_is_group_norm_otherwise():
    model = Net(norm="group", groups=4)
    norm = model.C2.norm
    reference = nn.GroupNorm(4, 24)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(2, 24, 8, 8).to(memory_format=torch.channels_last)
    assert torch.equal(norm(x), reference(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x.bfloat16())
    assert y.dtype == torch.float32
    assert torch.allclose(y, reference(x.bfloat16().float()), atol=1e-5)
    assert type(Net(norm="layer").C2.norm) is nn.GroupNorm  # its bf16 kernel is fast
