"""The layer plan `C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 C9 GAP c10`, the norm factory, the
parameter count and the receptive field (computed from the modules, not typed in)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import (
    ACTIVATIONS,
    BATCH_STATISTICS_NORMS,
    NORMS,
    ORDERS,
    POOLS,
    ConfigError,
    check_choice,
)
from pipeline.norms import get as norm_entry

# C = 3x3 conv, c = 1x1 conv, P = 2x2 pool (max by default), GAP = global average pool; each
# used once.
LAYER_PLAN = ("C1", "C2", "c3", "P1", "C3", "C4", "C5", "c6", "P2", "C7", "C8", "C9", "GAP", "c10")
MAX_PARAMETERS = 50_000
NUM_CLASSES = 10
# The 3x3 layers that `conv_groups` splits, and where `residual` may add a block's input: every
# C layer but C1, whose input is the image's 3 channels.
GROUPED_LAYERS = ("C2", "C3", "C4", "C5", "C7", "C8", "C9")

# Output channels per conv. Parameters go where resolution is low (8x8 costs a sixteenth of the
# compute of 32x32 per weight), compute where it buys accuracy: the ablation in docs/history.md.
WIDTHS = {
    "C1": 16,
    "C2": 24,
    "c3": 16,
    "C3": 24,
    "C4": 32,
    "C5": 32,
    "c6": 16,
    "C7": 32,
    "C8": 32,
    "C9": 32,
    "c10": NUM_CLASSES,
}


class WSConv2d(nn.Conv2d):
    """Conv with weight standardization: each filter is re-centred and scaled to unit variance.

    With GroupNorm/LayerNorm it smooths the loss landscape the way BatchNorm does
    (Qiao et al., 2019), which closes much of their gap to BatchNorm in small-batch training.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        mean = weight.mean(dim=(1, 2, 3), keepdim=True)
        var = weight.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        weight = (weight - mean) * torch.rsqrt(var + 1e-5)
        return self._conv_forward(x, weight, self.bias)


def make_activation(activation: str) -> nn.Module:
    """The non-linearity after (or before, with order=act-norm) each norm: none has a
    parameter, so the choice costs nothing in the 50,000-parameter budget."""
    check_choice("activation", activation, ACTIVATIONS)
    return {
        "relu": lambda: nn.ReLU(inplace=True),
        "silu": lambda: nn.SiLU(inplace=True),
        "gelu": nn.GELU,
        "mish": lambda: nn.Mish(inplace=True),
    }[activation]()


def make_pool(pool: str) -> nn.Module:
    """P1 and P2: 2x2, stride 2, max or average."""
    check_choice("pool", pool, POOLS)
    if pool == "avg":
        return nn.AvgPool2d(kernel_size=2, stride=2)
    return nn.MaxPool2d(kernel_size=2, stride=2)


def make_norm(norm: str, channels: int, *, groups: int, norm_batch: int = 0) -> nn.Module:
    """The normalization layer for `channels` feature maps, built by the norm's registry entry
    (pipeline/norms.py). `groups` must divide `channels` for group norm (`check_groups` checks
    every layer of a model at once); `norm_batch` > 0 takes batch statistics over groups of
    that many images."""
    check_choice("norm", norm, NORMS)
    return norm_entry(norm).build(channels, groups=groups, norm_batch=norm_batch)


def allowed_groups(widths: dict[str, int]) -> list[int]:
    """Group counts that divide the channels of every normalized layer."""
    normalized = [w for name, w in widths.items() if name != "c10"]
    return [g for g in range(1, min(normalized) + 1) if all(w % g == 0 for w in normalized)]


def check_groups(groups: int, widths: dict[str, int]) -> None:
    """Fail naming the first layer whose channels `groups` does not divide, and the counts
    that would do."""
    if groups in allowed_groups(widths):
        return
    layer = next((n for n, w in widths.items() if groups < 1 or w % groups), "C1")
    allowed = ", ".join(map(str, allowed_groups(widths)))
    raise ConfigError(
        f"groups must divide the channels of every layer: {layer} has {widths[layer]} "
        f"channels (got groups={groups}; allowed: {allowed})"
    )


def check_conv_groups(conv_groups: int, widths: dict[str, int]) -> None:
    """Fail naming the first grouped 3x3 layer whose input or output channels `conv_groups`
    does not divide."""
    channels = 3
    for name in LAYER_PLAN:
        if name not in widths or name == "c10":
            continue
        if name in GROUPED_LAYERS and (channels % conv_groups or widths[name] % conv_groups):
            raise ConfigError(
                "conv_groups must divide the input and output channels of C2..C9: "
                f"{name} has {channels} in, {widths[name]} out (got conv_groups={conv_groups})"
            )
        channels = widths[name]


