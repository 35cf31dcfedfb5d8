"""Guided sampling CLI: DPS with conditions at different scales of one canvas (INFD Sec. 5.5).

python -m infdiff.guide --workdir=W --canvas=2048x2048 \
    --layout="100,200,1000,1000,a cloud;1400,0,600,2048,a lake" --clip=CLIP_DIR \
    [--lowres=low.png] [--crop=top,left,crop.png ...] [--colours="top,left,h,w,#rrggbb;..."] \
    [--scale=1.0] [--step_rule=dps] [--steps=N] [--eta=E] --num=4 --seed=0 --out=DIR

Conditions (any mix, at least one; boxes are top,left,height,width in canvas pixels):
  --lowres=PNG          the whole canvas seen at the PNG's size (area downsampling)
  --crop=top,left,PNG   known canvas pixels at the PNG's size (repeat for several)
  --colours=...;...     mean colour of each box, '#rrggbb'
  --layout=...;...      CLIP similarity of each box (rendered at CLIP's input size) to its
                        text; needs --clip, a local CLIP directory (tokenizer.json too)

The run must provide a generator that is a `GuidablePrior` (INFD stage 2). Writes
DIR/guided_{i:03d}.png and DIR/unguided_{i:03d}.png (the same noise, scale 0), rendered
at the canvas size through the generator's own tiled `render`, and prints each
condition's error on those images with and without guidance as JSON (also written to
DIR/errors.json). The same seed gives the same files.
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import app, flags, logging

from infdiff import cli, utils

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags, defined only when it runs as a program: the library functions below
  are imported by tests and notebooks next to other CLIs that define the same names."""
  flags.DEFINE_string(
      "workdir", None, "Run directory whose generator is a GuidablePrior (INFD, ∞-Diff)."
  )
  flags.DEFINE_string("canvas", None, "Canvas size WxH in pixels, e.g. 2048x2048.")
  flags.DEFINE_string("lowres", None, "PNG of the whole canvas at low resolution.")
  flags.DEFINE_multi_string("crop", [], "top,left,PNG: known pixels of the canvas; repeatable.")
  flags.DEFINE_string("colours", None, "'top,left,h,w,#rrggbb;...': mean colour per box.")
  flags.DEFINE_string("layout", None, "'top,left,h,w,text;...': CLIP text per box (needs --clip).")
  flags.DEFINE_string("clip", None, "Local CLIP checkpoint directory (for --layout).")
  flags.DEFINE_float("scale", 1.0, "Guidance step size zeta; 0 samples without guidance.")
  flags.DEFINE_enum(
      "step_rule",
      "dps",
      ["dps", "plain", "replace", "auto"],
      "dps: normalised DPS step; plain: scale*grad; replace: known crop pixels, noised, "
      "replace the canvas state's at every step (pixel-state priors: Patch-DM); auto: "
      "replace for crops on a pixel-state prior, else dps.",
  )
  flags.DEFINE_integer(
      "steps", None, "DDIM steps (default: the run's sample.num_steps; INFD: 200)."
  )
  flags.DEFINE_float("eta", None, "DDIM eta (default: the run's sample.eta; INFD: 1).")
  flags.DEFINE_integer("num", 1, "Number of samples.")
  flags.DEFINE_integer("seed", 0, "Noise seed.")
  flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/guided).")
  flags.DEFINE_multi_string(
      "sampler_option", [], "key=value sampler option of the run's generator; repeat."
  )
  flags.mark_flags_as_required(["workdir", "canvas"])


MAX_BATCH = 4  # samples per compiled DPS call (a fixed shape: one compile)
_HEX = re.compile(r"^#[0-9a-fA-F]{6}$")


def parse_canvas(text: str) -> tuple[int, int]:
  """'WxH' -> (H, W) (rows first, as boxes are)."""
  try:
    w, h = cli.parse_size(text)
  except ValueError as e:
    raise ValueError(str(e).replace("--size", "--canvas")) from None
  return h, w


def _ints(parts, what, entry):
  try:
    return [int(p) for p in parts]
  except ValueError:
    raise ValueError(f"bad {what} entry {entry!r}: box values must be integers") from None


def _entries(text: str | None) -> list[str]:
  return [e.strip() for e in (text or "").split(";") if e.strip()]


def read_png(path: str):
  """[h, w, 3] float32 in [0, 1]."""
  import numpy as np
  from PIL import Image

  if not os.path.isfile(path):
    raise FileNotFoundError(f"no image file {path}")
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"), np.float32) / 255.0


