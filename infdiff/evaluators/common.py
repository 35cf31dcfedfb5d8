"""Pieces shared by the evaluators: held-out data, stage-1 wrappers, results and tables.

Every evaluator module (recon, scale_consistency, shapes_eval, swd, fid) has
  `cli(args: EvalArgs) -> Result`   what `python -m infdiff.evaluate` runs on a run directory;
  `class Evaluator(ecfg)`           `.run(ctx, step) -> {name: float}` during training.
A `Result` is a small table (rows x columns of floats) plus metadata; the CLI prints it
and writes it as JSON, the trainer logs its flattened scalars `<metric>/<row>/<col>`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from infdiff import cli as cli_lib
from infdiff import runs
from infdiff.data import pipeline as data_pipeline
from infdiff.data import sources as sources_lib
from infdiff.evaluators import metrics
from infdiff.fields import area_downsample
from infdiff.methods import base

DEFAULT_TILE = 128  # render tile side: static shape, so any output size compiles once
DEFAULT_BATCH = 8  # images per compiled feature call (last batch padded)

# Held-out split candidates per source scheme, tried in order. File sources hold out a
# hash split ('eval'); a folder too small to hold any image out (the 9 built-in photos at
# the default eval_fraction) falls back to every file, with a warning.
_HELD_OUT = {"shapes": ("eval",), "tfds": ("validation", "test", "train")}
_FILE_HELD_OUT = ("eval", "all")


@dataclasses.dataclass
class EvalArgs:
  """What the evaluate CLI passes to a metric's `cli` (flags, already validated)."""

  workdir: str  # run directory (one subdirectory per trained stage) or a stage directory
  metric: str  # metric name as given on the command line
  sizes: list[tuple[int, int]]  # output sizes (W, H); [] = the metric's default
  data: str | None = None  # data source string (None: the run's config.data.source)
  num: int | None = None  # images (per category for shapes_eval); None: metric default
  seed: int = 0  # seeds crops, noise and projections
  inception: str | None = None  # FID Inception checkpoint directory
  clip: str | None = None  # CLIP checkpoint directory
  lpips: str | None = None  # VGG16-LPIPS checkpoint directory
  patch: int = 64  # pFID crop side P
  crops_per_image: int = 4  # pFID crops per image
  tile: int = DEFAULT_TILE  # render tile side
  step: int | None = None  # checkpoint step; None: the newest readable one
  # Sampler options for the run's generator (e.g. {'deblur': True}); {} = the run's config.
  sampler_options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Result:
  """A metric's numbers as a table: rows[row][col] = value (NaN where not defined)."""

  metric: str
  rows: dict[str, dict[str, float]]
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # protocol, sizes, counts
  note: str = ""  # one line printed under the table

  def columns(self) -> list[str]:
    cols: list[str] = []
    for r in self.rows.values():
      cols += [c for c in r if c not in cols]
    return cols

  def scalars(self, prefix: str | None = None) -> dict[str, float]:
    """Flat {prefix/row/col: value} of the finite entries (for TensorBoard and logs)."""
    prefix = self.metric if prefix is None else prefix
    return {
        f"{prefix}/{r}/{c}": float(v)
        for r, cols in self.rows.items()
        for c, v in cols.items()
        if v is not None and math.isfinite(v)
    }

  def to_json(self) -> dict[str, Any]:
    """Strict JSON: a non-finite value (PSNR of an identical image) becomes null."""

    def clean(v):
      return float(v) if v is not None and math.isfinite(v) else None

    rows = {r: {c: clean(v) for c, v in cols.items()} for r, cols in self.rows.items()}
    out = {"metric": self.metric, "rows": rows, "columns": self.columns(), **self.meta}
    return {**out, "note": self.note} if self.note else out

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> Result:
    """The inverse of `to_json` (null values back to NaN)."""
    nan = float("nan")
    rows = {
        r: {c: nan if v is None else v for c, v in cols.items()} for r, cols in d["rows"].items()
    }
    meta = {k: v for k, v in d.items() if k not in ("metric", "rows", "columns", "note")}
    return cls(d["metric"], rows, meta, d.get("note", ""))

  def table(self) -> str:
    """The rows as a fixed-width text table."""
    cols = self.columns()
    first = max([len(self.metric)] + [len(r) for r in self.rows])
    widths = [max(len(c), 9) for c in cols]

    def fmt(v):
      if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
      return "inf" if math.isinf(v) else f"{v:.4f}"

    lines = ["  ".join([self.metric.ljust(first)] + [c.rjust(w) for c, w in zip(cols, widths)])]
    for r, vals in self.rows.items():
      cells = [fmt(vals.get(c)).rjust(w) for c, w in zip(cols, widths)]
      lines.append("  ".join([r.ljust(first)] + cells))
    if self.note:
      lines.append(self.note)
    return "\n".join(lines)