class ConvBlock(nn.Sequential):
    """conv -> norm -> activation (-> dropout), or conv -> activation -> norm with
    order="act-norm"; with `residual`, its input is added to its output (the channels must
    match). The activation module is named after its function (`relu`, `silu`, ...); a norm
    that brings its own (frn's TLU) takes its place. The norm's registry entry says whether the
    conv needs a bias (no norm shift follows it) and how it starts (He init without a norm)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        norm: str,
        groups: int,
        dropout: float,
        standardize: bool,
        order: str = "norm-act",
        residual: bool = False,
        conv_groups: int = 1,
        activation: str = "relu",
        norm_batch: int = 0,
    ) -> None:
        check_choice("order", order, ORDERS)
        entry = norm_entry(norm)
        conv_type = WSConv2d if standardize else nn.Conv2d
        conv = conv_type(
            in_channels,
            out_channels,
            kernel_size,
            padding=kernel_size // 2,
            groups=conv_groups,
            bias=not entry.shift,  # a norm's shift makes a conv bias redundant
        )
        if entry.he_init:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        layers: list[tuple[str, nn.Module]] = [
            ("conv", conv),
            ("norm", make_norm(norm, out_channels, groups=groups, norm_batch=norm_batch)),
        ]
        if entry.activation:
            layers.append((activation, make_activation(activation)))
            if order == "act-norm":
                layers[1], layers[2] = layers[2], layers[1]
        if dropout > 0:
            layers.append(("dropout", nn.Dropout(dropout)))
        super().__init__(OrderedDict(layers))
        if residual and in_channels != out_channels:
            raise ConfigError(
                f"a residual block needs equal channels (got {in_channels} -> {out_channels})"
            )
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return x + out if self.residual else out


def _checked_widths(
    norm: str, widths: dict[str, int], *, groups: int, conv_groups: int, norm_batch: int
) -> dict[str, int]:
    """Every conv's output channels, `widths` over `WIDTHS`, once the norm, its groups, the
    conv groups and `norm_batch` are checked against them."""
    check_choice("norm", norm, NORMS)
    if norm_batch and norm not in BATCH_STATISTICS_NORMS:
        raise ConfigError(
            f"norm_batch needs a norm with batch statistics "
            f"({', '.join(BATCH_STATISTICS_NORMS)}); got norm={norm}"
        )
    unknown = sorted(set(widths) - (set(WIDTHS) - {"c10"}))
    if unknown:
        layers = ", ".join(name for name in WIDTHS if name != "c10")
        raise ConfigError(
            f"widths: {', '.join(unknown)} is not a conv layer whose width can change ({layers})"
        )
    widths = {**WIDTHS, **widths}
    if norm_entry(norm).groups:
        check_groups(groups, widths)
    check_conv_groups(conv_groups, widths)
    return widths


class Net(nn.Sequential):
    """The CIFAR-10 classifier: one module per entry of `LAYER_PLAN`, in order, each used once."""

    def __init__(
        self,
        *,
        norm: str = "batch",
        groups: int = 4,
        dropout: float = 0.0,
        standardize: bool | None = None,
        widths: dict[str, int] | None = None,
        order: str = "norm-act",
        whiten: bool = False,
        residual: bool = False,
        conv_groups: int = 1,
        activation: str = "relu",
        pool: str = "max",
        norm_batch: int = 0,
    ) -> None:
        widths = _checked_widths(
            norm, widths or {}, groups=groups, conv_groups=conv_groups, norm_batch=norm_batch
        )
        if standardize is None:
            standardize = norm_entry(norm).standardize
        block = {
            "norm": norm,
            "groups": groups,
            "dropout": dropout,
            "order": order,
            "activation": activation,
            "norm_batch": norm_batch,
        }
        layers: list[tuple[str, nn.Module]] = []
        channels = 3
        for name in LAYER_PLAN:
            if name.startswith("P"):
                layers.append((name, make_pool(pool)))
            elif name == "GAP":
                layers.append((name, nn.AdaptiveAvgPool2d(1)))
            elif name == "c10":
                # The classifier: a 1x1 conv on the pooled features, with bias and no norm.
                layers.append((name, nn.Conv2d(channels, widths[name], kernel_size=1)))
                channels = widths[name]
            else:
                grouped = name in GROUPED_LAYERS
                conv = ConvBlock(
                    channels,
                    widths[name],
                    3 if name.startswith("C") else 1,
                    # A whitening C1 keeps its filters as set: no standardization.
                    standardize=standardize and not (whiten and name == "C1"),
                    # Where channels match, the block adds its input: no parameter.
                    residual=residual and grouped and channels == widths[name],
                    conv_groups=conv_groups if grouped else 1,
                    **block,
                )
                layers.append((name, conv))
                channels = widths[name]
        layers.append(("flatten", nn.Flatten()))
        super().__init__(OrderedDict(layers))

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor) -> None:
        """Set C1's filters to PCA whitening filters of `images`' patches (normalized images).

        Fast CIFAR-10 training starts from such a layer (Page, 2018; Jordan, 2024): each filter
        projects a patch on one principal component, scaled to unit variance, so the first
        layer sees decorrelated inputs from the first step. The top C1/2 components are used,
        each with its negative, so ReLU passes both signs. The filters stay trainable.
        """
        conv = self.C1.conv
        conv.weight.copy_(whitening_filters(images, conv.out_channels, conv.kernel_size[0]))


class RawImageClassifier(nn.Module):
    """What a registered model serves: uint8 RGB images `(N, 3, 32, 32)`, values 0-255, in;
    class logits `(N, classes)` out. The training split's per-channel mean and std normalise
    inside, with the arithmetic of training's `batches.Normalizer`, so a user needs neither the
    run's stats.json nor this package's preprocessing."""

    takes_raw_images = True  # (a class attribute survives pickling by value: see tracking)

    def __init__(
        self,
        net: nn.Module,
        *,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        classes: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.net = net
        mean_tensor = torch.tensor(mean).view(1, 3, 1, 1)
        std_tensor = torch.tensor(std).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_tensor))
        self.register_buffer("shift", -mean_tensor / std_tensor)
        self.class_names = tuple(classes)  # not `.classes`: cloudpickle would take torch.classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(torch.addcmul(self.shift, images.float(), self.scale))


def whitening_filters(
    images: torch.Tensor, out_channels: int, kernel_size: int = 3, *, eps: float = 5e-4
) -> torch.Tensor:
    """(out_channels, C, k, k) filters from the principal components of k x k patches."""
    patches = nn.functional.unfold(images.float().contiguous(), kernel_size)  # (N, C*k*k, L)
    patches = patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()
    patches = patches - patches.mean(dim=0)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    half = min((out_channels + 1) // 2, len(eigenvalues))
    top = eigenvalues.flip(0)[:half]
    filters = eigenvectors.flip(1)[:, :half].T / torch.sqrt(top + eps)[:, None]
    filters = torch.cat([filters, -filters])
    if len(filters) < out_channels:
        raise ConfigError(
            f"C1 has {out_channels} channels; whitening {kernel_size}x{kernel_size} patches of "
            f"{images.shape[1]} channels gives at most {len(filters)}"
        )
    return filters[:out_channels].reshape(out_channels, images.shape[1], kernel_size, kernel_size)


def count_parameters(model: nn.Module) -> int:
    """Every trainable parameter, norms' affine weights included (buffers excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class LayerField:
    layer: str
    receptive_field: int  # pixels of the input one output unit sees, per side
    jump: int  # input pixels between neighbouring output units
    output_size: int


