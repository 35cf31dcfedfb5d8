"""Neural-image-field renderers: latent grid + query coordinates -> RGB.

One interface for all renderers:

    rgb = renderer(latent, coords, cells, valid=None)

- latent: [B, h, w, C] feature grid (cell centres follow the pixel-centre convention).
- coords: [B, H, W, 2] a grid of query coordinates (row, col), e.g. a window of the
  full render's grid from `infdiff.fields.crop_grid`; it may extend beyond [-1, 1]^2.
- cells: [B, 2] pixel cell (2 / H_full, 2 / W_full) of the full render the grid
  belongs to.
- valid: optional [B, H, W] bool, True for queries that are real pixels of the full
  render. Queries marked False are treated exactly like the zero padding beyond the
  image border of an untiled render (masked attention keys for CQAR, zeroed conv inputs
  for CLIF; LIIF is pointwise and ignores it). Tiled rendering uses it for halo queries
  outside the image; None means all queries are real.
- returns [B, H, W, 3] float32 RGB on the scale of the encoder's [0, 1] input
  (unbounded; clip when saving images).

Every renderer also reports what seamless tiling needs (infdiff/render.py):
- `halo()`: output pixels of context each side of a tile so that the tile centre equals
  the untiled render;
- `tile_align()`: tile origins (and the halo and tile size) must be multiples of it.

Renderers are picked by name with `make_renderer('cqar' | 'liif' | 'clif', **fields)`.
Each takes `rgb_base` ('none' as published, or 'bilinear' / 'bicubic'): the renderer's
output is then a residual over the interpolated linear RGB projection of the latent.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from infdiff import fields
from infdiff.models import layers, swin
from infdiff.models.edsr import conv3x3


def _dense(features, axes, dtype, param_dtype, name, zero=False):
  init = nn.initializers.lecun_normal()
  return layers.dense(features, axes, dtype, param_dtype, zero=zero, init=init, name=name)


def _latent_units(latent: jax.Array, coords: jax.Array, cells: jax.Array) -> jax.Array:
  """Cell of each query in latent-cell units c * (h, w) / 2, broadcast to [B, H, W, 2]."""
  size = jnp.array(latent.shape[1:3], coords.dtype)
  rel = cells.astype(coords.dtype) * size / 2.0  # [B, 2]
  return jnp.broadcast_to(rel[:, None, None, :], coords.shape)


def cqar_tokens(latent: jax.Array, coords: jax.Array, cells: jax.Array) -> jax.Array:
  """CQAR's query tokens `[z(v*), (x_q - v*) (h, w) / 2, c_q (h, w) / 2, x_q]` (App. B.4).

  Args:
    latent: [B, h, w, C] feature grid.
    coords: [B, H, W, 2] query coordinates x_q (row, col).
    cells: [B, 2] pixel cell c_q of the full render the queries belong to.

  Returns:
    [B, H, W, C + 6] in coords' dtype: the feature of the nearest latent cell v*, the
    offset to that cell's centre and the query cell, both in latent-cell units, and the
    absolute coordinate.
  """
  q = fields.nearest_latent(latent, coords)
  return jnp.concatenate(
      [q.feature.astype(coords.dtype), q.offset, _latent_units(latent, coords, cells), coords],
      axis=-1,
  )


def unfold_3x3(latent: jax.Array) -> jax.Array:
  """LIIF's feature unfolding: each cell's feature becomes its 3x3 neighbourhood.

  Zero padding beyond the border (`F.unfold(feat, 3, padding=1)` in LIIF), channels in
  PyTorch's unfold order: output channel `c * 9 + 3 * dy + dx` holds channel c of the
  neighbour at row offset dy - 1 and column offset dx - 1.

  Args:
    latent: [B, h, w, C].

  Returns:
    [B, h, w, 9 C].
  """
  b, h, w, c = latent.shape
  padded = jnp.pad(latent, ((0, 0), (1, 1), (1, 1), (0, 0)))  # [B, h + 2, w + 2, C]
  taps = [padded[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]
  return jnp.stack(taps, axis=-1).reshape(b, h, w, 9 * c)  # [B, h, w, C, 9] -> [.., 9 C]


def _add_rgb_base(rgb, latent, coords, kind, dtype, param_dtype):
  """Global residual: rgb + interpolation of a learned linear RGB projection of the latent.

  With kind 'bilinear' or 'bicubic' the renderer learns a correction to a smooth
  upsampling of `Linear(z)` (global residual learning as in VDSR / LTE), which the
  attention or convolution stack otherwise has to rediscover. The base is pointwise in the
  queries and depends only on the latent, so tiling and halos are unchanged. Must be
  called inside a compact __call__; its parameters are 'rgb_base'.
  """
  if kind not in ("none", "bilinear", "bicubic"):
    raise ValueError(f"rgb_base must be 'none', 'bilinear' or 'bicubic', got {kind!r}")
  if kind == "none":
    return rgb
  proj = _dense(3, ("latent", None), dtype, param_dtype, "rgb_base")(latent.astype(dtype))
  base = fields.interpolate_latent(proj.astype(jnp.float32), coords.astype(jnp.float32), kind)
  return rgb + base


class CQAR(nn.Module):
  """Coordinate-Queried Attention Renderer (RaPD Sec. 3.3, App. B.4).

  One token per query, `[z(v*), (x_q - v*) (h, w) / 2, c_q (h, w) / 2, x_q]` -> Linear
  -> `depth` Swin blocks over the query grid (odd blocks shifted by window / 2) ->
  LayerNorm -> Linear(3). Convolution-free. Grids that are not multiples of the window
  are padded at the bottom/right and the padding is masked out as attention keys.
  Windows are anchored at the grid origin (row 0, col 0 of `coords`).
  """

  dim: int = 256  # token width D (Table 5: 256)
  depth: int = 4  # Swin blocks (Table 5: 4)
  num_heads: int = 4  # attention heads (Table 5: 4)
  window: int = 8  # window size w, even (Table 5: 8)
  expansion: int = 4  # gated FFN expansion factor (choice)
  rpb_init_slope: float = 0.0  # locality prior of the relative bias at init (choice; 0 = Swin)
  attention_impl: str = "xla"  # window attention: 'xla' | 'pallas' (infdiff/kernels)
  rgb_base: str = "none"  # residual base: 'none' | 'bilinear' | 'bicubic' (choice)
  dtype: jnp.dtype = jnp.float32  # compute dtype
  param_dtype: jnp.dtype = jnp.float32  # parameter dtype

  def halo(self) -> int:
    """Tiling context: covers what leaks in from a tile edge, rounded up to windows.

    With tile origins on the window lattice, regular windows of a tile coincide with the
    untiled ones; each shifted block after the first block lets the clipped border
    windows of a tile differ by w / 2 more, so (depth - 1) * w / 2 edge pixels can
    differ. Rounded up to a multiple of w and at least one window (16 for the defaults).
    """
    reach = max(self.depth - 1, 0) * (self.window // 2)
    return max(1, math.ceil(reach / self.window)) * self.window

  def tile_align(self) -> int:
    """Tile origins, tile sizes and the halo must be multiples of the window."""
    return self.window

  @nn.compact
  def __call__(self, latent, coords, cells, valid=None) -> jax.Array:
    """Renders a grid of queries; see the module docstring for shapes."""
    if self.window % 2:
      raise ValueError(f"window must be even for the w/2 shift, got {self.window}")
    b, hq, wq, _ = coords.shape
    tokens = cqar_tokens(latent, coords, cells)  # [B, H, W, C + 6]
    x = _dense(self.dim, ("latent", "embed"), self.dtype, self.param_dtype, "embed")(tokens)
    if valid is None:
      valid = jnp.ones((b, hq, wq), bool)
    x = swin.pad_to_multiple(x, self.window)  # [B, Hp, Wp, D]
    valid = swin.pad_to_multiple(valid, self.window, value=False)  # [B, Hp, Wp]
    x = nn.with_logical_constraint(x, layers.ACT_GRID)
    for i in range(self.depth):
      x = swin.SwinBlock(
          self.dim,
          self.num_heads,
          self.window,
          shift=(self.window // 2) if i % 2 else 0,
          expansion=self.expansion,
          rpb_init_slope=self.rpb_init_slope,
          attention_impl=self.attention_impl,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"block{i}",
      )(x, valid)
    x = swin.layer_norm(self.dtype, self.param_dtype, "norm_out")(x[:, :hq, :wq])
    # With a residual base the head starts at zero, so the renderer starts as the base.
    zero = self.rgb_base != "none"
    rgb = _dense(3, ("embed", None), self.dtype, self.param_dtype, "head", zero)(x)
    rgb = rgb.astype(jnp.float32)
    return _add_rgb_base(rgb, latent, coords, self.rgb_base, self.dtype, self.param_dtype)


class LIIF(nn.Module):
  """Local implicit image function with local ensemble and cell decoding (Chen et al.).

  For each query, the four latent cells around it (shifts of +-0.5 cell) each predict
  RGB from `[z(v), (x_q - v) (h, w) / 2, c_q (h, w) / 2]` with a pointwise MLP; the
  predictions are blended with the area of the rectangle to the diagonally opposite
  neighbour, i.e. bilinear-like weights. With `unfold`, z(v) is the 3x3 neighbourhood of
  the latent cell v concatenated (LIIF's `feat_unfold`, `unfold_3x3`). Pointwise in the
  queries, so tiles need no halo: unfolding reaches one cell of the latent, and every
  tile sees the whole latent.
  """

  hidden: tuple[int, ...] = (256, 256, 256, 256)  # MLP hidden widths (LIIF's default)
  # 3x3 feature unfolding (LIIF's default feat_unfold). Off here so that runs saved before
  # the option existed load unchanged; configs/rapd.py turns it on.
  unfold: bool = False
  rgb_base: str = "none"  # residual base: 'none' | 'bilinear' | 'bicubic' (choice)
  dtype: jnp.dtype = jnp.float32  # compute dtype
  param_dtype: jnp.dtype = jnp.float32  # parameter dtype

  def halo(self) -> int:
    """Pointwise: a query never sees its neighbours."""
    return 0

  def tile_align(self) -> int:
    """Any tile origin works."""
    return 1

  @nn.compact
  def __call__(self, latent, coords, cells, valid=None) -> jax.Array:
    """Renders a grid of queries; `valid` is accepted for the interface and unused."""
    del valid
    rel_cell = _latent_units(latent, coords, cells)
    feat = unfold_3x3(latent) if self.unfold else latent  # [B, h, w, C'] (C' = 9 C unfolded)
    inputs, areas = [], []
    # Order (-,-), (-,+), (+,-), (+,+): index 3 - k is the diagonal partner of k.
    for dy in (-0.5, 0.5):
      for dx in (-0.5, 0.5):
        q = fields.nearest_latent(feat, coords, shift=(dy, dx))
        inputs.append(jnp.concatenate([q.feature.astype(coords.dtype), q.offset, rel_cell], -1))
        areas.append(jnp.abs(q.offset[..., 0] * q.offset[..., 1]) + 1e-9)  # [B, H, W]
    h = jnp.stack(inputs)  # [4, B, H, W, C' + 4]
    in_axis = "latent"
    for i, width in enumerate(self.hidden):
      out_axis = "mlp" if i % 2 == 0 else "embed"
      h = nn.relu(_dense(width, (in_axis, out_axis), self.dtype, self.param_dtype, f"fc{i}")(h))
      in_axis = out_axis
    pred = _dense(3, (in_axis, None), self.dtype, self.param_dtype, "head")(h)
    pred = pred.astype(jnp.float32)  # [4, B, H, W, 3]
    areas = jnp.stack(areas[::-1])  # diagonal swap: weight k = area of neighbour 3 - k
    weights = areas / jnp.sum(areas, axis=0, keepdims=True)
    rgb = jnp.sum(pred * weights[..., None], axis=0)  # [B, H, W, 3]
    return _add_rgb_base(rgb, latent, coords, self.rgb_base, self.dtype, self.param_dtype)


class CLIF(nn.Module):
  """Convolutional local image function (INFD): nearest feature + relative coordinate
  and cell, then conv3x3 -> ResBlocks -> conv3x3 over the query grid.

  norm='none' (default): ResBlocks conv-ReLU-conv without normalisation. A norm over the
  spatial extent would make a pixel depend on the whole grid, so without one crops are
  scale-consistent and tiles exactly seamless.
  norm='group' (INFD's official renderer, METHODS.md): pre-activation ResBlocks
  `x + conv2(swish(GN(conv1(swish(GN(x))))))` and a final GN, swish before conv_out.
  GroupNorm statistics are taken over the queried grid (valid queries only), so a tile
  differs slightly from the untiled render; a tile that covers the whole image (plus
  any halo) equals it.

  The inputs keep this module's units for both norms: offset and cell in latent-cell
  units, `(x - v) (h, w) / 2` and `c (h, w) / 2`; the official code scales by h, i.e.
  twice these, which the first conv absorbs.
  """

  features: int = 128  # conv width (choice; INFD calls its renderer lightweight; official 256)
  n_resblocks: int = 2  # residual blocks (INFD: 2)
  norm: str = "none"  # 'none' (seamless tiles) or 'group' (INFD's GroupNorm + swish)
  norm_groups: int = 32  # GroupNorm groups for norm='group' (INFD: 32)
  norm_eps: float = 1e-6  # GroupNorm epsilon (LDM's 1e-6)
  rgb_base: str = "none"  # residual base: 'none' | 'bilinear' | 'bicubic' (choice)
  dtype: jnp.dtype = jnp.float32  # compute dtype
  param_dtype: jnp.dtype = jnp.float32  # parameter dtype

  def receptive_radius(self) -> int:
    """Pixels each side an output depends on: one per 3x3 conv (GroupNorm aside)."""
    return 2 + 2 * self.n_resblocks

  def halo(self) -> int:
    """More than the receptive radius (8 for the defaults, INFD's tile padding)."""
    return self.receptive_radius() + 2

  def tile_align(self) -> int:
    """Convolutions are translation-equivariant: any tile origin works."""
    return 1

  @nn.compact
  def __call__(self, latent, coords, cells, valid=None) -> jax.Array:
    """Renders a grid of queries; see the module docstring for shapes."""
    if self.norm not in ("none", "group"):
      raise ValueError(f"CLIF norm must be 'none' or 'group', got {self.norm!r}")
    q = fields.nearest_latent(latent, coords)
    x = jnp.concatenate(
        [q.feature.astype(coords.dtype), q.offset, _latent_units(latent, coords, cells)], -1
    ).astype(
        self.dtype
    )  # [B, H, W, C + 4]
    if valid is None:
      mask = lambda t: t
    else:
      # Zeroing non-pixels before every conv reproduces the conv's zero padding at the
      # image border when the grid extends past it (tiles with a halo).
      m = valid[..., None].astype(self.dtype)
      mask = lambda t: t * m
    conv = lambda n, name: conv3x3(n, self.dtype, self.param_dtype, name)
    x = conv(self.features, "conv_in")(mask(x))
    if self.norm == "none":
      for i in range(self.n_resblocks):
        h = nn.relu(conv(self.features, f"block{i}_conv1")(mask(x)))
        x = x + conv(self.features, f"block{i}_conv2")(mask(h))
      rgb = conv(3, "conv_out")(mask(x)).astype(jnp.float32)  # [B, H, W, 3]
    else:
      # Statistics over real pixels only: halo queries beyond the border are no pixels.
      gmask = None if valid is None else jnp.broadcast_to(valid[..., None], x.shape)

      def norm_act(t, name):
        gn = nn.GroupNorm(
            num_groups=self.norm_groups,
            epsilon=self.norm_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
            name=name,
        )
        return nn.swish(gn(t, mask=gmask))

      for i in range(self.n_resblocks):
        h = conv(self.features, f"block{i}_conv1")(mask(norm_act(x, f"block{i}_norm1")))
        x = x + conv(self.features, f"block{i}_conv2")(mask(norm_act(h, f"block{i}_norm2")))
      rgb = conv(3, "conv_out")(mask(norm_act(x, "norm_out"))).astype(jnp.float32)
    return _add_rgb_base(rgb, latent, coords, self.rgb_base, self.dtype, self.param_dtype)


RENDERERS: dict[str, type[nn.Module]] = {"cqar": CQAR, "liif": LIIF, "clif": CLIF}


def make_renderer(name: str, **kwargs) -> nn.Module:
  """Builds a renderer by name.

  Args:
    name: one of RENDERERS ('cqar', 'liif', 'clif').
    **kwargs: dataclass fields of that renderer (dim, depth, window, dtype, ...).

  Returns:
    An unbound Linen module with the renderer interface of this file.

  Raises:
    ValueError: for an unknown name.
  """
  if name not in RENDERERS:
    raise ValueError(f"unknown renderer {name!r}; known: {sorted(RENDERERS)}")
  # Lists (e.g. LIIF's hidden widths read back from a JSON config) become tuples: modules
  # must hash, since a renderer is a static argument of the jitted tile renderer.
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  cls = RENDERERS[name]
  known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(kwargs) - known)
  if unknown:
    raise ValueError(
        f"renderer {name!r} has no field(s) {', '.join(unknown)} (its fields: "
        f"{', '.join(sorted(known))}); in configs/rapd.py pick the renderer with the preset "
        f"renderer={name}, which sets its fields"
    )
  return cls(**kwargs)


def renderer_from_config(rcfg, dtype=jnp.float32) -> nn.Module:
  """The renderer of a config section {'name': ..., **fields} (ConfigDict or dict)."""
  kw = dict(rcfg.to_dict() if hasattr(rcfg, "to_dict") else rcfg)
  return make_renderer(kw.pop("name"), **kw, dtype=dtype)
