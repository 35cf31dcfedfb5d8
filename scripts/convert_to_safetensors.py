"""Converts the .pth checkpoints of LPIPS-VGG16 and FID Inception to safetensors, once.

Needs torch (the `parity` extra); the converted directories load torch-free with
`infdiff.pretrained.load`.

    python scripts/convert_to_safetensors.py lpips_vgg16 \
        --vgg16 vgg16-397923af.pth --lpips lpips/weights/v0.1/vgg.pth --out ckpt/lpips_vgg16
    python scripts/convert_to_safetensors.py inception_fid \
        --inception pt_inception-2015-12-05-6726825d.pth --out ckpt/inception_fid

Inputs: torchvision's ImageNet VGG16 (`vgg16-397923af.pth`; only `features.*` is kept),
the lpips package's v0.1 linear heads (`weights/v0.1/vgg.pth`, shipped inside the pip
package) and pytorch-fid's FID Inception weights (`pt_inception-2015-12-05-6726825d.pth`;
the 1008-way classifier and batch counters are dropped).
"""

from __future__ import annotations

import argparse
import os
import re

import numpy as np
from safetensors.numpy import save_file

VGG_FILE = "vgg16.safetensors"  # names must match infdiff/pretrained/lpips.py
LIN_FILE = "lpips_vgg_v0.1.safetensors"
INCEPTION_FILE = "pt_inception-2015-12-05.safetensors"  # infdiff/pretrained/inception.py


def _load_pth(path: str) -> dict[str, np.ndarray]:
  import torch

  state = torch.load(path, map_location="cpu", weights_only=True)
  if "state_dict" in state and isinstance(state["state_dict"], dict):
    state = state["state_dict"]
  return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "numpy")}


def _save(tensors: dict[str, np.ndarray], out_dir: str, name: str) -> str:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in sorted(tensors.items())}, path)
  return path


def convert_lpips_vgg16(vgg16_pth: str, lpips_pth: str, out_dir: str) -> list[str]:
  """Writes vgg16.safetensors (features.*) and lpips_vgg_v0.1.safetensors (lin*.*)."""
  vgg = {k: v for k, v in _load_pth(vgg16_pth).items() if k.startswith("features.")}
  if not vgg:
    raise ValueError(f"{vgg16_pth} holds no torchvision VGG 'features.*' tensors")
  lin = {k: v for k, v in _load_pth(lpips_pth).items() if re.match(r"^lin\d+\.", k)}
  if not lin:
    raise ValueError(f"{lpips_pth} holds no lpips 'lin*' tensors")
  return [_save(vgg, out_dir, VGG_FILE), _save(lin, out_dir, LIN_FILE)]


def convert_inception_fid(inception_pth: str, out_dir: str) -> list[str]:
  """Writes pt_inception-2015-12-05.safetensors (conv + batch-norm tensors only)."""
  keep = {
      k: v
      for k, v in _load_pth(inception_pth).items()
      if not k.startswith(("fc.", "AuxLogits.")) and not k.endswith("num_batches_tracked")
  }
  if "Conv2d_1a_3x3.conv.weight" not in keep:
    raise ValueError(f"{inception_pth} is not an Inception3 state dict")
  return [_save(keep, out_dir, INCEPTION_FILE)]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("kind", choices=["lpips_vgg16", "inception_fid"])
  parser.add_argument("--vgg16", help="torchvision vgg16 .pth (lpips_vgg16)")
  parser.add_argument("--lpips", help="lpips weights/v0.1/vgg.pth (lpips_vgg16)")
  parser.add_argument("--inception", help="pytorch-fid pt_inception .pth (inception_fid)")
  parser.add_argument("--out", required=True, help="output directory")
  args = parser.parse_args(argv)
  if args.kind == "lpips_vgg16":
    if not (args.vgg16 and args.lpips):
      parser.error("lpips_vgg16 needs --vgg16 and --lpips")
    written = convert_lpips_vgg16(args.vgg16, args.lpips, args.out)
  else:
    if not args.inception:
      parser.error("inception_fid needs --inception")
    written = convert_inception_fid(args.inception, args.out)
  for path in written:
    print(path)


if __name__ == "__main__":
  main()
