"""A programmatic detector and GenEval-style scorer for the `shapes` dataset.

No networks: colour segmentation against the palette, connected components, and shape
classification by matching each component's soft silhouette against analytic templates
of every class (same area and centroid, rotation taken from the farthest silhouette
point, which for every polygonal class is a vertex). Works on images of any size.

Scoring rules per category (the captions always name colours; what is checked differs):
  single_object: an object of the named class is present (any colour).
  two_object:    both named classes are present (any colour).
  counting:      exactly the named number of objects of the named class and colour.
  colors:        an object of the named class has the named colour.
  position:      some pair (subject class, object class) has the named relation between
                 centroids (GenEval: offset along the axis above a threshold; classes only).
  color_attr:    every named (class, colour) pair is present.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from infdiff.data import shapes
from infdiff.fields import area_downsample

MIN_AREA_FRAC = 0.001  # components below this fraction of the image are noise
COLOUR_TOL = 0.25  # max RGB distance of a pixel from its colour/background mixing line
MIN_IOU = 0.6  # best template IoU below this leaves a component unclassified (None)
BG_FLOOR = 0.02  # RGB distance from the background treated as background
MAX_WINDOW = 48  # templates are matched on at most this many pixels per side
ANGLE_OFFSETS = np.deg2rad([-8.0, -4.0, 0.0, 4.0, 8.0])  # refine the vertex angle estimate
POSITION_THRESHOLD = 0.1  # min centroid offset (domain units, 5% of the width) for a relation
_SYMMETRY = {"square": 4, "triangle": 3, "star": 5}
_VERTEX_PHASE = {"square": math.pi / 4, "triangle": 0.0, "star": 0.0}  # vertex 0 at angle 0


def _as_float(image) -> np.ndarray:
  img = np.asarray(image)
  if img.dtype == np.uint8:
    return img.astype(np.float32) / 255.0
  return img.astype(np.float32)


def estimate_background(img: np.ndarray) -> np.ndarray:
  """Median colour of a thin border frame; objects rarely touch the border. Returns [3]."""
  h, w = img.shape[:2]
  b = max(1, round(0.02 * min(h, w)))
  frame = np.concatenate(
      [img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3), img[:, :b].reshape(-1, 3)]
      + [img[:, -b:].reshape(-1, 3)]
  )
  return np.median(frame, axis=0)


def segment(img: np.ndarray, bg: np.ndarray, palette: np.ndarray, tol: float = COLOUR_TOL):
  """Assign each pixel to a palette colour or to the background.

  An anti-aliased edge pixel is a mix `bg + a * (colour - bg)`, so each pixel is fitted
  to every colour's mixing segment; the colour with the smallest residual wins and the
  pixel is foreground when its mixing weight is at least one half.

  Args:
    img: [H, W, 3] in [0, 1].
    bg: [3] background colour.
    palette: [K, 3] colours.
    tol: largest residual accepted for a foreground pixel.

  Returns:
    (label [H, W] int, -1 for background; alpha [H, W, K] mixing weights).
  """
  h, w = img.shape[:2]
  d = (palette - bg).astype(np.float32)  # [K, 3]
  dd = np.sum(d * d, axis=-1)  # [K]
  v = (img - bg).astype(np.float32).reshape(-1, 3)  # [H*W, 3]
  vv = np.sum(v * v, axis=-1)  # [H*W]
  label = np.full(h * w, -1, np.int64)
  alpha = np.zeros((h * w, len(palette)), np.float32)
  # Pixels within the noise floor of the background carry (almost) no colour; skipping
  # them, most of a clean image, keeps 512 x 512 fast.
  cand = np.flatnonzero(vv > BG_FLOOR**2)
  vc = v[cand]  # [P, 3]
  # Three broadcast products instead of a [P, 3] x [3, K] matmul, which BLAS runs slowly
  # for such a thin inner dimension.
  vd = vc[:, :1] * d[:, 0] + vc[:, 1:2] * d[:, 1] + vc[:, 2:] * d[:, 2]  # [P, K]
  a = np.clip(vd / dd, 0.0, 1.0)
  # Squared distance to each mixing segment, expanded so no [P, K, 3] array is formed.
  r2 = vv[cand, None] - 2.0 * a * vd + a * a * dd
  k = np.argmin(r2, axis=-1)
  rows = np.arange(len(cand))
  fg = (a[rows, k] >= 0.5) & (r2[rows, k] < tol * tol)
  label[cand] = np.where(fg, k, -1)
  alpha[cand] = a
  label, alpha = label.reshape(h, w), alpha.reshape(h, w, -1)
  return label, alpha


def _classify(m: np.ndarray, rows: np.ndarray, cols: np.ndarray, cell, centroid):
  """Best-matching class of a soft silhouette m [h, w] on pixel centres rows x cols."""
  area = float(m.sum()) * cell[0] * cell[1]
  pr, pc = np.meshgrid(rows - centroid[0], cols - centroid[1], indexing="ij")
  solid = m >= 0.5
  if not solid.any():
    return None, 0.0
  dist = np.where(solid, np.hypot(pr, pc), -1.0)
  far = np.unravel_index(np.argmax(dist), dist.shape)
  vertex_angle = math.atan2(pc[far], -pr[far])  # angle convention of shapes._polygon_vertices
  best, best_iou = None, 0.0
  for cls in shapes.CLASSES:
    size = math.sqrt(area / shapes.unit_area(cls))
    if cls == "circle":
      angles = [0.0]
    else:
      angles = vertex_angle - _VERTEX_PHASE[cls] + ANGLE_OFFSETS
    for ang in angles:

      def sdf(p, cls=cls, size=size, ang=ang):
        return shapes.shape_sdf(p, cls, size, ang)

      t = shapes.coverage(sdf, rows - centroid[0], cols - centroid[1], cell, ss=1)
      iou = float(np.minimum(m, t).sum() / max(np.maximum(m, t).sum(), 1e-9))
      if iou > best_iou:
        best, best_iou = cls, iou
  return best, best_iou


def detect(
    image,
    min_area_frac: float = MIN_AREA_FRAC,
    tol: float = COLOUR_TOL,
    min_iou: float = MIN_IOU,
) -> list[dict[str, Any]]:
  """Find the coloured shapes in an image of any size.

  Args:
    image: [H, W, 3] float in [0, 1] or uint8.
    min_area_frac: drop components smaller than this fraction of the image.
    tol: colour tolerance (see `segment`).
    min_iou: template IoU needed to name a class; below it the class is None.

  Returns:
    A list of {'class': str | None, 'colour': str, 'centroid': [row, col] in [-1, 1],
    'area': fraction of the image, 'iou': template match}.
  """
  img = _as_float(image)[..., :3]
  h, w = img.shape[:2]
  bg = estimate_background(img)
  palette = np.asarray([shapes.PALETTE[c] for c in shapes.COLOURS], np.float32)
  label, alpha = segment(img, bg, palette, tol)
  eight = np.ones((3, 3), bool)
  min_px = max(4.0, min_area_frac * h * w)
  out = []
  for k, colour in enumerate(shapes.COLOURS):
    comps, n = ndimage.label(label == k, structure=eight)
    if n == 0:
      continue
    for ci, sl in enumerate(ndimage.find_objects(comps), start=1):
      if np.count_nonzero(comps[sl] == ci) < min_px:
        continue
      # Window: the component plus room for the templates of other classes, which may
      # reach further out (an equal-area triangle is 1.55x wider than a circle).
      pad = 2 + int(0.3 * max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start))
      r0, r1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, h)
      c0, c1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, w)
      comp = comps[r0:r1, c0:c1] == ci
      # Soft silhouette: the colour's mixing weight on the component and the ring of
      # anti-aliased pixels just outside it (weights below one half).
      ring = ndimage.binary_dilation(comp, structure=eight)
      m = np.where(ring, alpha[r0:r1, c0:c1, k], 0.0).astype(np.float32)  # [h', w']
      ii = np.arange(r0, r1, dtype=np.float64)
      jj = np.arange(c0, c1, dtype=np.float64)
      mass = float(m.sum())
      ci_r = float((m.sum(1) * ii).sum() / mass)
      ci_c = float((m.sum(0) * jj).sum() / mass)
      centroid = (-1.0 + (2.0 * ci_r + 1.0) / h, -1.0 + (2.0 * ci_c + 1.0) / w)
      # Match templates on a coarse grid for large components; area resampling keeps
      # the silhouette's mass and centroid.
      oh = min(r1 - r0, MAX_WINDOW)
      ow = min(c1 - c0, MAX_WINDOW)
      ms = area_downsample(m[..., None], oh, ow)[..., 0] if (oh, ow) != m.shape else m
      top, bottom = -1.0 + 2.0 * r0 / h, -1.0 + 2.0 * r1 / h
      left, right = -1.0 + 2.0 * c0 / w, -1.0 + 2.0 * c1 / w
      ccell = ((bottom - top) / oh, (right - left) / ow)
      rows = top + (np.arange(oh) + 0.5) * ccell[0]
      cols = left + (np.arange(ow) + 0.5) * ccell[1]
      cls, iou = _classify(ms, rows, cols, ccell, centroid)
      out.append(
          {
              "class": cls if iou >= min_iou else None,
              "colour": colour,
              "centroid": [centroid[0], centroid[1]],
              "area": mass / (h * w),
              "iou": iou,
          }
      )
  return out


def relation_holds(rel: str, a: Sequence[float], b: Sequence[float]) -> bool:
  """Whether centroid a (row, col) is `rel` ('left of', 'right of', 'above', 'below') b."""
  dr, dc = b[0] - a[0], b[1] - a[1]
  main = {"left of": dc, "right of": -dc, "above": dr, "below": -dr}[rel]
  return main > POSITION_THRESHOLD


def score_detections(dets: list[dict[str, Any]], metadata: dict[str, Any]) -> bool:
  """Apply the category's rule (module docstring) to detections of one image."""
  cat, objs = metadata["category"], metadata["objects"]

  def has(cls, colour=None):
    return any(d["class"] == cls and (colour is None or d["colour"] == colour) for d in dets)

  if cat == "single_object":
    return has(objs[0]["class"])
  if cat == "two_object":
    return has(objs[0]["class"]) and has(objs[1]["class"])
  if cat == "counting":
    c = metadata["counts"][0]
    n = sum(d["class"] == c["class"] and d["colour"] == c["colour"] for d in dets)
    return n == c["count"]
  if cat == "colors":
    return has(objs[0]["class"], objs[0]["colour"])
  if cat == "position":
    rel = metadata["relation"]
    sa, sb = objs[rel["subject"]]["class"], objs[rel["object"]]["class"]
    da = [d for d in dets if d["class"] == sa]
    db = [d for d in dets if d["class"] == sb]
    return any(
        relation_holds(rel["type"], a["centroid"], b["centroid"])
        for a in da
        for b in db
        if a is not b
    )
  if cat == "color_attr":
    return all(has(o["class"], o["colour"]) for o in objs)
  raise ValueError(f"unknown category {cat!r}")


