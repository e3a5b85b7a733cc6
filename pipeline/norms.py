"""The normalizations: their layers and one registry entry per norm, which everything else reads.

An entry names the norm, builds its layer, and says what the rest of the pipeline needs to know
about it: whether the convs before it are weight-standardized by default, its recipe (the
values `config.RECIPES` resolves a "per norm" parameter to), whether bf16 autocast holds its
accuracy (`device.BF16_NORMS`), its colour in the report's figures (`plots.NORM_COLORS`), and
whether it has batch statistics (`norm_batch` applies). `--help`, validation, the report and
the plots read this table, so a new norm is its layer and one entry here
(docs/normalizations.md#adding-a-normalization).

The bottom of the package with `errors`: it imports torch and, of the pipeline, only `errors`, so
`config` validates against it and `model` builds from it without a cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.errors import ConfigError

# (channels, *, groups, norm_batch) -> the layer normalizing `channels` feature maps.
Factory = Callable[..., nn.Module]


# What a norm trains with where its entry says nothing of a per-norm parameter: a new norm takes
# these until a sweep of its own on the validation split says otherwise.
SHARED_RECIPE: dict[str, int | float | str] = {
    "activation": "relu",
    "batch_size": 128,
    "learning_rate": 0.2,
    "optimizer": "sgd",
    "pool": "max",
    "translate": 4,
}


@dataclass(frozen=True)
class Norm:
    """One normalization and what the pipeline needs to know about it."""

    name: str
    build: Factory
    description: str  # one line, for --help and docs: what the statistics are taken over
    color: str  # matplotlib colour of its lines and bars in the report
    standardize: bool = True  # weight-standardized convs unless `standardize` says otherwise
    # Its own values of the per-norm parameters (config.RECIPES); the rest are SHARED_RECIPE's.
    recipe: dict[str, int | float | str] = field(default_factory=dict)
    bf16: bool = False  # bf16 autocast measured to hold its accuracy (precision=auto)
    batch_statistics: bool = False  # normalizes with statistics over images of the batch
    groups: bool = False  # the `groups` parameter means something for it
    shift: bool = True  # has a learned per-channel shift, so the convs before it need no bias
    he_init: bool = False  # convs start from He (Kaiming) normal weights instead of torch's
    activation: bool = True  # the block adds `activation` after it; False: it has its own
    cuda_channels_last: bool = False  # channels_last measured faster on CUDA (else NCHW)
    in_default_study: bool = False  # trained by `main` and `sweep` unless `norm` says otherwise

    def __post_init__(self) -> None:
        # A recipe holds per-norm parameters only: anything else would reach the first
        # TrainConfig as a bare KeyError, far from the entry that caused it.
        unknown = sorted(set(self.recipe) - set(SHARED_RECIPE))
        if unknown:
            raise ValueError(
                f"norm {self.name!r}: recipe key(s) {', '.join(unknown)} are not per-norm "
                f"parameters (allowed: {', '.join(SHARED_RECIPE)})"
            )


# --------------------------------------------------------------------------- layers


class FloatGroupNorm(nn.GroupNorm):
    """GroupNorm computed in fp32, also under bf16 autocast.

    The CPU's bf16 GroupNorm kernel with more than one group is slow in channels_last, the
    layout the convs want: 6.5x its NCHW time on an AVX-512 CPU with native bf16, enough to make
    a bf16 step slower than an fp32 one. Normalizing in fp32 (the next conv casts back to bf16)
    makes group norm's bf16 ceiling 1.14x its fp32 one there (docs/speed.md, the benchmark's
    group norm kernels). In fp32 runs it is GroupNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.group_norm(
            x.float(), self.num_groups, self.weight, self.bias, self.eps
        )


class GhostBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose training statistics are taken over groups of `norm_batch` images.

    The batch `(B, C, H, W)` splits into B / norm_batch consecutive groups; each group is
    normalized by its own per-channel mean and (biased) variance, as each of Wu & He's 8 GPUs
    normalized its own images (Group Normalization, 2018). The running statistics move, with
    BatchNorm2d's momentum, towards the mean over the groups of each group's mean and of each
    group's unbiased variance (n = norm_batch * H * W), so evaluation, which uses them exactly
    as BatchNorm2d does, sees the within-group scale the training normalized with. A batch of
    one group is BatchNorm2d itself.
    """

    def __init__(self, num_features: int, *, norm_batch: int, **options) -> None:
        super().__init__(num_features, **options)
        if norm_batch < 1:
            raise ConfigError(f"norm_batch must be >= 1 for ghost batches (got {norm_batch})")
        self.norm_batch = norm_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        if not self.training or batch == self.norm_batch:
            return super().forward(x)
        if batch % self.norm_batch:
            raise ConfigError(
                f"a batch of {batch} images does not split into groups of "
                f"norm_batch={self.norm_batch}"
            )
        # Torch's fused batch norm on each group in turn: `split` gives views, no copies, in x's
        # layout, and `cat` one fresh output in it, so the in-place activation, pooling and
        # convolution after it run their channels_last kernels. A training step on the CPU
        # costs 1.1-1.2x one over the whole batch; the groups side by side as channels in one
        # call, copied back, cost 1.9-2.0x (docs/speed.md).
        groups, channels = batch // self.norm_batch, x.shape[1]
        # Scratch running statistics with momentum 1: the kernel leaves in row k group k's
        # mean and unbiased variance, the ones the running statistics move towards.
        group_mean = x.new_zeros((groups, channels), dtype=torch.float32)
        group_var = x.new_ones((groups, channels), dtype=torch.float32)
        tracked = self.track_running_stats
        out = torch.cat(
            [
                nn.functional.batch_norm(
                    images.float(),
                    group_mean[k] if tracked else None,
                    group_var[k] if tracked else None,
                    self.weight,
                    self.bias,
                    training=True,
                    momentum=1.0,
                    eps=self.eps,
                )
                for k, images in enumerate(x.split(self.norm_batch))
            ]
        )
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum
                if momentum is None:  # a cumulative average, as BatchNorm2d's
                    momentum = 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(group_mean.mean(dim=0), momentum)
                self.running_var.lerp_(group_var.mean(dim=0), momentum)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, norm_batch={self.norm_batch}"


class FilterResponseNorm2d(nn.Module):
    """Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan, 2020).

    Per image and channel, no mean subtracted and no batch statistics:
    nu2 = mean over (H, W) of x^2;  y = gamma * x / sqrt(nu2 + eps) + beta;  z = max(y, tau).
    gamma, beta and tau are learned per channel (ones, zeros, zeros at the start); eps is the
    paper's 1e-6. The TLU is the block's activation (norms.Norm.activation is False).
    """

    def __init__(self, channels: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        # (C,) tensors, like every norm's: weight decay and Muon leave 1-d parameters alone.
        self.weight = nn.Parameter(torch.ones(channels))  # gamma
        self.bias = nn.Parameter(torch.zeros(channels))  # beta
        self.tau = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # the mean of squares in fp32, also under bf16 autocast
        nu2 = x.square().mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        scale = torch.rsqrt(nu2 + self.eps) * self.weight[:, None, None]
        tau = self.tau[:, None, None]
        # max(y, tau) as relu(y - tau) + tau, y - tau = x * scale + (beta - tau): the same TLU
        # in one multiply-add and a ReLU; torch.maximum's backward against a broadcast tau made
        # the layer ~3x slower on CPU (docs/speed.md#filter-response-norm-kernels).
        return torch.relu(torch.addcmul(self.bias[:, None, None] - tau, x, scale)) + tau

    def extra_repr(self) -> str:
        return f"{len(self.weight)}, eps={self.eps}"


# --------------------------------------------------------------------------- factories


def _batch(channels: int, *, groups: int, norm_batch: int) -> nn.Module:
    if norm_batch == 0:  # the whole batch: plain BatchNorm2d, the module runs logged before
        return nn.BatchNorm2d(channels)
    return GhostBatchNorm2d(channels, norm_batch=norm_batch)


def _group(channels: int, *, groups: int, norm_batch: int) -> nn.Module:
    return FloatGroupNorm(groups, channels)


def _layer(channels: int, *, groups: int, norm_batch: int) -> nn.Module:
    return nn.GroupNorm(1, channels)  # one group: its bf16 kernel is fast


def _instance(channels: int, *, groups: int, norm_batch: int) -> nn.Module:
    return FloatGroupNorm(channels, channels)  # one channel per group, affine per channel


def _none(channels: int, *, groups: int, norm_batch: int) -> nn.Module:
    return nn.Identity()


def _frn(channels: int, *, groups: int, norm_batch: int) -> nn.Module:
    return FilterResponseNorm2d(channels)


ENTRIES = (
    Norm(
        "batch",
        _batch,
        "statistics over the batch's images (or groups of norm_batch of them)",
        "tab:blue",
        standardize=False,
        # Muon gained +1.36 +- 0.19 validation points over SGD, paired over 3 seeds, every seed
        # gaining (docs/history.md#third-round-muon-the-activation-and-the-pooling); SiLU +0.62
        # +- 0.12 over ReLU on top of Muon, 3 seeds; average pooling at P1/P2 +0.53 +- 0.02
        # over max pooling on top of SiLU, 3 seeds (docs/history.md#round-4-pooling).
        recipe={"optimizer": "muon", "activation": "silu", "pool": "avg"},
        batch_statistics=True,
        cuda_channels_last=True,
        in_default_study=True,
    ),
    Norm(
        "group",
        _group,
        "statistics per image over groups of channels",
        "tab:orange",
        # Batch 128 did not clear the adoption rule over 256 on the validation split (+0.75 +-
        # 0.52 points, 3 seeds): group norm keeps batch 256. Muon gained +1.97 +- 0.51
        # validation points over SGD at batch 256, paired over 3 seeds; SiLU +0.75 +- 0.14 over
        # ReLU on top of Muon, 3 seeds; average pooling at P1/P2 +0.89 +- 0.16 over max pooling on
        # top of SiLU, 3 seeds (docs/history.md#round-4-pooling); a shift of up to 2 pixels
        # +0.63 +- 0.21 over 4 on top of average pooling, 3 seeds (docs/history.md#round-4-
        # translate-2-for-group-norm).
        recipe={
            "batch_size": 256,
            "optimizer": "muon",
            "activation": "silu",
            "pool": "avg",
            "translate": 2,
        },
        bf16=True,
        groups=True,
        in_default_study=True,
    ),
    Norm(
        "layer",
        _layer,
        "statistics per image over all channels",
        "tab:green",
        # Muon gained +1.55 +- 0.26 validation points over SGD, paired over 3 seeds; average
        # pooling at P1/P2 +0.58 +- 0.18 over max pooling on top of Muon, 3 seeds.
        recipe={"optimizer": "muon", "pool": "avg"},
        bf16=True,
        in_default_study=True,
    ),
    Norm("instance", _instance, "statistics per image and channel", "tab:red"),
    # Peak learning rate 0.05: at the shared 0.2 seed 3 ended at chance (a collapse to one
    # class); 0.05 trained on all 3 seeds and was not behind on the two where both trained
    # (74.95 against 51.29 validation mean, the lever table's rule: docs/normalizations.md).
    # He init keeps the activations' scale through ten un-normalized ReLU layers, where
    # torch's default init shrinks it ~6x per layer.
    Norm(
        "none",
        _none,
        "no normalization (biased convs, He init)",
        "tab:gray",
        recipe={"learning_rate": 0.05},
        standardize=False,
        shift=False,
        he_init=True,
    ),
    # As published (Singh & Krishnan, 2020): FRN with its TLU in place of norm + ReLU, on
    # plain convs.
    Norm(
        "frn",
        _frn,
        "filter response norm + TLU: per image and channel, no mean subtracted",
        "tab:purple",
        standardize=False,
        activation=False,
    ),
)
REGISTRY: dict[str, Norm] = {entry.name: entry for entry in ENTRIES}


def get(name: str) -> Norm:
    """The registry entry of `name` (config.check_choice has validated it)."""
    return REGISTRY[name]