def parse_conditions(canvas, *, lowres=None, crops=(), colours=None, layout=None, clip=None):
  """The flags' conditions, checked, before anything is loaded (one-line ValueErrors)."""
  import jax.numpy as jnp
  import numpy as np

  from infdiff.diffusion import dps

  h, w = canvas
  box = lambda vals: dps.Box(*vals, h, w)
  conds = []
  if lowres:
    conds.append(dps.LowRes(jnp.asarray(read_png(lowres))))
  for entry in crops:
    parts = entry.split(",", 2)
    if len(parts) != 3:
      raise ValueError(f"bad --crop {entry!r}: expected top,left,PNG")
    top, left = _ints(parts[:2], "--crop", entry)
    pixels = read_png(parts[2])
    conds.append(dps.Crop(box((top, left, *pixels.shape[:2])), jnp.asarray(pixels)))
  if colours is not None:
    boxes, rgb = [], []
    for entry in _entries(colours):
      parts = entry.split(",")
      if len(parts) != 5 or not _HEX.match(parts[4].strip()):
        raise ValueError(f"bad --colours entry {entry!r}: expected top,left,height,width,#rrggbb")
      boxes.append(box(_ints(parts[:4], "--colours", entry)))
      hexa = parts[4].strip()
      rgb.append([int(hexa[i : i + 2], 16) / 255.0 for i in (1, 3, 5)])
    conds.append(dps.ColourLayout(tuple(boxes), jnp.asarray(np.array(rgb, np.float32))))
  layout_boxes = []
  for entry in _entries(layout):
    parts = entry.split(",", 4)
    if len(parts) != 5 or not parts[4].strip():
      raise ValueError(f"bad --layout entry {entry!r}: expected top,left,height,width,text")
    layout_boxes.append((box(_ints(parts[:4], "--layout", entry)), parts[4].strip()))
  # Every box and shape is checked before the (slow) CLIP load.
  for c in conds:
    c.check()
  for b, _ in layout_boxes:
    b.check()
  if layout_boxes:
    if not clip:
      raise ValueError("--layout needs --clip=DIR, a local CLIP checkpoint directory")
    conds += _clip_conditions(clip, layout_boxes)
  if not conds:
    raise ValueError("no condition given: pass --lowres, --crop, --colours and/or --layout")
  return dps.check_conditions(conds)


def _clip_conditions(path, boxes_texts):
  """One ClipText per (box, text); texts tokenized with the checkpoint's tokenizer."""
  import jax.numpy as jnp

  from infdiff import pretrained
  from infdiff.diffusion import dps

  model, params = pretrained.load("clip", path)
  encoder = dps.ClipImageEncoder(model)
  texts = [t for _, t in boxes_texts]
  ids, mask = pretrained.tokenize(path, texts, int(model.text["max_position_embeddings"]))
  emb = encoder.text_embeddings(params, jnp.asarray(ids), jnp.asarray(mask))
  return [
      dps.ClipText(b, emb[i], encoder, params, size=encoder.image_size, text=t)
      for i, (b, t) in enumerate(boxes_texts)
  ]


def _labels(conditions) -> list[str]:
  labels = []
  for c in conditions:
    label = c.label()
    while label in labels:
      label += "'"
    labels.append(label)
  return labels


