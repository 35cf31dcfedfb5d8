"""Device mesh, logical-axis rules and array placement.

Modules name their parameter and activation axes logically ('embed', 'mlp', ...);
the config maps those names onto the mesh axes ('data', 'fsdp', 'tensor'), as in the
flax lm1b example and maxtext. Nothing here knows about any particular model.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# Batch dimensions are split over every data-parallel axis.
BATCH_AXES = ("data", "fsdp")


def mesh_shape(spec: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves a mesh spec with at most one -1 ("the rest") against a device count."""
  spec = [int(s) for s in spec]
  if len(spec) != len(MESH_AXES):
    raise ValueError(f"mesh needs {len(MESH_AXES)} sizes for {MESH_AXES}, got {spec}")
  if spec.count(-1) > 1 or any(s == 0 or s < -1 for s in spec):
    raise ValueError(f"mesh sizes must be positive with at most one -1, got {spec}")
  known = int(np.prod([s for s in spec if s != -1]))
  if num_devices % known:
    raise ValueError(f"mesh {spec} does not divide {num_devices} devices")
  rest = num_devices // known
  shape = tuple(rest if s == -1 else s for s in spec)
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f"mesh {shape} uses {np.prod(shape)} devices, but {num_devices} exist")
  return shape


def make_mesh(spec: Sequence[int], devices=None) -> jax.sharding.Mesh:
  """Mesh over ('data', 'fsdp', 'tensor') with Auto axis types (sharding propagation)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(spec, len(devices))
  return jax.make_mesh(
      shape,
      MESH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
      devices=devices,
  )


def rules_from_config(rules) -> tuple[tuple[str, object], ...]:
  """ConfigDict/list of (logical, mesh axes) pairs -> tuple of pairs for flax."""
  out = []
  for logical, mesh_axes in rules:
    if isinstance(mesh_axes, list):
      mesh_axes = tuple(mesh_axes)
    out.append((logical, mesh_axes))
  return tuple(out)


def logical_shardings(boxed_tree, mesh, rules):
  """NamedShardings for a tree of (abstract) values boxed with logical names.

  Leaves without names are replicated, and so is any dimension that its mesh axes do not
  divide (`divisible_spec`: e.g. a 3-channel output conv under 8-way fsdp).
  """
  specs = nn.get_partition_spec(boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  return jax.tree.map(
      lambda s, x: NamedSharding(mesh, divisible_spec(s.spec, np.shape(x), mesh)),
      shardings,
      nn.unbox(boxed_tree),
  )


def divisible_spec(spec, shape: Sequence[int], mesh) -> P:
  """`spec` with the mesh axes of each dimension they do not divide evenly dropped.

  jax refuses uneven shardings; a dimension whose size the product of its mesh axes does
  not divide is replicated instead. In the paper configurations on 8 devices these are
  3-channel output convs and Patch-DM's code table (21443 rows, 44 MB); a tensor axis
  also replicates attention kernels whose head count it does not divide.
  """
  out = []
  for i, size in enumerate(shape):
    axes = spec[i] if i < len(spec) else None
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    ways = int(np.prod([mesh.shape[a] for a in names]))
    out.append(axes if size % ways == 0 else None)
  return P(*out)


def put_logical(tree, mesh, rules):
  """Places a host tree on the mesh by logical names: (arrays, their NamedShardings).

  Leaves boxed with `nn.LogicallyPartitioned` are split by `rules` as parameters are;
  unboxed leaves (numpy or jax arrays, Python scalars) are replicated. The trainer places
  a method's frozen inputs (`Method.prepare`) this way.
  """
  tree, shardings = logical_placement(tree, mesh, rules)
  return jax.device_put(tree, shardings), shardings


def logical_placement(tree, mesh, rules):
  """`put_logical` without the transfer: (the unboxed tree, its NamedShardings).

  Also for abstract trees (jax.ShapeDtypeStruct leaves), e.g. to lower a step on frozen
  inputs that were never loaded (`infdiff.pretrained.abstract`).
  """
  is_boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)

  def spec(x):
    if not is_boxed(x):
      return P()
    return divisible_spec(nn.logical_to_mesh_axes(x.names, rules), np.shape(x.value), mesh)

  shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), tree, is_leaf=is_boxed)
  return nn.unbox(tree), shardings


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def host_batch_to_global(batch: dict, mesh) -> dict:
  """Per-process numpy batch -> global jax arrays split over the batch axes.

  Non-numeric entries (strings) are dropped: they never enter a jitted step.
  """
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.dtype.kind in "OUS":
      continue
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
  return out
