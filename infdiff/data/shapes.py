"""The built-in `shapes` dataset: analytic scenes of coloured shapes at any resolution.

A scene is a small JSON-serialisable dict (objects with class, colour, centre, size and
angle, a background colour, a GenEval-style category and a caption). `render_scene`
turns it into pixels at ANY size: every pixel is the average of the continuous scene
over the pixel's footprint (exact signed distances decide which pixels are wholly
inside or outside a shape; the few pixels an edge crosses are supersampled), so a large
render area-downsampled to a small size matches the small render.

Categories follow GenEval's six: single object, two objects, counting, colours,
position, colour attribution. Captions always name colours ("a red circle", "three
yellow stars", "a red circle to the left of a blue square"); the categories differ in
what `infdiff.evaluators.shapes_detector.score` checks.

Coordinates follow METHODS.md: domain [-1, 1]^2, points are (row, col), row -1 is the
top edge and col -1 the left edge.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

# Shape classes. Chosen so that a detector can tell them apart from silhouettes alone at
# 64 x 64: a round one, two convex polygons with very different corner angles and a
# non-convex star.
CLASSES = ("circle", "square", "triangle", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}

# Named palette (RGB in [0, 1]). Saturated or dark colours, far from each other and from
# the light neutral backgrounds; white is left out because it would vanish on them.
PALETTE = {
    "red": (0.86, 0.08, 0.08),
    "green": (0.08, 0.62, 0.16),
    "blue": (0.10, 0.24, 0.90),
    "yellow": (0.96, 0.84, 0.06),
    "purple": (0.52, 0.14, 0.70),
    "orange": (1.00, 0.52, 0.00),
    "black": (0.06, 0.06, 0.06),
}
COLOURS = tuple(PALETTE)

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
SPLITS = {"train": 0, "eval": 1}
_PROMPT_STREAM = 2  # seeds eval_prompts; differs from every split id, so never overlaps.

STAR_INNER = 0.5  # inner/outer radius of the 5-point star; fatter than a pentagram (0.38)
# so the arms stay several pixels wide at 64 x 64.
# Scale of each class's circumradius relative to the sampled size, so that classes with
# less area inside their circumcircle (triangle 41%, star 47%) are not much smaller.
CLASS_SCALE = {"circle": 1.0, "square": 1.05, "triangle": 1.3, "star": 1.3}
SIZE_RANGE = (0.15, 0.27)  # sampled base size (domain units) before CLASS_SCALE
MARGIN = 0.1  # minimum gap between two shapes' circumcircles (domain units)
BORDER = 0.06  # minimum gap between a circumcircle and the domain edge
SUPERSAMPLE = 8  # per-axis subsamples in pixels that an edge crosses


def _polygon_vertices(cls: str, size: float, angle: float) -> np.ndarray:
  """Vertices [N, 2] (row, col) of a polygonal class around the origin, circumradius size."""
  if cls == "square":
    n, radii, start = 4, [1.0], math.pi / 4  # axis-aligned sides at angle 0
  elif cls == "triangle":
    n, radii, start = 3, [1.0], 0.0  # apex up at angle 0
  elif cls == "star":
    n, radii, start = 10, [1.0, STAR_INNER], 0.0  # a point up at angle 0
  else:
    raise ValueError(f"no polygon for class {cls!r}")
  k = np.arange(n)
  a = start + angle + 2.0 * np.pi * k / n
  r = size * np.asarray(radii)[k % len(radii)]
  # Angle 0 points to the top (row -1), increasing clockwise on screen.
  return np.stack([-r * np.cos(a), r * np.sin(a)], axis=-1)


def unit_area(cls: str) -> float:
  """Area of a class's shape with circumradius 1."""
  if cls == "circle":
    return math.pi
  if cls == "star":
    return 5.0 * STAR_INNER * math.sin(math.pi / 5)  # ten triangles (1, inner, 36 deg)
  n = {"square": 4, "triangle": 3}[cls]
  return 0.5 * n * math.sin(2.0 * math.pi / n)