def write_result(workdir: str, result: Result, name: str | None = None) -> str:
  """Writes `workdir/eval/<name or metric>.json`; returns the path."""
  path = os.path.join(workdir, "eval", f"{name or result.metric}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result.to_json(), f, indent=1, allow_nan=False)
  os.replace(tmp, path)  # readers never see a half-written file
  return path


def log_scalars(stage: str, step: int, scalars: dict[str, float]) -> None:
  text = ", ".join(f"{k} {v:.4g}" for k, v in sorted(scalars.items()))
  logging.info("[%s] eval at step %d: %s", stage, step, text)


class PeriodicEvaluator:
  """Shared part of the `Evaluator`s that `config.evals` runs during training.

  Reads `every`, `num` and `seed` from the evaluator config, opens the held-out source
  once, and logs/returns the scalars of the `Result` that a subclass's `evaluate(ctx)`
  computes.
  """

  default_num = 8  # images per evaluation when the config gives no `num`

  def __init__(self, ecfg):
    self.ecfg = ecfg
    self.every = int(ecfg_get(ecfg, "every", 0))
    self.num = int(ecfg_get(ecfg, "num", self.default_num))
    self.seed = int(ecfg_get(ecfg, "seed", 0))
    self._source = None

  def source(self, ctx):
    """The held-out data source of the run, built on first use."""
    if self._source is None:
      self._source = held_out_source(ctx.config.data)
    return self._source

  def evaluate(self, ctx):
    raise NotImplementedError

  def run(self, ctx, step: int) -> dict[str, float]:
    scalars = {k: float(np.asarray(v)) for k, v in self.evaluate(ctx).scalars().items()}
    log_scalars(ctx.method.stage, step, scalars)
    return scalars


# ---------------------------------------------------------------------------------------
# Sizes and run directories.

parse_size = cli_lib.parse_size


def size_name(wh: tuple[int, int]) -> str:
  return f"{wh[0]}x{wh[1]}"


def run_data_config(workdir: str, source: str | None = None) -> ml_collections.ConfigDict:
  """The run's data config (its config.json), with `source` overriding."""
  return with_source(runs.run_config(workdir).data, source)


def with_source(data_cfg, source: str | None) -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict(
      data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
  )
  if source:
    data.source = source
    if source.partition(":")[0] != str(data_cfg["source"]).partition(":")[0]:
      data.source_kwargs = ml_collections.ConfigDict()  # options of the other source
  return data


# ---------------------------------------------------------------------------------------
# Held-out data.


def held_out_source(data_cfg):
  """The held-out split of a data config: 'eval' (shapes, hash split of files).

  A file source whose hash split holds no image out falls back to split='all' with a
  logged warning (the evaluation then overlaps the training images).
  """
  scheme = str(data_cfg["source"]).partition(":")[0]
  splits = _HELD_OUT.get(scheme, _FILE_HELD_OUT)
  last_error = None
  for i, split in enumerate(splits):
    try:
      src = data_pipeline.source_from_config(data_cfg, split=split)
    except ValueError as e:
      # Only an empty split moves on to the next candidate; other errors are the user's.
      empty = scheme == "tfds" or "no valid image" in str(e)
      if scheme == "shapes" or not empty:
        raise
      last_error = e
      continue
    if len(src):
      if i:
        logging.warning(
            "data source %s has no held-out images in split %r; evaluating on split %r "
            "(overlaps training data)",
            data_cfg["source"],
            splits[0],
            split,
        )
      return src
  raise ValueError(f"data source {data_cfg['source']} has no image to evaluate on: {last_error}")


def _decode(source, i: int) -> np.ndarray:
  rec = sources_lib.load_record(
      source[i],
      min_size=getattr(source, "min_size", 1),
      max_pixels=getattr(source, "max_pixels", 1 << 26),
  )
  return np.asarray(rec["image"], np.float32)[..., :3] / 255.0  # [H, W, 3]


def resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
  """[H, W, 3] -> [h, w, 3]: exact area average when shrinking, bicubic when enlarging."""
  if img.shape[:2] == (h, w):
    return img.astype(np.float32)
  if h <= img.shape[0] and w <= img.shape[1]:
    return np.asarray(area_downsample(img, h, w))
  return np.asarray(metrics.bicubic_upsample(img, h, w))


def square_crop(source, i: int, side: int, rng: np.random.Generator) -> np.ndarray:
  """A side x side crop of held-out image i, float32 [side, side, 3] in [0, 1].

  Shapes scenes are rendered directly at side x side (the whole scene; the analytic
  renderer is exact at any size). Other images get a random side x side crop; an image
  whose short side is under `side` is first enlarged (bicubic) to that short side.
  """
  if hasattr(source, "scene"):
    from infdiff.data import shapes

    return shapes.render_scene(source.scene(i), side, side)
  img = _decode(source, i)
  h, w = img.shape[:2]
  if min(h, w) < side:
    s = side / min(h, w)
    h, w = max(side, round(h * s)), max(side, round(w * s))
    img = resize(img, h, w)
  top = int(rng.integers(0, h - side + 1))
  left = int(rng.integers(0, w - side + 1))
  return img[top : top + side, left : left + side]


def full_image(source, i: int, h: int, w: int) -> np.ndarray:
  """Held-out image i at h x w: centre crop to the aspect ratio, then resize. [h, w, 3]."""
  if hasattr(source, "scene"):
    from infdiff.data import shapes

    return shapes.render_scene(source.scene(i), h, w)
  img = _decode(source, i)
  ih, iw = img.shape[:2]
  if ih * w > iw * h:  # too tall for the target aspect
    ch, cw = max(1, round(iw * h / w)), iw
  else:
    ch, cw = ih, max(1, round(ih * w / h))
  top, left = (ih - ch) // 2, (iw - cw) // 2
  return resize(img[top : top + ch, left : left + cw], h, w)


def captions(source, n: int) -> list[str]:
  """Captions of the first n records ('' for images without one: unconditional)."""
  if hasattr(source, "scene"):
    from infdiff.data import shapes

    return [shapes.caption(source.scene(i)) for i in range(n)]
  if hasattr(source, "captions"):
    return list(source.captions[:n])
  return [str(source[i].get("caption", "")) for i in range(n)]


def num_images(source, num: int) -> int:
  if num <= 0:
    raise ValueError(f"--num must be positive, got {num}")
  return min(num, len(source))


# ---------------------------------------------------------------------------------------
# The inference contracts, from a run directory or from the training context.


def autoencoder_from_ctx(ctx) -> base.FieldAutoencoder:
  """The training stage's `FieldAutoencoder` with the current EMA (else raw) params.

  Built once per stage (the method caches it), so its compiled code is reused.
  """
  _require(ctx.method, base.AUTOENCODER)
  return ctx.method.inference(ctx.state.ema or ctx.state.params, ctx.aux)


def generator_from_ctx(ctx) -> base.Generator:
  """The training stage's `Generator` with the current EMA (else raw) params."""
  _require(ctx.method, base.GENERATOR)
  return ctx.method.inference(ctx.state.ema or ctx.state.params, ctx.aux)


def _require(method, kind: str) -> None:
  if kind not in method.provides:
    raise ValueError(f"evaluator needs a {kind} stage; {method.stage} provides none")


def generate(
    gen: base.Generator, prompts: list[str], sizes, seed: int
) -> dict[tuple[int, int], np.ndarray]:
  """One sample per prompt, at every (W, H). Returns {(W, H): [N, H, W, 3]}.

  Unconditional generators get empty prompts (their held-out captions are ignored).
  """
  if not gen.conditional:
    prompts = [""] * len(prompts)
  return gen.sample(prompts, 1, seed, sizes)


def ecfg_get(ecfg, name: str, default):
  """A field of an evaluator config (ConfigDict or dict) with a default."""
  try:
    value = ecfg[name] if name in ecfg else default
  except TypeError:
    value = getattr(ecfg, name, default)
  return default if value is None else value


def ecfg_sizes(ecfg, default) -> list[tuple[int, int]]:
  """`sizes` of an evaluator config: ints (squares), (W, H) pairs or 'WxH' strings."""
  out = []
  for s in ecfg_get(ecfg, "sizes", default):
    if isinstance(s, str):
      out.append(parse_size(s))
    elif isinstance(s, int):
      out.append((s, s))
    else:
      out.append((int(s[0]), int(s[1])))
  return out
