"""Does a text-to-image run draw the class its prompt names? A confusion table on `shapes`.

python scripts/shapes_class_confusion.py --workdir=W [--num=16] [--colour=red] [--size=32]
    [--cfg=4] [--step=N]

For each class, `--num` samples of the prompt "a <colour> <class>" (seeds 0..num-1 of the
run's generator), rendered at `--size`, read by the ShapesEval detector. One row per
prompted class: how many samples hold exactly one object of the prompted colour, read as
each class (or unclassified: 'none'), and how many hold no such object ('missing') or
several ('several'). A run that learned colour but not class has every row alike; ShapesEval
then stays near what chance gives its class checks.
"""

from __future__ import annotations

import argparse

import numpy as np

from infdiff import runs
from infdiff.data import shapes
from infdiff.evaluators import shapes_detector

COLUMNS = (*shapes.CLASSES, "none", "missing", "several")


def confusion(gen, num: int, colour: str, size: int, seed: int = 0) -> dict[str, dict[str, int]]:
  """{prompted class: {column: count}} over `num` samples per class (module docstring)."""
  if colour not in shapes.PALETTE:
    raise ValueError(f"unknown colour {colour!r}; use one of {', '.join(shapes.COLOURS)}")
  captions = [
      shapes.caption({"category": "single_object", "objects": [{"class": c, "colour": colour}]})
      for c in shapes.CLASSES
  ]
  table = {}
  for cls, caption in zip(shapes.CLASSES, captions):
    row = dict.fromkeys(COLUMNS, 0)
    z = gen.latents([caption] * num, seed=seed)
    for img in np.asarray(gen.render(z, size, size)):
      dets = [d for d in shapes_detector.detect(img) if d["colour"] == colour]
      if not dets:
        row["missing"] += 1
      elif len(dets) > 1:
        row["several"] += 1
      else:
        row[dets[0]["class"] or "none"] += 1
    table[cls] = row
  return table


def print_table(table, num: int, colour: str, size: int) -> None:
  """Prints a `confusion` table and how many samples were drawn as the prompted class."""
  print(f"prompt 'a {colour} <class>', {num} samples per class at {size}^2")
  print(f"{'prompted':10s}" + "".join(f"{c:>9s}" for c in COLUMNS))
  for cls, row in table.items():
    print(f"{cls:10s}" + "".join(f"{row[c]:9d}" for c in COLUMNS))
  right = sum(table[c][c] for c in shapes.CLASSES)
  print(f"drawn as the prompted class: {right} / {num * len(shapes.CLASSES)}")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="a run with a text-conditioned generator")
  ap.add_argument("--num", type=int, default=16, help="samples per class")
  ap.add_argument("--colour", default="red", help="the colour named in every prompt")
  ap.add_argument("--size", type=int, default=32, help="render side")
  ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default the run's)")
  ap.add_argument("--step", type=int, default=None, help="checkpoint (default newest)")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  opts = {} if args.cfg is None else {"cfg_scale": args.cfg}
  gen = runs.load_generator(args.workdir, step=args.step, **opts)
  if not gen.conditional:
    raise SystemExit("error: the run's generator is not text-conditioned")
  table = confusion(gen, args.num, args.colour, args.size, args.seed)
  print_table(table, args.num, args.colour, args.size)


if __name__ == "__main__":
  main()
