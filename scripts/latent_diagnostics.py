"""What stage 1 allows stage 2 to reach, measured on any run with a FieldAutoencoder.

python scripts/latent_diagnostics.py --workdir=W [--num=16] [--seed=0] [--scale=4]
    [--readout_scenes=300]

Prints three tables:
  1. Ceiling: ShapesEval (the programmatic detector of infdiff.evaluators.shapes_eval) on
     the ground-truth held-out scenes and on their autoencoder reconstructions (encode the
     scene at the encoder size, render at 1x and at `scale` x). Stage 2 cannot score above
     what the detector reads off the reconstructions.
  2. Latent-noise sensitivity: renders of z + sigma * std_c * eps (std_c the per-channel
     std of the latents, eps ~ N(0, I)) against renders of z, as PSNR and as ShapesEval, for
     several sigma. A sampled latent is never exact; a renderer that turns small latent
     errors into speckle makes a latent that is hard to diffuse.
  3. Class readout: how plainly the latent says what class of shape it holds. The latent
     of held-out scenes is average-pooled to 2 x 2-cell blocks (`fields.pool_to_grid`);
     a least-squares linear map from the blocks that objects cover (> 75%) to their class
     one-hot is fitted on half of the blocks and its argmax scored on the other half,
     against the majority class's share (chance).
"""

from __future__ import annotations

import argparse

import numpy as np

from infdiff import fields, runs
from infdiff.data import shapes
from infdiff.evaluators import metrics, shapes_detector

SIGMAS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)


def _accuracy(images, prompts) -> dict[str, float]:
  res = shapes_detector.shapes_eval(list(images), prompts)
  return {**res["per_category"], "overall": res["overall"]}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--num", type=int, default=16, help="held-out prompts per category")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--scale", type=int, default=4, help="the larger render scale")
  ap.add_argument("--readout_scenes", type=int, default=300, help="scenes of the class readout")
  args = ap.parse_args(argv)

  ae = runs.load_autoencoder(args.workdir, "latent_diagnostics")
  h, w = ae.input_size
  prompts = shapes.eval_prompts(args.num, seed=args.seed)
  big = (args.scale * h, args.scale * w)
  gt_1 = np.stack([shapes.render_scene(s, h, w) for _, _, s in prompts])  # [N, h, w, 3]
  gt_k = np.stack([shapes.render_scene(s, *big) for _, _, s in prompts])
  z = ae.encode(gt_1)  # [N, h, w, C]
  rec_1 = np.clip(ae.render(z, h, w), 0, 1)
  rec_k = np.clip(ae.render(z, *big), 0, 1)

  rows = {
      f"ground truth {h}x{w}": _accuracy(gt_1, prompts),
      f"ground truth {big[1]}x{big[0]}": _accuracy(gt_k, prompts),
      f"reconstruction {h}x{w}": _accuracy(rec_1, prompts),
      f"reconstruction {big[1]}x{big[0]}": _accuracy(rec_k, prompts),
  }
  cols = list(next(iter(rows.values())))
  print(f"1. ceiling: ShapesEval, {args.num} held-out scenes per category")
  print(f"{'':<26}" + "".join(f"{c[:13]:>14}" for c in cols))
  for name, acc in rows.items():
    print(f"{name:<26}" + "".join(f"{acc[c]:>14.3f}" for c in cols))
  psnr = float(np.mean(np.asarray(metrics.psnr(rec_1, gt_1))))
  print(f"reconstruction PSNR at 1x: {psnr:.2f} dB")

  std = z.reshape(-1, z.shape[-1]).std(0)  # [C]
  rng = np.random.default_rng(args.seed)
  print(f"\n2. latent-noise sensitivity at {h}x{w} (sigma in units of the per-channel std)")
  print(f"{'sigma':>6} {'PSNR vs clean render':>22} {'ShapesEval overall':>20}")
  for sigma in SIGMAS:
    noisy = z + sigma * std * rng.standard_normal(z.shape).astype(np.float32)
    img = np.clip(ae.render(noisy, h, w), 0, 1)
    p = float(np.mean(np.asarray(metrics.psnr(img, rec_1)))) if sigma else float("inf")
    print(f"{sigma:>6.2f} {p:>22.2f} {_accuracy(img, prompts)['overall']:>20.3f}")

  acc, chance, n = class_readout(ae, args.readout_scenes, args.seed + 1)
  print(f"\n3. class readout from the latent pooled to 2 x 2-cell blocks ({n} covered blocks)")
  print(f"linear readout accuracy {acc:.3f} (chance {chance:.3f})")


def class_readout(ae, num_scenes: int, seed: int, cover: float = 0.75):
  """(accuracy, chance, blocks): linear readout of the class from covered latent blocks."""
  h, w = ae.input_size
  g = (h // 2, w // 2)
  rng = np.random.default_rng(seed)
  scenes = [shapes.sample_scene(rng) for _ in range(num_scenes)]
  z = ae.encode(np.stack([shapes.render_scene(s, h, w) for s in scenes]))  # [N, h, w, C]
  pooled = np.asarray(fields.pool_to_grid(z, *g))  # [N, h/2, w/2, C]
  x, y = [], []
  for zi, scene in zip(pooled, scenes):
    cls = shapes.semantic_map(scene, g[0])[..., shapes.semantic_indices(("class",))]
    keep = cls.sum(-1) > cover
    x.append(zi[keep])
    y.append(cls[keep].argmax(-1))
  x, y = np.concatenate(x), np.concatenate(y)
  if len(y) < 8:
    raise ValueError(f"only {len(y)} covered blocks: raise --readout_scenes")
  a = np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1)
  half = len(a) // 2
  coef, *_ = np.linalg.lstsq(a[:half], np.eye(len(shapes.CLASSES))[y[:half]], rcond=None)
  acc = float(np.mean((a[half:] @ coef).argmax(-1) == y[half:]))
  chance = float(np.bincount(y[half:]).max() / (len(y) - half))
  return acc, chance, len(y)


if __name__ == "__main__":
  main()
