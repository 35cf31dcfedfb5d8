"""Rendering a latent at any size, in static-shape tiles when the output is large.

Renderers hold per-query activations (CQAR: D = 256 values per output pixel per layer),
so a 4K render does not fit at once. `render_image` splits the output into tiles of
one static shape, renders each tile with a halo of context, keeps the centre and
stitches. Because the shape is static, the renderer is compiled once per
(tile, halo, tiles_per_call, batch, latent shape), whatever the output size
(outputs smaller than one tile render with a tile shrunk to their size).

Exactness contract: the stitched result equals the untiled render
`renderer(latent, coord_grid(H, W), cell_size(H, W))` (up to float round-off) when
- `halo >= renderer.halo()`, and
- tile origins lie on the renderer's lattice: origins are multiples of `tile`, and `tile`
  and `halo` are multiples of `renderer.tile_align()` (the CQAR window), so each
  tile's (shifted) attention windows coincide with those of the untiled render; this
  module rounds `tile` and `halo` up to multiples of the alignment.
Halo queries beyond the image border get the coordinates of the grid extended past the
border (`crop_grid` with negative or overflowing offsets, no clamping) and are flagged
`valid=False`, which renderers treat exactly like the padding of an untiled render (CQAR:
masked attention keys; CLIF: zero conv padding). For CQAR the untiled reference is thus
the render of the whole H x W grid, padded at the bottom/right to a multiple of the
window with the padding masked, windows anchored at pixel (0, 0).

An apply_fn here is `apply_fn(params, latent, coords, cells, valid) -> rgb` with the
renderer interface of infdiff/models/renderers.py; `RendererFn(module)` builds one that
also carries the module's halo and alignment. It is a static jit argument: reuse the
same (hashable) object across calls to avoid recompiles.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infdiff import fields

ApplyFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class RendererFn:
  """apply_fn for a renderer module: `(variables, latent, coords, cells, valid) -> rgb`.

  Hashable (Linen modules hash by their fields), so it can be a static jit argument, and
  exposes the module's `halo` and `tile_align` for `render_image`.
  """

  module: nn.Module

  def __call__(self, variables, latent, coords, cells, valid=None) -> jax.Array:
    """Applies the renderer; shapes as in infdiff/models/renderers.py."""
    return self.module.apply(variables, latent, coords, cells, valid)

  @property
  def halo(self) -> int:
    """The module's tiling halo in output pixels."""
    return self.module.halo()

  @property
  def tile_align(self) -> int:
    """The module's tile lattice (tile origins, tile and halo are multiples of it)."""
    return self.module.tile_align()


def tile_inputs(full_h: int, full_w: int, top: int, left: int, h: int, w: int):
  """Queries of the window [top:top+h, left:left+w] of a full_h x full_w render.

  The window may extend past the image; coordinates then continue the grid beyond
  [-1, 1] and those queries are flagged invalid.

  Returns:
    (coords [h, w, 2] float32, valid [h, w] bool), numpy.
  """
  coords = fields.crop_grid(full_h, full_w, top, left, h, w)
  rows = (top + np.arange(h) >= 0) & (top + np.arange(h) < full_h)
  cols = (left + np.arange(w) >= 0) & (left + np.arange(w) < full_w)
  return coords, rows[:, None] & cols[None, :]


@functools.partial(jax.jit, static_argnums=0)
def _render_tiles(apply_fn, params, latent, coords, cells, valid):
  """Renders n same-shape tiles in one call.

  Args:
    apply_fn: static renderer apply function.
    params: renderer variables.
    latent: [B, h, w, C].
    coords: [n, th, tw, 2] per-tile queries, shared by the batch.
    cells: [B, 2].
    valid: [n, th, tw] bool.

  Returns:
    [n, B, th, tw, 3].
  """
  b = latent.shape[0]

  def one(c, v):
    c = jnp.broadcast_to(c, (b, *c.shape))  # [B, th, tw, 2]
    v = jnp.broadcast_to(v, (b, *v.shape))  # [B, th, tw]
    return apply_fn(params, latent, c, cells, v)

  return jax.vmap(one)(coords, valid)


def _cells(latent, full_h, full_w):
  return jnp.broadcast_to(jnp.asarray(fields.cell_size(full_h, full_w)), (latent.shape[0], 2))


