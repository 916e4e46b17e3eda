"""Mesh shapes without devices: axis sizes, a -1 axis filled from the device count, and how many elements of an
array one device holds under `models.sharding`'s rules (the real rules and their fallback)."""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping, Sequence
from typing import Any

from memagent_jax.planning.errors import PlanError


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Mesh axis sizes (no -1). `shape` is what `sharding.logical_to_spec` reads from a mesh."""

    data: int
    fsdp: int
    tensor: int

    @property
    def shape(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def batch_shards(self) -> int:
        """Rows are split over data x fsdp (`sharding.batch_multiple`)."""
        return self.data * self.fsdp

    def __str__(self) -> str:
        return f"data {self.data} x fsdp {self.fsdp} x tensor {self.tensor}"


def resolve_mesh(data: int, fsdp: int, tensor: int, devices: int | None = None) -> MeshShape:
    """Fills a -1 axis from `devices` (as `sharding.make_mesh` does)."""
    sizes = [int(data), int(fsdp), int(tensor)]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise PlanError(f"config.mesh: sizes must be positive with at most one -1, got {sizes}")
    if -1 in sizes:
        if not devices:
            raise PlanError(f"config.mesh {sizes} has a -1 axis: give the device count (--devices N)")
        known = math.prod(s for s in sizes if s != -1)
        if devices % known:
            raise PlanError(f"config.mesh {sizes} does not divide {devices} devices")
        sizes[sizes.index(-1)] = devices // known
    mesh = MeshShape(*sizes)
    if devices and mesh.size != devices:
        raise PlanError(f"config.mesh: data x fsdp x tensor = {sizes} is {mesh.size} devices, not {devices}")
    return mesh


def sharded(n: int, ways: int) -> int:
    """Per-device size of a dimension of n split `ways` ways; replicated (n) when `ways` does not divide it,
    as `sharding.logical_to_spec` does."""
    return n // ways if ways > 1 and n % ways == 0 else n


def local_numel(
    shape: Sequence[int], logical_axes: Sequence[str | None], mesh: MeshShape, rules: Mapping[str, Any] | None = None
) -> int:
    """Elements one device holds of an array sharded by logical axes (the real rules, the real fallback)."""
    from memagent_jax.models import sharding

    spec = sharding.logical_to_spec(logical_axes, shape, types.SimpleNamespace(shape=mesh.shape), rules)
    n = 1
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        ways = 1
        if axes is not None:
            for a in (axes,) if isinstance(axes, str) else axes:
                ways *= mesh.shape[a]
        n *= dim // ways
    return n
