"""Channel sets: which channels of an activation a compacted tensor stores (docs/design.md §3).

A compacted activation is ``[B, K, ...]``: column ``j`` of sample ``b`` holds the original channel ``idx[b, j]``,
``-1`` marks padding after the sample's last stored channel. A plan names sets symbolically (they depend on the
masks, which change per call); the run's index planning (:mod:`gencnp_fast.plan.indices`) resolves them.
"""

from __future__ import annotations

import dataclasses
from typing import Union

__all__ = ["AllChannels", "UnitChannels", "FlatFeatures", "ChannelSetRef"]


@dataclasses.dataclass(frozen=True)
class AllChannels:
    """Every channel of the value computed by fx node ``node`` (the input, an unmasked unit, a dense add...)."""

    node: str


@dataclasses.dataclass(frozen=True)
class UnitChannels:
    """The channels unit ``unit``'s mask keeps."""

    unit: str


@dataclasses.dataclass(frozen=True)
class FlatFeatures:
    """The features of ``torch.flatten(x, 1)`` of a ``[B, C, H, W]`` value stored for ``base``: channel ``c`` becomes
    features ``c * spatial + t``, ``spatial = H * W``."""

    base: "ChannelSetRef"
    spatial: int


ChannelSetRef = Union[AllChannels, UnitChannels, FlatFeatures]
