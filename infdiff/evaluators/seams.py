"""Seams of patch-based generators: are patch boundaries visible, and at what cost in quality?

Needs a Generator with a `patch_size` P (pixels): one that draws an image as a grid of
P x P patches aligned at multiples of P from the top-left (Patch-DM). Its optional
`seam_samplers` ({name: sampler options}, e.g. {'collage': {'collage': 'feature'},
'independent': {'collage': 'none'}}) name the sampling schemes to compare; each is loaded
as `runs.load_generator(workdir, ..., **options)` on top of any --sampler_option (a key
set by both is refused). Without `seam_samplers` the run's configured sampler is the
one row 'default'.

Protocol: each sampler draws `num` unconditional samples (condition '', noise from
`seed`) at each size (default 4P x 4P; both sides must be multiples of P).
`boundary_ratio` is the mean absolute difference of horizontally and vertically
neighbouring pixels across interior patch boundaries (pairs (x, x + 1) with x + 1 a
multiple of P, and the same for rows) over the mean of every other neighbour pair, over
all images and channels: 1 = no seam, above 1 = visible seams (`boundary_ratio`).
`swd` is the pyramid mean of the SWD metric (x 1e3) of the same samples against the
first `num` held-out images at that size, computed exactly as `--metric=swd` does.
Rows: one per sampler ('<sampler>@<W>x<H>' when several sizes are asked for);
columns 'boundary_ratio' and 'swd'.
"""

from __future__ import annotations

import functools

import numpy as np

from infdiff import runs
from infdiff.evaluators import common, metrics, swd
from infdiff.methods import base

NEEDS = base.GENERATOR
DEFAULT_NUM = swd.DEFAULT_NUM
DEFAULT_PATCHES = 4  # default size: 4 x 4 patches
PURPOSE = "--metric=seams"
EPS = 1e-6  # added to both means: finite for flat images, and 1.0 for a constant one


def boundary_ratio(images: np.ndarray, patch: int) -> float:
  """Mean |neighbour difference| across patch boundaries over the mean away from them.

  Args:
    images: [N, H, W, C] images (any value scale; [0, 1] for generated samples).
    patch: patch side P in pixels; patches are aligned at multiples of P from the top
      left, and only interior boundaries count (not the image border).

  Returns:
    (mean over the boundary pairs + EPS) / (mean over all other pairs + EPS), horizontal
    and vertical pairs pooled, over all images and channels: 1.0 = no seam.
  """
  x = np.asarray(images)
  if x.ndim != 4:
    raise ValueError(f"boundary_ratio needs [N, H, W, C] images, got shape {x.shape}")
  if int(patch) != patch or patch < 2:
    raise ValueError(f"patch side must be an integer >= 2, got {patch}")
  n, h, w, c = x.shape
  if h <= patch and w <= patch:
    raise ValueError(
        f"{w}x{h} images have no interior boundary between {patch}x{patch} patches: "
        f"a side must exceed {patch}"
    )
  col_seam = np.arange(1, w) % patch == 0  # [W - 1]: pair (j, j + 1) with j + 1 = k P
  row_seam = np.arange(1, h) % patch == 0  # [H - 1]
  seam_sum = other_sum = 0.0
  for img in x:  # one image at a time: bounded memory at large sizes
    img = np.asarray(img, np.float32)
    dx = np.abs(np.diff(img, axis=1))  # [H, W - 1, C]
    dy = np.abs(np.diff(img, axis=0))  # [H - 1, W, C]
    seam_sum += np.sum(dx[:, col_seam], dtype=np.float64)
    seam_sum += np.sum(dy[row_seam], dtype=np.float64)
    other_sum += np.sum(dx[:, ~col_seam], dtype=np.float64)
    other_sum += np.sum(dy[~row_seam], dtype=np.float64)
  seam_count = n * c * (h * col_seam.sum() + w * row_seam.sum())
  other_count = n * c * (h * (~col_seam).sum() + w * (~row_seam).sum())
  if seam_count == 0 or other_count == 0:  # no images or no channels
    raise ValueError(f"boundary_ratio needs at least one image and channel, got {x.shape}")
  return float((seam_sum / seam_count + EPS) / (other_sum / other_count + EPS))


def patch_size(gen, name: str) -> int:
  """The generator's patch side, or the one-line ValueError of a non-patch generator."""
  patch = getattr(gen, "patch_size", None)
  if patch is None:
    raise ValueError(
        f"{PURPOSE} needs a patch-based generator (one with a patch_size); {name} has none"
    )
  return int(patch)


def default_sizes(patch: int) -> list[tuple[int, int]]:
  return [(DEFAULT_PATCHES * patch, DEFAULT_PATCHES * patch)]