def polygon_sdf(p: np.ndarray, verts: np.ndarray) -> np.ndarray:
  """Exact signed distance from points p [..., 2] to a simple polygon verts [N, 2].

  Negative inside. Distance is the minimum over edges; the sign comes from an even-odd
  crossing test, so it also holds for non-convex polygons (the star).
  """
  d2 = np.full(p.shape[:-1], np.inf, dtype=p.dtype)
  inside = np.zeros(p.shape[:-1], dtype=bool)
  n = len(verts)
  for i in range(n):
    a, b = verts[i], verts[i - 1]
    e = b - a
    w = p - a
    t = np.clip((w[..., 0] * e[0] + w[..., 1] * e[1]) / (e @ e), 0.0, 1.0)
    dr, dc = w[..., 0] - e[0] * t, w[..., 1] - e[1] * t
    d2 = np.minimum(d2, dr * dr + dc * dc)
    # The edge crosses the horizontal ray through p (along +col) to the right of p.
    up = p[..., 0] >= a[0]
    down = p[..., 0] < b[0]
    right = e[0] * w[..., 1] > e[1] * w[..., 0]
    inside ^= (up & down & right) | (~up & ~down & ~right)
  return np.where(inside, -1.0, 1.0).astype(p.dtype) * np.sqrt(d2)


def shape_sdf(p: np.ndarray, cls: str, size: float, angle: float = 0.0) -> np.ndarray:
  """Signed distance of points p [..., 2] (relative to the shape's centre) to a shape."""
  if cls == "circle":
    return np.sqrt(p[..., 0] ** 2 + p[..., 1] ** 2) - size
  return polygon_sdf(p, _polygon_vertices(cls, size, angle).astype(p.dtype))


def coverage(
    sdf_fn, rows: np.ndarray, cols: np.ndarray, cell: tuple[float, float], ss: int = SUPERSAMPLE
) -> np.ndarray:
  """Fraction of each pixel's footprint inside a shape. Returns [len(rows), len(cols)].

  Args:
    sdf_fn: maps points [..., 2] (row, col) to exact signed distances.
    rows, cols: pixel-centre coordinates of the grid.
    cell: (cell_h, cell_w), the pixel footprint in domain units.
    ss: subsamples per axis inside pixels that an edge may cross; 1 uses a linear
      ramp across each pixel instead (cheaper, less exact).
  """
  ch, cw = cell
  p = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1)  # [h, w, 2]
  d = sdf_fn(p)
  if ss <= 1:
    # Linear ramp across the pixel only: cheap, exact for straight edges along an axis.
    return np.clip(0.5 - d / math.sqrt(ch * cw), 0.0, 1.0).astype(np.float32)
  # With an exact distance, |d| beyond the half-diagonal means the whole pixel lies on
  # one side of the boundary, so only the thin band of edge pixels needs supersampling.
  cov = (d < 0).astype(np.float32)
  edge = np.abs(d) < 0.5 * math.hypot(ch, cw)
  if not edge.any():
    return cov
  offs = (np.arange(ss) + 0.5) / ss - 0.5
  sub = np.stack(np.meshgrid(offs * ch, offs * cw, indexing="ij"), -1).reshape(-1, 2)
  q = p[edge][:, None, :] + sub[None].astype(p.dtype)  # [E, ss*ss, 2]
  ds = sdf_fn(q)
  # Each subsample is itself a small box; a linear ramp across its width is its coverage
  # for a straight edge, which removes most of the residual staircase error.
  ramp = math.sqrt(ch * cw) / ss
  cov[edge] = np.clip(0.5 - ds / ramp, 0.0, 1.0).mean(-1)
  return cov


def render_scene(
    scene: dict[str, Any], h: int, w: int, crop: tuple[int, int, int, int] | None = None
) -> np.ndarray:
  """Render a scene at h x w (any size) as float32 [h, w, 3] in [0, 1].

  Args:
    scene: a dict from `sample_scene`.
    h, w: the full output grid.
    crop: optional (top, left, crop_h, crop_w) window of the h x w grid; the result is
      then [crop_h, crop_w, 3] and equals that window of the full render.

  Returns:
    The rendered image; each pixel is the scene averaged over its footprint.
  """
  top, left, oh, ow = crop if crop is not None else (0, 0, h, w)
  bg = np.asarray(scene["background"], np.float32)
  img = np.broadcast_to(bg, (oh, ow, 3)).copy()  # [oh, ow, 3]
  cell = (2.0 / h, 2.0 / w)
  for obj in scene["objects"]:
    cr, cc = obj["centre"]
    size = obj["size"]
    # Pixels whose footprint can touch the circumcircle: a window, not the whole image.
    pad = 1.0
    r0 = max(int(math.floor((cr - size + 1.0) / cell[0] - pad)), top)
    r1 = min(int(math.ceil((cr + size + 1.0) / cell[0] + pad)), top + oh)
    c0 = max(int(math.floor((cc - size + 1.0) / cell[1] - pad)), left)
    c1 = min(int(math.ceil((cc + size + 1.0) / cell[1] + pad)), left + ow)
    if r1 <= r0 or c1 <= c0:
      continue
    rows = (-1.0 + (2.0 * np.arange(r0, r1) + 1.0) / h - cr).astype(np.float64)
    cols = (-1.0 + (2.0 * np.arange(c0, c1) + 1.0) / w - cc).astype(np.float64)

    def sdf(p, obj=obj):
      return shape_sdf(p, obj["class"], obj["size"], obj.get("angle", 0.0))

    cov = coverage(sdf, rows, cols, cell)
    rgb = np.asarray(PALETTE[obj["colour"]], np.float32)
    # Shapes never overlap, so each pixel mixes the background with at most one colour.
    img[r0 - top : r1 - top, c0 - left : c1 - left] += cov[..., None] * (rgb - bg)
  return np.clip(img, 0.0, 1.0)


