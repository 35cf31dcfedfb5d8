"""Host-side (numpy) training transforms, deterministic given their random generators.

A transform is a callable `t(record, rng, batch_rng) -> record` on decoded records
({'image': uint8 [H, W, 3], 'caption': str, 'id': str}):
  rng        a numpy Generator private to this record (seeded from the pipeline seed, the
             process index and the record's position), for per-record randomness;
  batch_rng  a Generator shared by every row of one global batch (seeded from the pipeline
             seed and the batch index only, so equal on every host), for choices that must
             be equal across a batch, such as an output shape.
Each training method builds its own (`Method.data_transform`); `make_transform(name,
**kwargs)` builds a registered one by name.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from infdiff import fields
from infdiff.data import shapes

# String fields carried from input to output records ('meta': the built-in scenes' JSON).
PASSTHROUGH = ("caption", "id", "meta")


def _passthrough(record: dict[str, Any]) -> dict[str, Any]:
  return {k: record[k] for k in PASSTHROUGH if k in record}


def upscale_short_side(image: np.ndarray, min_side: int) -> np.ndarray:
  """Bicubic upscale of uint8 [H, W, 3] so that its short side is at least `min_side`.

  Bicubic rather than area: an area (box) filter cannot add detail when enlarging and
  reduces to nearest-neighbour blocks, which would teach the renderer blocky targets.
  """
  h, w = image.shape[:2]
  if min(h, w) >= min_side:
    return image
  f = min_side / min(h, w)
  nh, nw = max(min_side, round(h * f)), max(min_side, round(w * f))
  return np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
  """[S, S, 3] uint8 -> float32 [size, size, 3] in [0, 1]: area filter down, bicubic up."""
  if image.shape[0] >= size:
    out = fields.area_downsample(image, size, size)
  else:
    out = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), np.float32)
  return np.clip(np.asarray(out, np.float32) / 255.0, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class MultiResCrop:
  """Multi-resolution supervision (RaPD Sec. 3.4.1, INFD): a big crop as target, its
  area-downsampled copy as encoder input.

  Per record: scale s ~ U[1, min(s_max, short_side / enc_size)] (the upper end is lowered
  so the crop fits the image), target side S = round(s * enc_size), a random S x S crop T,
  encoder input = area_downsample(T, enc_size, enc_size).

  With `target_window=P` a random P x P window of T is supervised (P <= enc_size <= S, so it
  always fits): 'coord' is that window of the S x S grid (`fields.crop_grid`) and 'cell' is
  (2 / S, 2 / S). Shapes are static whatever s is.

  With `target_window=None` the whole S x S grid is supervised. Shapes must be static per
  batch, so S = k * enc_size with k drawn from `scales` by the batch generator (one k for a
  whole global batch, a new one every batch). An image whose short side is under S is
  upscaled (bicubic) to S; set data.min_size >= max(scales) * enc_size to avoid that.

  Images with a short side under enc_size are first upscaled (bicubic) so the short side
  is enc_size (then s = 1); set data.min_size >= enc_size to skip such images instead.

  Output: {'image': float32 [r, r, 3] in [0, 1], 'target': float32 [P, P, 3] in [0, 1]
  (P = S without a window), 'coord': float32 [P, P, 2], 'cell': float32 [2],
  'scale': float32 [] (= S / r, the scale actually used), 'caption', 'id'}.
  """

  enc_size: int = 64  # r: side of the encoder input
  s_max: float = 4.0  # largest crop scale (RaPD trains "up to" a few x; choice 4)
  target_window: int | None = 32  # P: supervised window side; None: the whole target grid
  scales: tuple[int, ...] | None = None  # whole-grid mode: allowed k (default 1..s_max)
  # Also output 'box' float32 [4]: the crop's (top, left, height, width) as fractions of
  # the image (for targets computed from the scene, `ShapesSemantics`).
  with_box: bool = False

  def __post_init__(self):
    if self.s_max < 1.0:
      raise ValueError(f"s_max must be >= 1, got {self.s_max}")
    if self.target_window is not None and not 0 < self.target_window <= self.enc_size:
      raise ValueError(f"target_window must be in [1, enc_size={self.enc_size}]")

  @property
  def scale_set(self) -> tuple[int, ...]:
    return tuple(self.scales) if self.scales else tuple(range(1, int(self.s_max) + 1))

  def __call__(self, record, rng: np.random.Generator, batch_rng: np.random.Generator):
    r = self.enc_size
    image = upscale_short_side(record["image"], r)
    h, w = image.shape[:2]
    if self.target_window is None:
      side = r * int(batch_rng.choice(self.scale_set))
      image = upscale_short_side(image, side)
      h, w = image.shape[:2]
    else:
      s_hi = min(self.s_max, min(h, w) / r)
      s = rng.uniform(1.0, s_hi) if s_hi > 1.0 else 1.0
      side = int(np.clip(round(s * r), r, min(h, w)))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    crop = image[top : top + side, left : left + side]  # [S, S, 3] uint8
    enc = fields.area_downsample(crop, r, r) / np.float32(255.0)  # [r, r, 3]
    p = side if self.target_window is None else self.target_window
    wt = int(rng.integers(0, side - p + 1))
    wl = int(rng.integers(0, side - p + 1))
    target = crop[wt : wt + p, wl : wl + p].astype(np.float32) / 255.0  # [P, P, 3]
    out = _passthrough(record)
    out.update(
        image=np.asarray(enc, np.float32),
        target=target,
        coord=fields.crop_grid(side, side, wt, wl, p, p),  # [P, P, 2]
        cell=fields.cell_size(side, side),  # [2]
        scale=np.float32(side / r),  # []
    )
    if self.with_box:
      out["box"] = np.asarray([top / h, left / w, side / h, side / w], np.float32)
    return out


def center_square(image: np.ndarray) -> np.ndarray:
  """The largest centred square of [H, W, C] (the whole image when it is square)."""
  h, w = image.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  return image[top : top + s, left : left + s]


def resized_window(image: np.ndarray, size, top: int, left: int, p: int) -> np.ndarray:
  """The window [top:top+p, left:left+p] of `image` resized to `size`, computed alone.

  Downsampling is the exact area filter, separable, so only the output rows and columns
  of the window and the input pixels under them are computed (a 256^2 window of a 1024^2
  image resized to 700 costs ~ p S^2 instead of S^2 r). Upscaling (bicubic) resizes the
  whole image first.

  Args:
    image: uint8 [S, S, 3].
    size: side of the virtual resized image, or its (height, width) (the square image is
      then stretched to that aspect ratio, as InfGen's targets are).
    top: first row of the window in the resized image.
    left: first column.
    p: window side.

  Returns:
    float32 [p, p, 3] in [0, 1].
  """
  s = image.shape[0]
  sh, sw = (size, size) if np.isscalar(size) else (int(size[0]), int(size[1]))
  if s < sh or s < sw:
    if sh == sw:
      full = resize_square(image, sh)
    else:
      full = np.asarray(Image.fromarray(image).resize((sw, sh), Image.BICUBIC), np.float32)
      full = np.clip(full / 255.0, 0.0, 1.0)
    return np.asarray(full[top : top + p, left : left + p], np.float32)
  my = fields.area_matrix(s, sh)[top : top + p]  # [p, S]
  mx = fields.area_matrix(s, sw)[left : left + p]  # [p, S]
  rows = np.flatnonzero(my.any(0))  # input rows under the window
  cols = np.flatnonzero(mx.any(0))
  y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
  sub = image[y0:y1, x0:x1].astype(np.float32)
  out = np.einsum("oh,hwc->owc", my[:, y0:y1], sub)
  out = np.einsum("pw,owc->opc", mx[:, x0:x1], out)
  return np.clip(out / 255.0, 0.0, 1.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class INFDPatch:
  """INFD's training example (METHODS.md: INFD; paper Sec. 4.2 "patch-wise decoding").

  Per record, with the image I made square first (its centred square: INFD's data are
  square, and the encoder sees "the whole image"; a non-square image loses the ends of
  its long side, as MultiResCrop's crops do):
    encoder input  I resized to enc_size (`resize_square`: area down, bicubic up);
    target side    r ~ U{enc_size .. min(S, r_max)} (S = the square's side), or
                   r = min(S, r_max) with `fix_r` (the paper's Fix-1024 ablation); an image
                   smaller than enc_size is upscaled and r = enc_size;
    target         a uniformly random patch x patch window of I resized to r;
    coord, cell    the window's pixel centres in the [-1, 1]^2 domain of the r x r image
                   (`fields.crop_grid(r, r, top, left, P, P)`) and cell (2 / r, 2 / r).
  Shapes are static whatever r is. Balancing of mixed-resolution data (the paper's
  `hires_fraction`) happens at the source: `infdiff.data.sources.balance_by_size`.

  Output: {'image': float32 [enc, enc, 3] in [0, 1], 'target': float32 [P, P, 3] in
  [0, 1], 'coord': float32 [P, P, 2], 'cell': float32 [2], 'scale': float32 [] (r / enc),
  'caption', 'id'}.
  """

  enc_size: int = 256  # encoder input side (INFD: 256)
  r_max: int = 1024  # largest target side (INFD: 1024)
  patch: int = 256  # supervised window side P (INFD: 256); P <= enc_size
  fix_r: bool = False  # r = min(S, r_max) always (Fix-1024 ablation)

  def __post_init__(self):
    if not 0 < self.patch <= self.enc_size <= self.r_max:
      raise ValueError(
          f"INFDPatch needs 0 < patch ({self.patch}) <= enc_size ({self.enc_size}) "
          f"<= r_max ({self.r_max})"
      )

  def target_side(self, short_side: int, rng: np.random.Generator) -> int:
    """r for an image whose square has side `short_side`."""
    hi = max(self.enc_size, min(short_side, self.r_max))
    if self.fix_r:
      return hi
    return int(rng.integers(self.enc_size, hi + 1))

  def __call__(self, record, rng: np.random.Generator, batch_rng: np.random.Generator):
    del batch_rng
    image = center_square(record["image"])  # [S, S, 3] uint8
    s = image.shape[0]
    r = self.target_side(s, rng)
    p = self.patch
    top = int(rng.integers(0, r - p + 1))
    left = int(rng.integers(0, r - p + 1))
    out = _passthrough(record)
    out.update(
        image=resize_square(image, self.enc_size),  # [enc, enc, 3]
        target=resized_window(image, r, top, left, p),  # [P, P, 3]
        coord=fields.crop_grid(r, r, top, left, p, p),  # [P, P, 2]
        cell=fields.cell_size(r, r),  # [2]
        scale=np.float32(r / self.enc_size),  # []
    )
    return out


@dataclasses.dataclass(frozen=True)
class FieldPatch:
  """A fixed-size encoder input and a window of the image at a random size and aspect
  (InfGen's training pairs: supplement Sec. III, "arbitrary resolutions and aspect ratios").

  Per record, with the image made square first (its centred square, like `INFDPatch`):
    encoder input  I resized to enc_size x enc_size (`resize_square`);
    target size    H ~ U{r_min .. r_max} (size_dist='log': log-uniform) and W = clip(round(H a), r_min, r_max) with
                   log a ~ U[-log max_aspect, log max_aspect]: the whole square stretched to
                   H x W (the encoder saw it squashed to a square, so the decoder restores
                   the aspect ratio). Sides are multiples of `align` (the decoder's factor);
    target         a uniformly random patch x patch window of I resized to H x W, its
                   origin on the `align` lattice (as tiles are at inference). A target
                   smaller than the window sits at its top left, zero beyond, and `valid`
                   marks its pixels (only when patch > r_min);
    coord, cell    the window's pixel centres in the [-1, 1]^2 domain of the H x W image
                   and cell (2 / H, 2 / W).
  Output: {'image': float32 [enc, enc, 3], 'target': float32 [P, P, 3] in [0, 1], 'coord':
  float32 [P, P, 2] (continuing the lattice past the border where the window overhangs),
  'cell': float32 [2], 'valid': bool [P, P] (patch > r_min only), 'caption', 'id'}.
  """

  enc_size: int = 512  # encoder input side (InfGen: 512)
  r_min: int = 256  # smallest target side
  r_max: int = 2048  # largest target side
  patch: int = 256  # supervised window side P (> r_min: small targets are padded)
  max_aspect: float = 2.0  # largest W / H or H / W of a target (1: square targets)
  align: int = 8  # target sides and window origins are multiples of this
  # H's law: 'uniform' over the allowed sides or 'log' (log-uniform: each octave of sizes
  # drawn equally often)
  size_dist: str = "uniform"

  def __post_init__(self):
    if self.size_dist not in ("uniform", "log"):
      raise ValueError(f"FieldPatch: size_dist must be 'uniform' or 'log', got {self.size_dist!r}")
    if not (0 < self.patch <= self.r_max and 0 < self.r_min <= self.r_max):
      raise ValueError(
          f"FieldPatch needs 0 < patch ({self.patch}) <= r_max ({self.r_max}) and "
          f"0 < r_min ({self.r_min}) <= r_max"
      )
    if self.patch % self.align or self.r_min % self.align:
      raise ValueError(
          f"FieldPatch: patch ({self.patch}) and r_min ({self.r_min}) must be multiples of "
          f"align ({self.align})"
      )
    if self.max_aspect < 1.0:
      raise ValueError(f"FieldPatch: max_aspect must be >= 1, got {self.max_aspect}")

  def target_size(self, rng: np.random.Generator) -> tuple[int, int]:
    """(H, W) of one target."""
    a = self.align
    lo, hi = self.r_min // a, self.r_max // a
    if self.size_dist == "log":  # sides in [lo - 1/2, hi + 1/2) on a log scale, rounded
      h = int(np.clip(round(np.exp(rng.uniform(np.log(lo - 0.5), np.log(hi + 0.5)))), lo, hi))
    else:
      h = int(rng.integers(lo, hi + 1))
    aspect = np.exp(rng.uniform(-np.log(self.max_aspect), np.log(self.max_aspect)))
    w = int(np.clip(round(h * aspect), lo, hi))
    return h * a, w * a

  def __call__(self, record, rng: np.random.Generator, batch_rng: np.random.Generator):
    del batch_rng
    image = center_square(record["image"])  # [S, S, 3] uint8
    h, w = self.target_size(rng)
    p, a = self.patch, self.align
    top = int(rng.integers(0, max(h - p, 0) // a + 1)) * a
    left = int(rng.integers(0, max(w - p, 0) // a + 1)) * a
    win = resized_window(image, (h, w), top, left, p)  # [min(P, H), min(P, W), 3]
    out = _passthrough(record)
    out.update(
        image=resize_square(image, self.enc_size),  # [enc, enc, 3]
        target=np.pad(win, ((0, p - win.shape[0]), (0, p - win.shape[1]), (0, 0))),
        coord=fields.crop_grid(h, w, top, left, p, p),  # [P, P, 2]
        cell=fields.cell_size(h, w),  # [2]
    )
    if p > self.r_min:  # the window may overhang a small target: mark its pixels
      valid = np.zeros((p, p), bool)
      valid[: win.shape[0], : win.shape[1]] = True
      out["valid"] = valid
    return out


@dataclasses.dataclass(frozen=True)
class RandomResizedSquare:
  """A random square crop resized to size x size (stage-2 style training images).

  The crop side is u * (short side) with u ~ U[min_scale, 1] (min_scale=1: the largest
  square) at a uniformly random position; it is area-downsampled to `size` (bicubic if it
  is smaller than `size`). Output: {'image': float32 [size, size, 3] in [0, 1], 'caption',
  'id'}.
  """

  size: int = 64  # output side
  min_scale: float = 1.0  # smallest crop side as a fraction of the short side

  def __call__(self, record, rng: np.random.Generator, batch_rng: np.random.Generator):
    del batch_rng
    image = record["image"]
    h, w = image.shape[:2]
    u = rng.uniform(self.min_scale, 1.0) if self.min_scale < 1.0 else 1.0
    side = max(1, round(u * min(h, w)))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    out = _passthrough(record)
    out["image"] = resize_square(image[top : top + side, left : left + side], self.size)
    return out


@dataclasses.dataclass(frozen=True)
class ResizeTo:
  """The whole image resized to height x width (aspect ratio not kept; Patch-DM's
  1024 x 512 training images), area filter down, bicubic up. Output as
  `RandomResizedSquare`'s.
  """

  height: int = 64
  width: int = 64

  def __call__(self, record, rng: np.random.Generator, batch_rng: np.random.Generator):
    del rng, batch_rng
    image = record["image"]
    h, w = image.shape[:2]
    if h >= self.height and w >= self.width:
      img = np.asarray(fields.area_downsample(image, self.height, self.width), np.float32)
    else:
      size = (self.width, self.height)
      img = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC), np.float32)
    out = _passthrough(record)
    out["image"] = np.clip(img / 255.0, 0.0, 1.0)
    return out


@dataclasses.dataclass(frozen=True)
class Tokenize:
  """Adds 'text_ids' and 'text_mask' (int32 [L]) from `tokenize(caption) -> (ids, mask)`.

  `tokenize` must return fixed-length arrays (pad/truncate inside it) so batches stack; it
  must be picklable when the pipeline uses worker processes.
  """

  tokenize: Callable[[str], tuple[Any, Any]]  # caption -> (ids [L], mask [L])

  def __call__(self, record, rng: np.random.Generator, batch_rng: np.random.Generator):
    del rng, batch_rng
    ids, mask = self.tokenize(record.get("caption", ""))
    out = dict(record)
    out["text_ids"] = np.asarray(ids, np.int32)
    out["text_mask"] = np.asarray(mask, np.int32)
    return out


@dataclasses.dataclass(frozen=True)
class ShapesSemantics:
  """Adds 'semantic' float32 [grid, grid, D]: `shapes.semantic_map` of the record's scene.

  For records of the built-in `shapes` source (their 'meta' JSON). Without a 'box' in the
  record the map covers the whole scene, so it must follow transforms that keep the whole
  square image (stage 2's `RandomResizedSquare` with min_scale 1). After a crop that
  reports its window (`MultiResCrop(with_box=True)`, stage 1) the map covers that window.
  """

  grid: int  # cells per side
  sub: int = 4  # coverage points per cell side

  def __call__(self, record, rng: np.random.Generator, batch_rng: np.random.Generator):
    del rng, batch_rng
    if "meta" not in record:
      raise ValueError(
          "the shapes semantic target needs scene metadata, which only data.source=shapes has"
      )
    scene = json.loads(record["meta"])
    if "box" in record:
      scene = shapes.crop_scene(scene, tuple(record["box"]))
    out = dict(record)
    out["semantic"] = shapes.semantic_map(scene, self.grid, self.sub)
    return out


@dataclasses.dataclass(frozen=True)
class Compose:
  """Applies transforms in order (each gets its own child generators)."""

  transforms: Sequence[Callable]  # applied first to last

  def __call__(self, record, rng: np.random.Generator, batch_rng: np.random.Generator):
    rngs = rng.spawn(len(self.transforms))
    brngs = batch_rng.spawn(len(self.transforms))
    for t, r, b in zip(self.transforms, rngs, brngs):
      record = t(record, r, b)
    return record


TRANSFORMS: dict[str, Callable[..., Any]] = {
    "multires_crop": MultiResCrop,
    "random_resized_square": RandomResizedSquare,
    "infd_patch": INFDPatch,
    "field_patch": FieldPatch,
}


def make_transform(name: str, **kwargs) -> Callable:
  """Builds a registered transform (`TRANSFORMS`) by name with its kwargs."""
  if name not in TRANSFORMS:
    raise ValueError(f"unknown transform {name!r}; known: {', '.join(sorted(TRANSFORMS))}")
  if "scales" in kwargs and kwargs["scales"] is not None:
    kwargs["scales"] = tuple(kwargs["scales"])
  return TRANSFORMS[name](**kwargs)
