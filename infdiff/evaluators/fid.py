"""Frechet distances of generated images: FID, patch FID (pFID) and FID on CLIP embeddings.

  fid       Inception pool features [2048] of whole images (pytorch-fid's network and
            its 299 x 299 bilinear resize) at each size.
  pfid      INFD's patch FID: `crops_per_image` random P x P crops of each image at the
            size, each crop's Inception features; measures detail at high resolution,
            where the whole-image resize to 299 would hide it.
  fid_clip  CLIP image embeddings (projected, not normalised) of whole images.

Protocol: as `swd`, the first `num` held-out records give the prompts (captions) and the
real images (centre crop to the aspect ratio, resized to the size; shapes scenes
rendered at it). pFID takes generated and real crops at the same positions (image i of
both sets, positions from `seed`). The real statistics (mean, covariance) are cached in
`W/eval/ref_<metric>_<source>_<WxH>.npz` together with what they were computed from;
a cache computed differently (other num, seed, patch, weights) is recomputed.
Rows: the metric; one column per size.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from absl import logging

from infdiff import runs
from infdiff.evaluators import common, metrics
from infdiff.methods import base

# metric -> (pretrained kind, output key, EvalArgs field holding the checkpoint path)
NETWORKS = {
    "fid": ("inception_fid", "pool", "inception"),
    "pfid": ("inception_fid", "pool", "inception"),
    "fid_clip": ("clip", "image_embeds", "clip"),
}
DEFAULT_SIZES = ((64, 64),)
DEFAULT_NUM = 256


class FeatureNet:
  """A frozen feature network: images [N, H, W, 3] in [0, 1] -> features [N, D] float64."""

  def __init__(self, metric: str, path: str, batch: int = common.DEFAULT_BATCH):
    from infdiff import pretrained

    kind, key, _ = NETWORKS[metric]
    model, params = pretrained.load(kind, path)
    self.path = os.path.abspath(path)
    self.batch = batch
    if kind == "clip":
      fn = lambda p, x: model.apply(p, images=x)[key]  # noqa: E731
    else:
      fn = lambda p, x: model.apply(p, x)[key]  # noqa: E731
    self._params = params
    self._fn = jax.jit(fn)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    out = []
    for s in range(0, len(images), self.batch):
      chunk = np.asarray(images[s : s + self.batch], np.float32)
      n = len(chunk)
      if n < self.batch:  # fixed batch: one compile per image size
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - n, axis=0)])
      f = self._fn(self._params, jnp.asarray(chunk))
      out.append(np.asarray(jax.device_get(f), np.float64)[:n])
    return np.concatenate(out)


def image_features(
    metric: str, net: FeatureNet, images: np.ndarray, *, seed: int, patch: int, crops: int
) -> np.ndarray:
  """Features [M, D] of a set: whole images, or for pfid `crops` P x P crops per image."""
  if metric == "pfid":
    images = metrics.random_patches(images, patch, crops, np.random.default_rng(seed))
  return net(images)


def image_stats(
    metric: str, net: FeatureNet, images: np.ndarray, *, seed: int, patch: int, crops: int
):
  """(mean [D], covariance [D, D]) of a set's features; both sets go through this."""
  feats = image_features(metric, net, images, seed=seed, patch=patch, crops=crops)
  if len(feats) < 2:
    raise ValueError(f"{metric}: need at least 2 feature vectors, got {len(feats)}")
  return metrics.feature_stats(feats)


def source_slug(source: str) -> str:
  """A data source string as a file-name part: 'folder:/a/b' -> 'folder-a-b'."""
  return re.sub(r"[^A-Za-z0-9]+", "-", source).strip("-")[:80] or "data"


def reference_stats(cache_path: str | None, key: dict, compute):
  """(mu, sigma) from the cache when its key matches, else `compute()` and cache them."""
  key_text = json.dumps(key, sort_keys=True)
  if cache_path and os.path.exists(cache_path):
    with np.load(cache_path) as f:
      if str(f["key"]) == key_text:
        return f["mu"], f["sigma"]
    logging.info("reference statistics %s were computed differently; recomputing", cache_path)
  mu, sigma = compute()
  if cache_path:
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    tmp = cache_path + ".tmp.npz"
    np.savez(tmp, mu=mu, sigma=sigma, key=np.asarray(key_text))
    os.replace(tmp, cache_path)
  return mu, sigma