def score(image, metadata: dict[str, Any]) -> bool:
  """Whether an image [H, W, 3] satisfies its prompt's metadata (a shapes scene dict)."""
  return score_detections(detect(image), metadata)


def shapes_eval(images_by_prompt: Sequence[Any], prompts: Sequence[tuple]) -> dict[str, Any]:
  """GenEval-style accuracy over prompts from `shapes.eval_prompts`.

  Args:
    images_by_prompt: aligned with `prompts`; each entry one image [H, W, 3] or several
      ([S, H, W, 3] or a list of images), any size.
    prompts: (category, caption, metadata) tuples.

  Returns:
    {'per_category': {category: accuracy over its images}, 'overall': mean of the
    per-category accuracies (as GenEval's overall score), 'num_images': int}.
  """
  if len(images_by_prompt) != len(prompts):
    raise ValueError(f"{len(images_by_prompt)} image entries for {len(prompts)} prompts")
  hits: dict[str, list[bool]] = {}
  for images, (cat, _, meta) in zip(images_by_prompt, prompts):
    if hasattr(images, "shape") and len(images.shape) == 3:  # one [H, W, 3] image
      images = [images]
    for img in images:
      hits.setdefault(cat, []).append(score(np.asarray(img), meta))
  per_cat = {c: float(np.mean(v)) for c, v in hits.items()}
  overall = float(np.mean(list(per_cat.values()))) if per_cat else 0.0
  return {"per_category": per_cat, "overall": overall, "num_images": sum(map(len, hits.values()))}
