"""DPS guided sampling on a toy `GuidablePrior` (analytic denoiser, bilinear field).

The toy prior does not depend on any trained stage: latents are i.i.d. Gaussian per
element (so the exact eps-denoiser is linear and known), the "decoder" is an affine map
to a field of the latent's size, and the renderer samples the field bilinearly at any
coordinates. Every property below holds for a real INFD prior as well.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

from infdiff import fields
from infdiff.diffusion import dps
from infdiff.diffusion import gaussian as gd
from infdiff.methods import base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENT = (8, 8, 3)
MEAN, STD = 0.2, 0.8  # the toy data distribution: x0 ~ N(MEAN, STD^2) per element
CANVAS = 32  # canvas side (pixels)
STEPS = 20


class ToyPrior(base.LatentGenerator, base.GuidablePrior):
  """A latent diffusion prior with an exact denoiser and a bilinear 'renderer'."""

  latent_shape = LATENT
  native_size = (16, 16)
  parameterization = "eps"

  def __init__(self):
    self.schedule = gd.make_schedule("linear", 100, beta_start=1e-3, beta_end=0.05)
    self.render_shapes = []  # (coords shape) of every render_fn call, recorded at trace

  def model_fn(self):
    sch = self.schedule

    def eps_hat(x, t):
      abar = sch.alphas_cumprod[t][:, None, None, None]
      a, om = jnp.sqrt(abar), sch.one_minus_alphas_cumprod[t][:, None, None, None]
      x0 = MEAN + STD**2 * a * (x - a * MEAN) / (STD**2 * abar + om)  # E[x0 | x_t]
      return (x - a * x0) / jnp.sqrt(om)

    return eps_hat

  def field_fn(self):
    return lambda x0: 0.5 + 0.2 * x0  # [B, 8, 8, 3]: pixel values around 0.5

  def render_fn(self):
    def render(field, coords, cells):
      del cells
      self.render_shapes.append(tuple(coords.shape))
      return fields.interpolate_latent(field, coords, "bilinear")

    return render

  # LatentGenerator, for the CLI.
  def latents(self, conditions, num=1, seed=0):
    key = jax.random.PRNGKey(seed)
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), LATENT) for i in range(num)])
    return np.asarray(gd.ddim_sample(self.model_fn(), self.schedule, noise, num_steps=STEPS))

  def render(self, latents, height, width):
    coords = jnp.broadcast_to(fields.coord_grid(height, width), (len(latents), height, width, 2))
    cells = jnp.broadcast_to(fields.cell_size(height, width), (len(latents), 2))
    field = self.field_fn()(jnp.asarray(latents))
    return np.clip(np.asarray(self.render_fn()(field, coords, cells)), 0.0, 1.0)


@pytest.fixture(scope="module")
def prior():
  return ToyPrior()


@pytest.fixture(scope="module")
def truth(prior):
  """A canvas rendered from one prior sample: targets every condition can meet."""
  x0 = MEAN + STD * jax.random.normal(jax.random.key(123), (1, *LATENT))
  return prior.render(np.asarray(x0), CANVAS, CANVAS)[0]  # [32, 32, 3]


def _noise(batch, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, *LATENT))


@functools.cache
def _sampler(prior, eta, step_rule):
  # One jitted sampler per setting: runs that differ only in scale or targets reuse it.
  return dps.make_sampler(prior, num_steps=STEPS, eta=eta, step_rule=step_rule)


def _run(prior, conditions, scale, batch=4, eta=1.0, step_rule="dps"):
  sample = _sampler(prior, eta, step_rule)
  res = sample(tuple(conditions), _noise(batch), jax.random.key(1), jnp.float32(scale))
  images = prior.render(np.asarray(res.x0), CANVAS, CANVAS)
  return res, dps.constraint_errors(conditions, images)


# --- (i) region coordinates ------------------------------------------------------------
def test_box_at_canvas_resolution_is_the_window_of_the_full_render(prior):
  box = dps.Box(5, 9, 12, 7, CANVAS, CANVAS)
  coords, cell = dps.box_grid(box)
  np.testing.assert_array_equal(coords, fields.coord_grid(CANVAS, CANVAS)[5:17, 9:16])
  np.testing.assert_array_equal(coords, fields.crop_grid(CANVAS, CANVAS, 5, 9, 12, 7))
  np.testing.assert_allclose(cell, fields.cell_size(CANVAS, CANVAS))

  field = prior.field_fn()(_noise(2))
  full = np.asarray(  # the full canvas render, unclipped
      prior.render_fn()(
          field,
          jnp.broadcast_to(fields.coord_grid(CANVAS, CANVAS), (2, CANVAS, CANVAS, 2)),
          jnp.broadcast_to(fields.cell_size(CANVAS, CANVAS), (2, 2)),
      )
  )
  crop = dps.render_box(prior.render_fn(), field, box, 12, 7, batch=2)
  np.testing.assert_array_equal(np.asarray(crop), full[:, 5:17, 9:16])
  np.testing.assert_array_equal(np.asarray(box.window(full)), full[:, 5:17, 9:16])


def test_box_at_another_grid_is_the_canvas_grid_at_that_scale():
  # A box of a 32^2 canvas drawn at 3x its pixel size is the same box of a 96^2 canvas
  # at that canvas's own resolution: same region, cells a third as large.
  box = dps.Box(4, 10, 6, 8, CANVAS, CANVAS)
  coords, cell = dps.box_grid(box, 18, 24)
  np.testing.assert_allclose(coords, fields.crop_grid(96, 96, 12, 30, 18, 24), atol=1e-6)
  np.testing.assert_allclose(cell, fields.cell_size(96, 96), rtol=1e-6)
  # The whole canvas at h x w is the plain h x w grid (LowRes).
  coords, cell = dps.box_grid(dps.Box.whole(CANVAS, CANVAS), 8, 8)
  np.testing.assert_allclose(coords, fields.coord_grid(8, 8), atol=1e-6)
  np.testing.assert_allclose(cell, fields.cell_size(8, 8))


def test_bad_boxes_and_targets_are_one_line_errors():
  with pytest.raises(ValueError, match="not inside"):
    dps.Crop(dps.Box(30, 0, 4, 4, CANVAS, CANVAS), jnp.zeros((4, 4, 3))).check()
  with pytest.raises(ValueError, match="do not fill"):
    dps.Crop(dps.Box(0, 0, 4, 4, CANVAS, CANVAS), jnp.zeros((4, 5, 3))).check()
  with pytest.raises(ValueError, match="one RGB colour per box"):
    dps.ColourLayout((dps.Box(0, 0, 4, 4, CANVAS, CANVAS),), jnp.zeros((2, 3))).check()
  with pytest.raises(ValueError, match="at least one condition"):
    dps.check_conditions([])


# --- the sampler -----------------------------------------------------------------------
def test_scale_zero_is_ddim(prior):
  cond = dps.LowRes(jnp.full((4, 4, 3), 0.5))
  for eta in (0.0, 1.0):
    res, _ = _run(prior, [cond], 0.0, batch=2, eta=eta)
    ref = gd.ddim_sample(
        prior.model_fn(), prior.schedule, _noise(2), jax.random.key(1), num_steps=STEPS, eta=eta
    )
    np.testing.assert_allclose(res.x0, ref, rtol=1e-5, atol=1e-5)
    assert res.costs.shape == (STEPS, 1, 2)


# --- (ii) guidance lowers the constraint error -------------------------------------------
COLOUR_BOXES = (dps.Box(0, 0, 16, 16, CANVAS, CANVAS), dps.Box(16, 20, 16, 12, CANVAS, CANVAS))
# DPS's step size is tuned per task (the paper's zeta' is); these suit the toy prior.
SCALES = {"lowres": 10.0, "crop": 2.0, "colours": 20.0}


def _conditions(truth, colours=None, weights=(1.0, 1.0, 1.0)):
  """Conditions met by `truth`, except the box colours when `colours` is given."""
  box = dps.Box(8, 12, 12, 16, CANVAS, CANVAS)
  if colours is None:
    colours = np.stack([b.window(truth[None])[0].mean((0, 1)) for b in COLOUR_BOXES])
  return {
      "lowres": dps.LowRes(jnp.asarray(fields.area_downsample(truth, 8, 8)), weight=weights[0]),
      "crop": dps.Crop(box, jnp.asarray(box.window(truth[None])[0]), weight=weights[1]),
      "colours": dps.ColourLayout(COLOUR_BOXES, jnp.asarray(colours), grid=4, weight=weights[2]),
  }


@pytest.mark.parametrize("name", ["lowres", "crop", "colours"])
def test_guidance_lowers_the_constraint_error(prior, truth, name):
  # Colours away from the prior's (its mean pixel is 0.54 grey), toward red and blue.
  cond = _conditions(truth, colours=[[0.75, 0.4, 0.4], [0.4, 0.5, 0.75]])[name]
  guided, err_g = _run(prior, [cond], SCALES[name])
  unguided, err_u = _run(prior, [cond], 0.0)
  # Measured on the final canvas images, per sample (same noise in both runs).
  assert np.all(err_g[0] < 0.3 * err_u[0]), (err_g, err_u)
  # The guided trace decreases; the unguided one ends where the prior puts it.
  tg = np.asarray(guided.costs[:, 0]).mean(-1)
  assert tg[-5:].mean() < 0.3 * tg[:5].mean(), tg
  assert np.asarray(unguided.costs[-1]).mean() > 3 * tg[-1]


def test_several_conditions_at_once(prior, truth):
  # Consistent conditions (all met by `truth`), weighted so one step size suits them all.
  conds = list(_conditions(truth, weights=(2.0, 1.0, 5.0)).values())
  _, err_u = _run(prior, conds, 0.0)
  _, err_g = _run(prior, conds, 2.0)
  for u, g in zip(err_u, err_g):
    assert g.mean() < 0.3 * u.mean(), (u, g)


def test_plain_step_rule(prior, truth):
  cond = _conditions(truth)["crop"]
  _, err_u = _run(prior, [cond], 0.0)
  _, err_p = _run(prior, [cond], 1000.0, step_rule="plain")  # grad of a mean: a large step
  assert err_p[0].mean() < 0.1 * err_u[0].mean()
  with pytest.raises(ValueError, match="step rule"):
    _run(prior, [cond], 1.0, step_rule="newton")


# --- (iii) CLIP guidance -----------------------------------------------------------------
@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  from infdiff import pretrained
  from infdiff.pretrained import testing

  path = testing.write_tiny_clip(tmp_path_factory.mktemp("clip"))
  model, params = pretrained.load("clip", path)
  enc = dps.ClipImageEncoder(model)
  ids, mask = pretrained.tokenize(path, ["a red cat"], model.text["max_position_embeddings"])
  text = enc.text_embeddings(params, jnp.asarray(ids), jnp.asarray(mask))[0]
  return path, enc, params, text


def test_clip_guidance_lowers_the_clip_cost(prior, clip):
  _, enc, params, text = clip
  box = dps.Box(4, 6, 20, 20, CANVAS, CANVAS)
  cond = dps.ClipText(box, text, enc, params, size=enc.image_size, text="a red cat")
  guided, err_g = _run(prior, [cond], 30.0, eta=0.0)
  unguided, err_u = _run(prior, [cond], 0.0, eta=0.0)
  tg = np.asarray(guided.costs[:, 0]).mean(-1)  # 1 - cos along the guided steps
  n = STEPS // 4
  assert tg[-n:].mean() < 0.8 * tg[:n].mean(), tg
  # On the final images (the box cropped from the canvas and resized for CLIP).
  assert np.all(err_g[0] < 0.7 * err_u[0]), (err_g, err_u)
  assert tg[-1] < 0.7 * np.asarray(unguided.costs[-1, 0]).mean()


# --- (iv) the cost of a region does not depend on the canvas -----------------------------
def _compiled(prior, canvas, side):
  box = dps.Box(canvas // 2, canvas // 4, side, side, canvas, canvas)
  cond = dps.Crop(box, jnp.zeros((side, side, 3)))
  colours = dps.ColourLayout((box,), jnp.zeros((1, 3)), grid=8)
  prior.render_shapes.clear()
  sample = dps.make_sampler(prior, num_steps=4, eta=1.0)
  args = ((cond, colours), _noise(1), jax.random.key(0), jnp.float32(1.0))
  cost = sample.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return list(prior.render_shapes), cost["flops"]


def test_region_cost_does_not_depend_on_the_canvas(prior):
  shapes_small, flops_small = _compiled(prior, 256, 64)
  shapes_huge, flops_huge = _compiled(prior, 4096, 64)
  assert shapes_small == shapes_huge == [(1, 64, 64, 2), (1, 8, 8, 2)]
  assert flops_small == flops_huge
  # The measure can tell a bigger region apart.
  shapes_big, flops_big = _compiled(prior, 4096, 128)
  assert shapes_big[0] == (1, 128, 128, 2) and flops_big > 2 * flops_small


# --- (v) the CLI -------------------------------------------------------------------------
def _cli(*args):
  cmd = [sys.executable, "-m", "infdiff.guide", *args]
  return subprocess.run(cmd, cwd=ROOT, env=tiny.subprocess_env(), capture_output=True, text=True)


def test_cli_one_line_errors(tmp_path):
  proc = _cli(f"--workdir={tmp_path / 'nothing'}", "--canvas=64x64", "--colours=0,0,8,8,#ff0000")
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
  assert "nothing" in proc.stderr
  proc = _cli(f"--workdir={tmp_path}", "--canvas=64by64", "--colours=0,0,8,8,#ff0000")
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
  assert "--canvas" in proc.stderr


def test_cli_rejects_bad_conditions_before_loading(tmp_path):
  from infdiff import guide

  kw = dict(workdir=str(tmp_path), canvas="64x64", num=1, seed=0, out=str(tmp_path / "o"))
  with pytest.raises(ValueError, match="#rrggbb"):
    guide.run(colours="0,0,8,8,#ff00", **kw)
  with pytest.raises(ValueError, match="not inside"):
    guide.run(colours="60,0,8,8,#ff0000", **kw)
  with pytest.raises(ValueError, match="--clip"):
    guide.run(layout="0,0,8,8,a cat", **kw)
  with pytest.raises(ValueError, match="no condition"):
    guide.run(**kw)


class _Plain(base.LatentGenerator):
  native_size = (8, 8)

  def latents(self, conditions, num=1, seed=0):
    raise AssertionError("not called")

  def render(self, latents, height, width):
    raise AssertionError("not called")


def test_cli_names_a_run_that_is_not_guidable(tmp_path, monkeypatch):
  from infdiff import guide, runs

  monkeypatch.setattr(runs, "load_generator", lambda *a, **k: _Plain())
  with pytest.raises(ValueError, match=f"{tmp_path}.*_Plain.*GuidablePrior"):
    guide.run(str(tmp_path), "64x64", colours="0,0,8,8,#ff0000", out=str(tmp_path / "o"))


def test_cli_end_to_end_on_the_toy_prior(tmp_path, monkeypatch, prior, truth, clip):
  from infdiff import guide, runs, sampling

  monkeypatch.setattr(runs, "load_generator", lambda *a, **k: prior)
  clip_dir = clip[0]
  sampling.save_png(str(tmp_path / "low.png"), fields.area_downsample(truth, 8, 8))
  sampling.save_png(str(tmp_path / "crop.png"), truth[8:20, 12:28])

  def hexa(box):  # the truth's mean colour in the box, '#rrggbb'
    rgb = sampling.to_uint8(box.window(truth[None])[0].mean((0, 1)))
    return "#" + "".join(f"{v:02x}" for v in rgb)

  errors = guide.run(
      str(tmp_path),
      f"{CANVAS}x{CANVAS}",
      lowres=str(tmp_path / "low.png"),
      crops=[f"8,12,{tmp_path / 'crop.png'}"],
      colours=";".join(f"{b.top},{b.left},{b.height},{b.width},{hexa(b)}" for b in COLOUR_BOXES),
      layout="4,6,20,20,a red cat",
      clip=clip_dir,
      scale=2.0,
      num=2,
      seed=0,
      steps=STEPS,
      out=str(tmp_path / "out"),
  )
  assert sorted(os.listdir(tmp_path / "out")) == sorted(
      [f"{k}_{i:03d}.png" for k in ("guided", "unguided") for i in range(2)] + ["errors.json"]
  )
  with open(tmp_path / "out" / "errors.json") as f:
    assert json.load(f) == errors
  assert len(errors) == 4
  for label, e in errors.items():
    assert len(e["guided"]) == len(e["unguided"]) == 2
    if not label.startswith("clip"):  # pixel conditions: a clear margin
      assert e["guided_mean"] < 0.5 * e["unguided_mean"], (label, e)