# Per-cell semantic features of a scene (`semantic_map`): what a self-supervised teacher
# such as DINOv2 gives a denoiser to align with (REPA), computed from the scene itself.
SEMANTIC_FEATURES = (
    ("background",)
    + tuple(f"class:{c}" for c in CLASSES)
    + tuple(f"colour:{k}" for k in COLOURS)
    + ("offset:row", "offset:col")
)
SEMANTIC_DIM = len(SEMANTIC_FEATURES)


def semantic_indices(groups) -> list[int]:
  """Indices of the `SEMANTIC_FEATURES` in the named groups ('background', 'class',
  'colour', 'offset'; a feature 'g:x' is in group g); empty groups select every feature."""
  if not groups:
    return list(range(SEMANTIC_DIM))
  known = {name.split(":")[0] for name in SEMANTIC_FEATURES}
  unknown = sorted(set(groups) - known)
  if unknown:
    raise ValueError(f"unknown semantic feature group(s) {unknown}; use {sorted(known)}")
  return [i for i, name in enumerate(SEMANTIC_FEATURES) if name.split(":")[0] in groups]


def crop_scene(scene: dict[str, Any], box: tuple[float, float, float, float]) -> dict[str, Any]:
  """The scene seen through a window: the window becomes the whole [-1, 1]^2 domain.

  Args:
    scene: a dict from `sample_scene`.
    box: (top, left, height, width) of the window as fractions of the scene's side.

  Returns:
    A scene dict whose `render_scene` and `semantic_map` equal those of the window of the
    original (objects are moved and scaled; ones outside the window are clipped by the
    renderers as usual).
  """
  top, left, bh, bw = (float(v) for v in box)
  if not (bh > 0 and bw > 0):
    raise ValueError(f"crop box {box} has no area")
  if abs(bh - bw) > 1e-6:
    raise ValueError(f"crop box {box} is not square: shapes would be stretched")
  centre = (-1.0 + 2.0 * top + bh, -1.0 + 2.0 * left + bw)  # window centre in the domain
  out = dict(scene)
  out["objects"] = [
      {
          **obj,
          "centre": [(obj["centre"][0] - centre[0]) / bh, (obj["centre"][1] - centre[1]) / bw],
          "size": obj["size"] / bh,
      }
      for obj in scene["objects"]
  ]
  return out


def semantic_map(scene: dict[str, Any], grid: int, sub: int = 4) -> np.ndarray:
  """Analytic per-cell semantics of a scene on a grid x grid partition of the domain.

  Each cell's vector (`SEMANTIC_FEATURES`) holds the fraction of the cell that is
  background, the fraction covered by each class and by each colour, and the
  coverage-weighted offset of the cell from its object's centre in units of the object's
  size (where in the object the cell lies: a tip of a star's arm, the flat side of a
  square). Coverage is measured on sub x sub points per cell with a linear edge ramp.

  Returns:
    float32 [grid, grid, SEMANTIC_DIM].
  """
  n = grid * sub
  centres = -1.0 + (2.0 * np.arange(n) + 1.0) / n  # fine-grid pixel centres
  cell = (2.0 / n, 2.0 / n)
  fine = np.zeros((n, n, SEMANTIC_DIM), np.float32)
  covered = np.zeros((n, n), np.float32)
  for obj in scene["objects"]:
    cr, cc = obj["centre"]
    size = float(obj["size"])

    def sdf(p, obj=obj):
      return shape_sdf(p, obj["class"], obj["size"], obj.get("angle", 0.0))

    cov = coverage(sdf, centres - cr, centres - cc, cell, ss=1)  # [n, n]
    covered += cov
    fine[..., 1 + CLASSES.index(obj["class"])] += cov
    fine[..., 1 + len(CLASSES) + COLOURS.index(obj["colour"])] += cov
    fine[..., -2] += cov * (centres[:, None] - cr) / size
    fine[..., -1] += cov * (centres[None, :] - cc) / size
  fine[..., 0] = np.clip(1.0 - covered, 0.0, 1.0)
  return fine.reshape(grid, sub, grid, sub, SEMANTIC_DIM).mean(axis=(1, 3))


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _phrase(obj: dict[str, Any]) -> str:
  return f"{_article(obj['colour'])} {obj['colour']} {obj['class']}"