def evaluate(
    metric: str,
    gen,
    source,
    net: FeatureNet,
    *,
    num: int = DEFAULT_NUM,
    seed: int = 0,
    sizes=DEFAULT_SIZES,
    patch: int = 64,
    crops: int = 4,
    cache_dir: str | None = None,
    source_name: str = "data",
) -> common.Result:
  """The Frechet distance of `metric` per size (module docstring).

  Args:
    metric: 'fid', 'pfid' or 'fid_clip'.
    gen: a `Generator` (infdiff.methods.base).
    source: held-out data source (prompts and real images).
    net: the metric's `FeatureNet`.
    num: images per set.
    seed: sampling noise and pFID crop positions.
    sizes: (W, H) sizes.
    patch, crops: pFID crop side and crops per image.
    cache_dir: where reference statistics are cached (None: not cached).
    source_name: data source string, part of the cache file name.
  """
  if metric not in NETWORKS:
    raise ValueError(f"unknown Frechet metric {metric!r}; known: {', '.join(NETWORKS)}")
  if metric == "pfid":
    for w, h in sizes:
      if patch > min(w, h):
        raise ValueError(f"pfid patch {patch} is larger than the size {w}x{h}")
  n = common.num_images(source, num)
  fake = common.generate(gen, common.captions(source, n), sizes, seed)
  kw = dict(seed=seed, patch=patch, crops=crops)
  row = {}
  for (w, h), images in fake.items():
    key = {
        "metric": metric,
        "source": source_name,
        "size": [w, h],
        "num": n,
        "seed": seed,
        "weights": net.path,
    }
    if metric == "pfid":
      key.update(patch=patch, crops=crops)
    cache = None
    if cache_dir:
      cache = os.path.join(cache_dir, f"ref_{metric}_{source_slug(source_name)}_{w}x{h}.npz")

    def compute(w=w, h=h):
      real = np.stack([common.full_image(source, i, h, w) for i in range(n)])  # [N, h, w, 3]
      return image_stats(metric, net, real, **kw)

    mu_r, sigma_r = reference_stats(cache, key, compute)
    mu_f, sigma_f = image_stats(metric, net, images, **kw)
    with warnings.catch_warnings():
      # Fewer samples than feature dimensions make the covariances singular; that case
      # is reported once in the result's note instead of a warning per size.
      warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
      row[f"{w}x{h}"] = metrics.frechet_distance(mu_f, sigma_f, mu_r, sigma_r)
    dims = len(mu_f)
  meta = {"num_images": n, "seed": seed, "sizes": [common.size_name(s) for s in sizes]}
  if metric == "pfid":
    meta.update(patch=patch, crops_per_image=crops)
  count = n * (crops if metric == "pfid" else 1)
  note = f"{n} generated vs {n} held-out images ({count} feature vectors per set)."
  if count <= dims:
    note += f" Fewer vectors than feature dimensions ({dims}): biased, compare like with like."
  return common.Result(metric, {metric: row}, meta=meta, note=note)


def require_weights(metric: str, args: common.EvalArgs) -> str:
  """The checkpoint path the metric needs, or a one-line ValueError naming the flag."""
  field = NETWORKS[metric][2]
  path = getattr(args, field)
  if not path:
    raise ValueError(f"--metric={metric} needs --{field}=PATH (a {NETWORKS[metric][0]} checkpoint)")
  return path


NEEDS = base.GENERATOR


def validate(args: common.EvalArgs) -> None:
  """Weights given, and the pFID patch fits every size."""
  require_weights(args.metric, args)
  if args.metric == "pfid" and any(args.patch > min(wh) for wh in args.sizes):
    raise ValueError(f"--patch={args.patch} is larger than a requested --size")


def cli(args: common.EvalArgs) -> common.Result:
  """`python -m infdiff.evaluate --metric={fid,pfid,fid_clip}`: needs a Generator run."""
  metric = args.metric
  path = require_weights(metric, args)
  data_cfg = common.run_data_config(args.workdir, args.data)
  source = common.held_out_source(data_cfg)
  gen = runs.load_generator(
      args.workdir, f"--metric={metric}", step=args.step, **args.sampler_options
  )
  net = FeatureNet(metric, path)
  return evaluate(
      metric,
      gen,
      source,
      net,
      num=args.num or DEFAULT_NUM,
      seed=args.seed,
      sizes=args.sizes or DEFAULT_SIZES,
      patch=args.patch,
      crops=args.crops_per_image,
      cache_dir=os.path.join(runs.run_root(args.workdir), "eval"),
      source_name=str(data_cfg.source),
  )


class Evaluator(common.PeriodicEvaluator):
  """Periodic FID-family metric during stage 2.

  ecfg: every, variant ('fid' | 'pfid' | 'fid_clip'; default the ecfg's metric name),
  weights (checkpoint directory), num, seed, sizes, patch, crops_per_image. Reference
  statistics are cached in the run's eval/ directory.
  """

  default_num = 64

  def __init__(self, ecfg):
    super().__init__(ecfg)
    self.metric = str(common.ecfg_get(ecfg, "variant", common.ecfg_get(ecfg, "metric", "fid")))
    if self.metric not in NETWORKS:
      raise ValueError(f"evals: unknown FID variant {self.metric!r}; known: {', '.join(NETWORKS)}")
    weights = common.ecfg_get(ecfg, "weights", "")
    if not weights:
      raise ValueError(f"evals: {self.metric} needs 'weights' (a {NETWORKS[self.metric][0]} path)")
    self.net = FeatureNet(self.metric, weights)
    self.sizes = common.ecfg_sizes(ecfg, DEFAULT_SIZES)
    self.patch = int(common.ecfg_get(ecfg, "patch", 64))
    self.crops = int(common.ecfg_get(ecfg, "crops_per_image", 4))

  def evaluate(self, ctx):
    return evaluate(
        self.metric,
        common.generator_from_ctx(ctx),
        self.source(ctx),
        self.net,
        num=self.num,
        seed=self.seed,
        sizes=self.sizes,
        patch=self.patch,
        crops=self.crops,
        cache_dir=os.path.join(runs.run_root(ctx.workdir), "eval"),
        source_name=str(ctx.config.data.source),
    )