def receptive_fields(model: nn.Module, *, input_size: int = 32) -> list[LayerField]:
    """Receptive field after each layer of the plan, read off the conv and pool modules."""
    field, jump, size = 1, 1, input_size
    rows = []
    for name, module in model.named_children():
        if name not in LAYER_PLAN:
            continue
        spatial = [
            m for m in module.modules() if isinstance(m, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d)
        ]
        for layer in spatial:
            kernel, stride, dilation, padding = _geometry(layer)
            field += (kernel - 1) * dilation * jump
            size = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
            jump *= stride
        if isinstance(module, nn.AdaptiveAvgPool2d):
            field += (size - 1) * jump  # the average spans every remaining position
            jump *= size
            size = 1
        rows.append(LayerField(name, field, jump, size))
    return rows


def _geometry(layer: nn.Module) -> tuple[int, int, int, int]:
    def first(value) -> int:
        return value[0] if isinstance(value, tuple) else value

    return (
        first(layer.kernel_size),
        first(layer.stride),
        first(getattr(layer, "dilation", 1)),  # average pooling has none
        first(layer.padding),
    )


def summary(model: nn.Module, *, input_size: int = 32) -> str:
    """A per-layer table: output shape, parameters and receptive field."""
    fields = {row.layer: row for row in receptive_fields(model, input_size=input_size)}
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:]))
        )
        for name, module in model.named_children()
    ]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        parameter = next(model.parameters())
        model(torch.zeros(2, 3, input_size, input_size, device=parameter.device))
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    lines = [f"{'layer':<8}{'output':>16}{'params':>10}{'RF':>6}", "-" * 40]
    for name, module in model.named_children():
        if name not in fields:
            continue
        params = sum(p.numel() for p in module.parameters())
        shape = "x".join(map(str, shapes.get(name, ())))
        lines.append(f"{name:<8}{shape:>16}{params:>10,}{fields[name].receptive_field:>6}")
    lines.append("-" * 40)
    lines.append(f"{'total':<8}{'':>16}{count_parameters(model):>10,}")
    return "\n".join(lines)