def render_crop(
    apply_fn: ApplyFn,
    params,
    latent: jax.Array,
    full_h: int,
    full_w: int,
    top: int,
    left: int,
    h: int,
    w: int,
) -> jax.Array:
  """Renders the window [top:top+h, left:left+w] of a virtual full_h x full_w image.

  No halo is added: this is the raw per-window call that tiled rendering makes for
  each (haloed) tile. For pointwise renderers (LIIF) it equals the matching window of
  the full render exactly; for CQAR/CLIF use `render_image(..., crop=...)`, which adds
  the context those need.

  Args:
    apply_fn: `(params, latent, coords, cells, valid) -> rgb`.
    params: renderer variables.
    latent: [B, h_lat, w_lat, C].
    full_h: height of the virtual full render (sets coordinates and cells).
    full_w: width of the virtual full render.
    top: first row of the window (may be negative or run past the image).
    left: first column of the window.
    h: window height.
    w: window width.

  Returns:
    [B, h, w, 3] float32.
  """
  coords, valid = tile_inputs(full_h, full_w, top, left, h, w)
  out = _render_tiles(
      apply_fn, params, latent, coords[None], _cells(latent, full_h, full_w), valid[None]
  )
  return out[0]


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def render_image(
    apply_fn: ApplyFn,
    params,
    latent: jax.Array,
    out_h: int,
    out_w: int,
    *,
    tile: int = 256,
    halo: int | None = None,
    crop: tuple[int, int, int, int] | None = None,
    align: int | None = None,
    tiles_per_call: int = 1,
    out: np.ndarray | None = None,
    max_in_flight: int = 4,
) -> np.ndarray:
  """Renders a latent at out_h x out_w (or a crop of it) in static-shape tiles.

  Tile origins are multiples of `tile` in the full render's pixel grid; each tile is
  computed as a (tile + 2 * halo)^2 window starting halo pixels before its origin, and
  only its central tile x tile part is kept. Edge tiles are full static-shape tiles,
  cropped when stitched. When the requested window is smaller than one tile, the tile
  shrinks to the window (rounded up to `align`) instead of rendering mostly discarded
  pixels; outputs at least one tile wide all share one compiled tile shape.

  Memory stays bounded by a few tiles plus the output: at most `max_in_flight` calls are
  dispatched ahead of the stitching, and tiles are written straight into the output
  array (which may be preallocated by the caller, e.g. uint8 or a np.memmap).

  Args:
    apply_fn: `(params, latent, coords, cells, valid) -> rgb`, e.g. `RendererFn(module)`.
    params: renderer variables.
    latent: [B, h, w, C].
    out_h: height of the full render (sets coordinates and cells).
    out_w: width of the full render.
    tile: kept tile size; rounded up to a multiple of `align`.
    halo: context pixels each side of a tile; None -> `apply_fn.halo` if present, else 0.
      Rounded up to a multiple of `align`.
    crop: optional (top, left, height, width) window of the full render to produce.
    align: tile lattice; None -> `apply_fn.tile_align` if present, else 1.
    tiles_per_call: tiles rendered per compiled call (static; the last call is padded by
      repeating a tile). One 256-pixel CQAR tile already holds ~80k tokens, and on CPU
      batching measured slower, hence 1; raise it for small tiles on accelerators.
    out: optional preallocated [B, height, width, 3] array to write into. A uint8 array
      receives `round(clip(rgb, 0, 1) * 255)`; float arrays receive rgb unclipped.
    max_in_flight: compiled calls dispatched before the oldest is stitched (overlaps
      device work with the host copy while bounding the memory held by pending tiles).

  Returns:
    `out`, or a new [B, out_h, out_w, 3] (or [B, height, width, 3] for a crop) float32
    numpy array.
  """
  align = getattr(apply_fn, "tile_align", 1) if align is None else align
  halo = getattr(apply_fn, "halo", 0) if halo is None else halo
  top, left, h, w = crop if crop is not None else (0, 0, out_h, out_w)
  if top < 0 or left < 0 or h <= 0 or w <= 0 or top + h > out_h or left + w > out_w:
    raise ValueError(f"crop {(top, left, h, w)} is not inside the {out_h}x{out_w} render")
  tile = _round_up(min(tile, max(h, w)), align)
  halo = _round_up(halo, align)
  b = latent.shape[0]
  if out is None:
    out = np.empty((b, h, w, 3), np.float32)  # [B, h, w, 3]; every pixel is written below
  elif out.shape != (b, h, w, 3):
    raise ValueError(f"out has shape {out.shape}, expected {(b, h, w, 3)}")

  # Tile origins on the global lattice (multiples of tile) covering the requested window.
  ys = range(top // tile * tile, top + h, tile)
  xs = range(left // tile * tile, left + w, tile)
  origins = [(oy, ox) for oy in ys for ox in xs]
  ext = tile + 2 * halo
  cells = _cells(latent, out_h, out_w)

  def stitch(group, rendered):
    rendered = np.asarray(rendered)  # [n, B, ext, ext, 3]
    for k, (oy, ox) in enumerate(group):
      y0, y1 = max(oy, top), min(oy + tile, top + h)
      x0, x1 = max(ox, left), min(ox + tile, left + w)
      src = rendered[k, :, y0 - oy + halo : y1 - oy + halo, x0 - ox + halo : x1 - ox + halo]
      if out.dtype == np.uint8:
        src = np.clip(src, 0.0, 1.0) * 255.0 + 0.5
      out[:, y0 - top : y1 - top, x0 - left : x1 - left] = src

  pending = collections.deque()
  for start in range(0, len(origins), tiles_per_call):
    group = origins[start : start + tiles_per_call]
    padded = group + [group[-1]] * (tiles_per_call - len(group))
    inputs = [tile_inputs(out_h, out_w, oy - halo, ox - halo, ext, ext) for oy, ox in padded]
    coords = np.stack([c for c, _ in inputs])  # [n, ext, ext, 2]
    valid = np.stack([v for _, v in inputs])  # [n, ext, ext]
    # Dispatch ahead of the stitching so device work overlaps the host copies.
    pending.append((group, _render_tiles(apply_fn, params, latent, coords, cells, valid)))
    if len(pending) > max(max_in_flight, 1):
      stitch(*pending.popleft())
  while pending:
    stitch(*pending.popleft())
  return out


def render_latents(
    apply_fn: ApplyFn,
    params,
    latents,
    out_h: int,
    out_w: int,
    *,
    batch: int,
    tile: int = 256,
    out: np.ndarray | None = None,
    clip: bool = False,
) -> np.ndarray:
  """Renders any number of latents at out_h x out_w with bounded memory.

  Latents go through `render_image` `batch` at a time (the last chunk padded by repeating
  its last latent, so every call has one static shape and compiles once), and each chunk
  is written straight into the preallocated output. Device memory is bounded by one
  chunk's tiles, whatever the number of latents; host memory by the output itself.

  Args:
    apply_fn: renderer apply function (e.g. `RendererFn(module)`).
    params: renderer variables.
    latents: [N, h, w, C] (numpy or jax).
    out_h: output height.
    out_w: output width.
    batch: latents per compiled call.
    tile: render tile side (see `render_image`).
    out: optional preallocated [N, out_h, out_w, 3] float32 or uint8 array.
    clip: clip float outputs to [0, 1] in place.

  Returns:
    [N, out_h, out_w, 3] numpy array (`out` when given).
  """
  n = len(latents)
  if out is None:
    out = np.empty((n, out_h, out_w, 3), np.float32)  # [N, H, W, 3]
  elif out.shape != (n, out_h, out_w, 3):
    raise ValueError(f"out has shape {out.shape}, expected {(n, out_h, out_w, 3)}")
  batch = max(1, min(int(batch), n))
  for s in range(0, n, batch):
    chunk = np.asarray(latents[s : s + batch])
    k = len(chunk)
    if k < batch:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - k, axis=0)])
    if k == batch:
      render_image(
          apply_fn, params, jnp.asarray(chunk), out_h, out_w, tile=tile, out=out[s : s + k]
      )
    else:
      img = render_image(apply_fn, params, jnp.asarray(chunk), out_h, out_w, tile=tile)
      out[s : s + k] = img[:k] if out.dtype != np.uint8 else np.clip(img[:k], 0, 1) * 255 + 0.5
  if clip and out.dtype != np.uint8:
    np.clip(out, 0.0, 1.0, out=out)
  return out


class OutOfMemory(RuntimeError):
  """Rendering or sampling ran out of memory; the message names the setting to lower."""


@contextlib.contextmanager
def memory_hint(what: str, lower: str):
  """Turns an out-of-memory error inside the block into one line naming what to lower.

  Args:
    what: what ran, e.g. 'rendering 64 latents at 4096x4096'.
    lower: the settings to lower, e.g. '--tile or --num'.
  """
  try:
    yield
  except (MemoryError, jax.errors.JaxRuntimeError) as e:
    text = str(e)
    if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or "out of memory" in text:
      first = text.strip().splitlines()[0][:160] if text.strip() else type(e).__name__
      raise OutOfMemory(f"{what} ran out of memory ({first}); lower {lower}") from None
    raise