def check_sizes(sizes, patch: int) -> list[tuple[int, int]]:
  """The sizes without repeats; one-line ValueError for a size the metric cannot use."""
  out: list[tuple[int, int]] = []
  for w, h in sizes:
    if w % patch or h % patch or (w == patch and h == patch):
      examples = ", ".join(f"{k * patch}x{k * patch}" for k in (2, 4, 8))
      raise ValueError(
          f"size {w}x{h} for {PURPOSE}: both sides must be multiples of the patch size "
          f"{patch}, with 2 or more patches along a side (e.g. {examples})"
      )
    swd.check_size(w, h)
    if (w, h) not in out:
      out.append((w, h))
  return out


def sampler_options(gen, options: dict) -> dict[str, dict]:
  """{row name: load options}: the generator's `seam_samplers` on top of `options`."""
  samplers = getattr(gen, "seam_samplers", None)
  if not samplers:
    return {"default": dict(options)}
  out = {}
  for name, opts in samplers.items():
    both = sorted(set(opts) & set(options))
    if both:
      raise ValueError(
          f"--sampler_option={both[0]} is set by the seams sampler {name!r}; "
          f"leave it out (samplers: {', '.join(samplers)})"
      )
    out[str(name)] = {**options, **opts}
  return out


def evaluate(samplers, source, *, patch: int, num: int = DEFAULT_NUM, seed: int = 0, sizes=None):
  """The seams table (module docstring).

  Args:
    samplers: (row name, Generator) pairs, used one at a time in order (an iterator may
      load each generator only when its turn comes).
    source: the held-out data source (SWD reference images).
    patch: the generators' patch side P.
    num: samples per sampler and size (and held-out images), capped by the source.
    seed: sampling noise and SWD projections.
    sizes: (W, H) sizes, multiples of P; None: 4P x 4P.
  """
  sizes = check_sizes(sizes or default_sizes(patch), patch)
  n = common.num_images(source, num)
  real: dict[tuple[int, int], np.ndarray] = {}  # held-out images per size, shared by samplers
  rows: dict[str, dict[str, float]] = {}
  names = []
  for name, gen in samplers:
    names.append(name)
    for (w, h), fake in gen.iter_sample([""], n, seed, sizes):
      if (w, h) not in real:
        real[(w, h)] = swd.real_images(source, n, w, h)
      dist = metrics.sliced_wasserstein(fake, real[(w, h)], rng=seed, min_res=swd.MIN_RES)
      row = name if len(sizes) == 1 else f"{name}@{common.size_name((w, h))}"
      rows[row] = {"boundary_ratio": boundary_ratio(fake, patch), "swd": dist["swd_mean"]}
    del gen  # released before the next sampler loads
  return common.Result(
      "seams",
      rows,
      meta={
          "num_images": n,
          "seed": seed,
          "patch_size": patch,
          "sizes": [common.size_name(s) for s in sizes],
          "samplers": names,
      },
      note=f"{n} samples per sampler vs {n} held-out images; boundary_ratio: neighbour "
      f"difference across {patch}-pixel patch boundaries / elsewhere (1 = no seam); "
      "SWD x 1e3 (pyramid mean).",
  )


def validate(args: common.EvalArgs) -> None:
  for w, h in args.sizes:  # the patch-size check waits for the generator
    swd.check_size(w, h)


def cli(args: common.EvalArgs) -> common.Result:
  """`python -m infdiff.evaluate --metric=seams`: needs a patch-based Generator run."""
  source = common.held_out_source(common.run_data_config(args.workdir, args.data))
  load = functools.partial(runs.load_generator, args.workdir, PURPOSE, step=args.step)
  gen = load(**args.sampler_options)
  patch = patch_size(gen, args.workdir)
  sizes = check_sizes(args.sizes or default_sizes(patch), patch)
  options = sampler_options(gen, args.sampler_options)
  if not getattr(gen, "seam_samplers", None):
    samplers = [("default", gen)]
  else:
    del gen  # one generator in memory at a time
    samplers = ((name, load(**opts)) for name, opts in options.items())
  result = evaluate(
      samplers, source, patch=patch, num=args.num or DEFAULT_NUM, seed=args.seed, sizes=sizes
  )
  result.meta["sampler_options"] = {name: _jsonable(o) for name, o in options.items()}
  return result


def _jsonable(options: dict) -> dict:
  plain = (str, int, float, bool, type(None))
  return {str(k): v if isinstance(v, plain) else repr(v) for k, v in options.items()}


class Evaluator(common.PeriodicEvaluator):
  """Periodic seams during training (ecfg: every, num, seed, sizes): the training sampler
  only (row 'default'); the CLI compares the `seam_samplers`."""

  default_num = 16

  def evaluate(self, ctx):
    gen = common.generator_from_ctx(ctx)
    patch = patch_size(gen, ctx.method.stage)
    sizes = common.ecfg_sizes(self.ecfg, default_sizes(patch))
    src = self.source(ctx)
    return evaluate([("default", gen)], src, patch=patch, num=self.num, seed=self.seed, sizes=sizes)