def held_out_inputs(workdir, canvas: int, out: str, *, factor=8, crop=32, index=0, hole=0) -> dict:
  """Conditions taken from held-out image `index` of the run's data, rendered at
  canvas x canvas, written as PNGs under `out` (`scripts/guide_inputs.py` prints them as
  flags). Returns, as `run` takes them:
    truth    the full canvas (also the known centre of an outpainting)
    lowres   its area-downsampling by `factor` (super-resolution)
    crop     'top,left,PNG' of a centred crop of side `crop`
    half     'top,left,PNG' of its left half (inpainting of the right half)
    ring     ['top,left,PNG'] of the four bands around a centred hole of side `hole`
             (0: half the canvas)
    colours  'top,left,h,w,#rrggbb;...': the mean colour of each quadrant
  """
  import numpy as np

  from infdiff import fields, sampling
  from infdiff.evaluators import common

  s = canvas
  source = common.held_out_source(common.run_data_config(workdir))
  img = common.full_image(source, index, s, s)  # [s, s, 3] in [0, 1]
  os.makedirs(out, exist_ok=True)
  path = lambda name: os.path.join(out, name)
  sampling.save_png(path("truth.png"), img)
  sampling.save_png(
      path("lowres.png"), np.asarray(fields.area_downsample(img, s // factor, s // factor))
  )
  top = (s - crop) // 2
  sampling.save_png(path("crop.png"), img[top : top + crop, top : top + crop])
  sampling.save_png(path("left.png"), img[:, : s // 2])
  hole = hole or s // 2
  h0 = (s - hole) // 2
  ring = []
  for name, (t, le, h, w) in (
      ("top", (0, 0, h0, s)),
      ("bottom", (h0 + hole, 0, s - h0 - hole, s)),
      ("left", (h0, 0, hole, h0)),
      ("right", (h0, h0 + hole, hole, s - h0 - hole)),
  ):
    sampling.save_png(path(f"ring_{name}.png"), img[t : t + h, le : le + w])
    ring.append(f"{t},{le},{path(f'ring_{name}.png')}")
  half = s // 2
  boxes = []
  for t in (0, half):
    for le in (0, half):
      mean = img[t : t + half, le : le + half].reshape(-1, 3).mean(0)
      hexc = "#" + "".join(f"{int(round(float(v) * 255)):02x}" for v in mean)
      boxes.append(f"{t},{le},{half},{half},{hexc}")
  return {
      "truth": path("truth.png"),
      "lowres": path("lowres.png"),
      "crop": f"{top},{top},{path('crop.png')}",
      "half": f"0,0,{path('left.png')}",
      "ring": ring,
      "colours": ";".join(boxes),
  }


def run(
    workdir,
    canvas,
    *,
    lowres=None,
    crops=(),
    colours=None,
    layout=None,
    clip=None,
    scale=1.0,
    step_rule="dps",
    steps=None,
    eta=None,
    num=1,
    seed=0,
    out=None,
    sampler_options=None,
) -> dict:
  """Library form of the CLI; returns {label: errors with and without guidance}."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from infdiff import runs, sampling
  from infdiff.diffusion import dps
  from infdiff.methods import base

  if num <= 0:
    raise ValueError(f"--num must be positive, got {num}")
  if steps is not None and steps <= 0:
    raise ValueError(f"--steps must be positive, got {steps}")
  h, w = parse_canvas(canvas)
  conds = parse_conditions(
      (h, w), lowres=lowres, crops=crops, colours=colours, layout=layout, clip=clip
  )
  gen = runs.load_generator(workdir, "guided sampling", **(sampler_options or {}))
  if not isinstance(gen, base.GuidablePrior):
    raise ValueError(
        f"{workdir}: its generator ({type(gen).__name__}) is not a GuidablePrior; guided "
        "sampling needs a diffusion prior over fields (INFD, ∞-Diff)"
    )
  if max(h, w) > gen.max_size:
    raise ValueError(f"--canvas {canvas}: sides must be at most {gen.max_size}")
  # The run's own sampler settings unless given (a generator without them: INFD's).
  steps = int(steps or getattr(gen, "num_steps", 200))
  eta = float(getattr(gen, "eta", 1.0) if eta is None else eta)
  prior = gen.guidance_view(h, w)  # the prior of this canvas (∞-Diff: its pixel grid)
  if step_rule == "auto":  # replacement of known pixels where the state is the canvas, else DPS
    only_crops = all(isinstance(c, dps.Crop) for c in conds)
    step_rule = "replace" if getattr(prior, "pixel_state", False) and only_crops else "dps"
  if step_rule == "replace" and not getattr(prior, "pixel_state", False):
    raise ValueError(
        f"--step_rule=replace needs a prior whose state is the canvas pixels (Patch-DM); "
        f"{type(gen).__name__}'s is not"
    )
  sample = dps.make_sampler(
      prior, num_steps=steps, eta=eta, step_rule=step_rule, clip_x0=prior.clip_x0
  )
  out = out or os.path.join(runs.run_root(workdir), "guided")
  labels = _labels(conds)
  errors = {k: {label: [] for label in labels} for k in ("guided", "unguided")}
  noise_key, step_key = jax.random.split(jax.random.PRNGKey(seed))
  b = min(num, MAX_BATCH)
  for start in range(0, num, b):
    n = min(b, num - start)
    # Sample i starts from fold_in(noise_key, i); the batch is padded to a fixed size.
    idx = [min(start + j, num - 1) for j in range(b)]
    noise, context = prior.initial_state([jax.random.fold_in(noise_key, i) for i in idx])
    rng = jax.random.fold_in(step_key, start)
    for kind, s in (("guided", scale), ("unguided", 0.0)):
      x0 = sample(conds, noise, rng, jnp.float32(s), context).x0
      images = prior.to_images(np.asarray(jax.device_get(x0))[:n], h, w)  # [n, H, W, 3]
      for j, img in enumerate(images):
        sampling.save_png(os.path.join(out, f"{kind}_{start + j:03d}.png"), img)
      for label, e in zip(labels, dps.constraint_errors(conds, images)):
        errors[kind][label] += [float(v) for v in e]
      del images
  report = {}
  for label, c in zip(labels, conds):
    report[label] = {
        "guided": errors["guided"][label],
        "unguided": errors["unguided"][label],
        "guided_mean": float(np.mean(errors["guided"][label])),
        "unguided_mean": float(np.mean(errors["unguided"][label])),
    }
    if c.norm_type:  # a mean squared error of [0, 1] pixels: also as PSNR (dB), per sample
      for kind in ("guided", "unguided"):
        mse = np.maximum(np.asarray(errors[kind][label], np.float64), 1e-10)
        report[label][f"{kind}_psnr_mean"] = float(np.mean(10.0 * np.log10(1.0 / mse)))
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "errors.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  utils.quiet_library_logs()
  with cli.one_line_errors():
    report = run(
        FLAGS.workdir,
        FLAGS.canvas,
        lowres=FLAGS.lowres,
        crops=FLAGS.crop,
        colours=FLAGS.colours,
        layout=FLAGS.layout,
        clip=FLAGS.clip,
        scale=FLAGS.scale,
        step_rule=FLAGS.step_rule,
        steps=FLAGS.steps,
        eta=FLAGS.eta,
        num=FLAGS.num,
        seed=FLAGS.seed,
        out=FLAGS.out,
        sampler_options=cli.parse_options(FLAGS.sampler_option),
    )
  print(json.dumps(report))
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_one_line)
  sys.exit(0)
