"""What the text side of a RaPD stage-2 run on `shapes` sees: vocabulary and caption coverage.

python scripts/caption_coverage.py --workdir=W [--num=96] [--captions=5000]

Prints (1) whether every word of the ShapesEval prompts is in the run's word vocabulary
(an unknown word reaches the denoiser as the shared `unk` id), and the longest prompt in
tokens against `text.max_length` (longer prompts are cut); (2) how the training scenes
cover what the prompts ask for: scenes per category, object counts of the counting
scenes, relations of the position scenes, and how many (class, colour) pairs of the
prompts occur in training captions.
"""

from __future__ import annotations

import argparse
import collections

from infdiff import runs
from infdiff.data import shapes
from infdiff.data.pipeline import source_from_config
from infdiff.models.text import split_words


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="a RaPD run (its stage 2 has vocab.json)")
  ap.add_argument("--num", type=int, default=96, help="ShapesEval prompts per category")
  ap.add_argument("--captions", type=int, default=5000, help="training scenes to scan")
  args = ap.parse_args(argv)

  run = runs.load_run(args.workdir, stage="rapd_stage2")
  text = run.method.text
  prompts = shapes.eval_prompts(args.num)
  words = collections.Counter(w for _, cap, _ in prompts for w in split_words(cap))
  vocab = getattr(text, "vocab", None)
  print(f"1. vocabulary ({len(vocab) if vocab else 'pretrained'} ids)")
  if vocab is not None:
    missing = sorted(set(words) - set(vocab.words))
    print(f"   prompt words: {len(words)}, missing from the vocabulary: {missing or 'none'}")
  longest = max(int(text.tokenize_one(cap)[1].sum()) for _, cap, _ in prompts)
  print(f"   longest prompt: {longest} tokens (max_length {text.max_length})")

  source = source_from_config(run.config.data, split="train")
  n = min(len(source), args.captions)
  scenes = [source.scene(i) for i in range(n)]
  cats = collections.Counter(s["category"] for s in scenes)
  counts = collections.Counter(
      s["counts"][0]["count"] for s in scenes if s["category"] == "counting"
  )
  rels = collections.Counter(s["relation"]["type"] for s in scenes if s["relation"])
  pairs = {(o["class"], o["colour"]) for s in scenes for o in s["objects"]}
  asked = {(o["class"], o["colour"]) for _, _, s in prompts for o in s["objects"]}
  print(f"2. the first {n} training scenes")
  print("   per category: " + ", ".join(f"{c} {cats[c]}" for c in shapes.CATEGORIES))
  print("   counting scenes by count: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
  print(
      "   position scenes by relation: " + ", ".join(f"{k}: {v}" for k, v in sorted(rels.items()))
  )
  print(
      f"   (class, colour) pairs of the prompts seen in training: {len(asked & pairs)} of "
      f"{len(asked)} (all {len(shapes.CLASSES) * len(shapes.COLOURS)} possible: {len(pairs)})"
  )


if __name__ == "__main__":
  main()