def caption(scene: dict[str, Any]) -> str:
  """The caption of a scene, e.g. "a red circle to the left of a blue square"."""
  cat, objs = scene["category"], scene["objects"]
  if cat in ("single_object", "colors"):
    return _phrase(objs[0])
  if cat in ("two_object", "color_attr"):
    return f"{_phrase(objs[0])} and {_phrase(objs[1])}"
  if cat == "counting":
    c = scene["counts"][0]
    return f"{NUMBER_WORDS[c['count']]} {c['colour']} {PLURALS[c['class']]}"
  if cat == "position":
    rel = scene["relation"]
    a, b = objs[rel["subject"]], objs[rel["object"]]
    word = {"left of": "to the left of", "right of": "to the right of"}.get(
        rel["type"], rel["type"]
    )
    return f"{_phrase(a)} {word} {_phrase(b)}"
  raise ValueError(f"unknown category {cat!r}")


def _fits(centre, size, placed) -> bool:
  if np.any(np.abs(centre) > 1.0 - size - BORDER):
    return False
  return all(np.hypot(*(centre - c)) >= size + s + MARGIN for c, s in placed)


def _place(rng: np.random.Generator, sizes: list[float], accept=None, tries: int = 200):
  """Rejection-sample non-overlapping centres; shrinks all sizes when crowded."""
  sizes = list(sizes)
  for _ in range(20):
    for _ in range(tries):
      placed = []
      for s in sizes:
        for _ in range(50):
          c = rng.uniform(-1.0 + s + BORDER, 1.0 - s - BORDER, size=2)
          if _fits(c, s, placed):
            placed.append((c, s))
            break
        else:
          break
      if len(placed) == len(sizes) and (accept is None or accept([c for c, _ in placed])):
        return [c for c, _ in placed], sizes
    sizes = [0.9 * s for s in sizes]
  raise RuntimeError("could not place the shapes; the sizes are too large")


def _relation_holds(rel: str, a, b) -> bool:
  """Whether centre a is `rel` centre b, with a clearly dominant axis (sampling)."""
  dr, dc = b[0] - a[0], b[1] - a[1]
  main, other = {"left of": (dc, dr), "right of": (-dc, dr), "above": (dr, dc)}.get(rel, (-dr, dc))
  return main >= 0.4 and abs(other) <= 0.5 * main


def sample_scene(
    rng: np.random.Generator, category: str | None = None, rotate: bool = False
) -> dict[str, Any]:
  """Draw a random scene.

  Args:
    rng: numpy generator; the scene is a deterministic function of its state.
    category: one of CATEGORIES, or None for a uniformly random one.
    rotate: give every shape a random rotation (otherwise squares are axis-aligned,
      triangles and stars point up).

  Returns:
    A JSON-serialisable dict: category, caption, background [3], objects (class,
    colour, centre [row, col], size = circumradius, angle in radians), relation
    ({subject, object, type} or None) and counts (expected {class, colour, count}).
  """
  if category is None:
    category = CATEGORIES[rng.integers(len(CATEGORIES))]
  if category not in CATEGORIES:
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")

  def classes(n, distinct):
    return list(rng.choice(CLASSES, size=n, replace=not distinct))

  def colours(n, distinct):
    return list(rng.choice(COLOURS, size=n, replace=not distinct))

  relation = None
  accept = None
  if category in ("single_object", "colors"):
    cls, col = classes(1, True), colours(1, True)
  elif category == "two_object":
    cls, col = classes(2, True), colours(2, False)
  elif category == "color_attr":
    cls, col = classes(2, True), colours(2, True)
  elif category == "counting":
    n = int(rng.integers(2, 5))
    cls, col = classes(1, True) * n, colours(1, True) * n
  else:  # position
    cls, col = classes(2, True), colours(2, False)
    rel = RELATIONS[rng.integers(len(RELATIONS))]
    relation = {"subject": 0, "object": 1, "type": rel}
    accept = lambda cs: _relation_holds(rel, cs[0], cs[1])

  base = rng.uniform(*SIZE_RANGE, size=len(cls))
  if category == "counting" and len(cls) > 2:
    base = base * 0.85  # room for up to four shapes
  sizes = [float(b * CLASS_SCALE[c]) for b, c in zip(base, cls)]
  centres, sizes = _place(rng, sizes, accept)
  angles = rng.uniform(0.0, 2.0 * np.pi, size=len(cls)) if rotate else np.zeros(len(cls))

  # Light neutral background with a faint tint, so colours stay far from it.
  grey = rng.uniform(0.78, 0.92)
  background = np.clip(grey + rng.uniform(-0.03, 0.03, size=3), 0.0, 1.0)
  objects = [
      {
          "class": str(c),
          "colour": str(k),
          "centre": [round(float(x), 6) for x in centre],
          "size": round(float(s), 6),
          "angle": round(float(a), 6),
      }
      for c, k, centre, s, a in zip(cls, col, centres, sizes, angles)
  ]
  counts: dict[tuple[str, str], int] = {}
  for o in objects:
    counts[(o["class"], o["colour"])] = counts.get((o["class"], o["colour"]), 0) + 1
  scene = {
      "category": category,
      "background": [round(float(x), 6) for x in background],
      "objects": objects,
      "relation": relation,
      "counts": [{"class": c, "colour": k, "count": n} for (c, k), n in counts.items()],
  }
  scene["caption"] = caption(scene)
  return scene


