"""The normalizations: one registry entry per norm, and everything else reads it.

An entry names the norm, builds its layer, and says what the rest of the pipeline needs to know
about it: whether the convs before it are weight-standardized by default, its recipe (the
values `config.RECIPES` resolves a "per norm" parameter to), whether bf16 autocast holds its
accuracy (`engine.BF16_NORMS`), its colour in the report's figures (`plots.NORM_COLORS`), and
whether it has batch statistics (`norm_batch` applies). `--help`, validation, the report and
the plots read this table, so a new norm is one entry here plus its tests
(docs/normalizations.md).

This module does not import torch, so `config` can read it: the factories import the layers
(`pipeline.model`) when a model is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

# (channels, *, groups, norm_batch) -> the layer normalizing `channels` feature maps.
Factory = Callable[..., "nn.Module"]


# What a norm trains with where its entry says nothing of a per-norm parameter: a new norm takes
# these until a sweep of its own on the validation split says otherwise.
SHARED_RECIPE: dict[str, int | float | str] = {
    "activation": "relu",
    "batch_size": 128,
    "learning_rate": 0.2,
    "optimizer": "sgd",
    "pool": "max",
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


# The factories import the layers only when a model is built (see the module docstring).


def _batch(channels: int, *, groups: int, norm_batch: int) -> nn.Module:
    from torch import nn

    from pipeline.model import GhostBatchNorm2d

    if norm_batch == 0:  # the whole batch: plain BatchNorm2d, the module runs logged before
        return nn.BatchNorm2d(channels)
    return GhostBatchNorm2d(channels, norm_batch=norm_batch)


def _group(channels: int, *, groups: int, norm_batch: int) -> nn.Module:
    from pipeline.model import FloatGroupNorm

    return FloatGroupNorm(groups, channels)


def _layer(channels: int, *, groups: int, norm_batch: int) -> nn.Module:
    from torch import nn

    return nn.GroupNorm(1, channels)  # one group: its bf16 kernel is fast


def _instance(channels: int, *, groups: int, norm_batch: int) -> nn.Module:
    from pipeline.model import FloatGroupNorm

    return FloatGroupNorm(channels, channels)  # one channel per group, affine per channel


def _none(channels: int, *, groups: int, norm_batch: int) -> nn.Module:
    from torch import nn

    return nn.Identity()


def _frn(channels: int, *, groups: int, norm_batch: int) -> nn.Module:
    from pipeline.model import FilterResponseNorm2d

    return FilterResponseNorm2d(channels)


ENTRIES = (
    Norm(
        "batch",
        _batch,
        "statistics over the batch's images (or groups of norm_batch of them)",
        "tab:blue",
        standardize=False,
        # Muon gained +1.36 +- 0.19 validation points over SGD, paired over 3 seeds, every seed
        # gaining (docs/results.md#third-round-muon-the-activation-and-the-pooling); SiLU +0.62
        # +- 0.12 over ReLU on top of Muon, 3 seeds (average pooling +0.40 +- 0.08, smaller).
        recipe={"optimizer": "muon", "activation": "silu"},
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
        # ReLU on top of Muon, 3 seeds (average pooling +0.47 +- 0.10, smaller).
        recipe={"batch_size": 256, "optimizer": "muon", "activation": "silu"},
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