def _item_rng(seed: int, stream: int, i: int) -> np.random.Generator:
  return np.random.default_rng([seed, stream, i])


class ShapesSource:
  """Random-access source of shapes scenes for grain (`__len__`, `__getitem__`).

  Item i of a split is a deterministic function of (seed, split, i); the 'eval' split
  draws from a different seed stream than 'train', so the two never share scenes.
  Items are {'image': uint8 [size, size, 3], 'caption': str, 'id': 'shapes/<split>/<i>',
  'meta': the scene dict as a JSON string}.

  Args:
    size: output side in pixels.
    num_scenes: number of items.
    seed: dataset seed.
    split: 'train' or 'eval'.
    rotate: random shape rotations (see `sample_scene`).
    categories: the categories scenes are drawn from, uniformly (default: all six of
      CATEGORIES), e.g. ('single_object',) to train on one GenEval category.
  """

  def __init__(
      self,
      size: int = 64,
      num_scenes: int = 10000,
      seed: int = 0,
      split: str = "train",
      rotate: bool = False,
      categories: tuple[str, ...] | None = None,
  ):
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
    categories = CATEGORIES if categories is None else tuple(categories)
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
      raise ValueError(
          f"shapes categories {list(categories)}: expected a non-empty subset of {CATEGORIES}"
      )
    if int(num_scenes) < 1:
      raise ValueError(f"shapes num_scenes must be positive, got {num_scenes}")
    self.size = size
    self.num_scenes = int(num_scenes)
    self.seed = seed
    self.split = split
    self.rotate = rotate
    self.categories = categories

  def __len__(self) -> int:
    return self.num_scenes

  def scene(self, i: int) -> dict[str, Any]:
    """The scene dict of item i, to re-render it at any size."""
    if not 0 <= i < self.num_scenes:
      raise IndexError(f"index {i} out of range for {self.num_scenes} scenes")
    rng = _item_rng(self.seed, SPLITS[self.split], int(i))
    # The same draw sample_scene makes for category=None, so all six give the same scenes.
    category = self.categories[rng.integers(len(self.categories))]
    return sample_scene(rng, category, rotate=self.rotate)

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    scene = self.scene(i)
    img = render_scene(scene, self.size, self.size)
    return {
        "image": np.round(img * 255.0).astype(np.uint8),  # [size, size, 3]
        "caption": scene["caption"],
        "id": f"shapes/{self.split}/{i}",
        "meta": json.dumps(scene),
    }

  def __repr__(self) -> str:
    return (
        f"ShapesSource(size={self.size}, num_scenes={self.num_scenes}, seed={self.seed}, "
        f"split={self.split!r}, rotate={self.rotate}, categories={self.categories})"
    )


def eval_prompts(
    num_per_category: int, seed: int = 0, rotate: bool = False
) -> list[tuple[str, str, dict[str, Any]]]:
  """Held-out prompts for ShapesEval, `num_per_category` of each category.

  Drawn from their own seed stream, disjoint from both ShapesSource splits.

  Returns:
    A list of (category, caption, metadata); the metadata is the full scene dict, so
    the ground truth can be rendered with `render_scene` at any size.
  """
  out = []
  for ci, cat in enumerate(CATEGORIES):
    for i in range(num_per_category):
      rng = np.random.default_rng([seed, _PROMPT_STREAM, ci, i])
      scene = sample_scene(rng, cat, rotate=rotate)
      out.append((cat, scene["caption"], scene))
  return out
