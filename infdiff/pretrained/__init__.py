"""Pretrained backbones as Flax Linen ports, loaded from local files (no hub access).

    model, params = infdiff.pretrained.load(kind, path, **overrides)
    out = model.apply(params, ...)

`params` is a plain pytree of float32 arrays for frozen use; `overrides` sets module
fields (e.g. `dtype=jnp.bfloat16`, DINOv2 `image_size=(224, 224)`). Image inputs are
float32 [B, H, W, 3] in [0, 1]; every port applies its own resize and normalisation.
A missing directory or file raises `CheckpointNotFoundError` (a FileNotFoundError) with a
one-line message naming the files expected; a checkpoint that does not fit its config
raises `CheckpointFormatError` (a ValueError).

Checkpoints to provide (download once with any tool, then point `path` at the directory):

- 'dinov2': an HF DINOv2 directory, e.g. facebook/dinov2-small, facebook/dinov2-base,
  facebook/dinov2-large, facebook/dinov2-giant: `config.json`, `model.safetensors`.
  `apply(params, images)` -> {'cls_token': [B, D], 'patch_tokens': [B, h, w, D]}, after the
  final LayerNorm. Inputs are resized (bicubic, antialiased) to `image_size` if set, else
  to the nearest multiple of the patch size; position embeddings are interpolated as HF.
- 'qwen3': an HF Qwen3 directory, e.g. Qwen/Qwen3-1.7B: `config.json`,
  `model.safetensors.index.json` + `model-0000x-of-0000y.safetensors` (or a single
  `model.safetensors`), `tokenizer.json` (and `tokenizer_config.json` for the pad token).
  `apply(params, input_ids, attention_mask)` -> hidden states [B, L, D] (final norm applied).
  Use `tokenize(path, texts, max_length)` for the ids: right padding.
- 'clip': an HF CLIP directory, e.g. openai/clip-vit-base-patch32, openai/clip-vit-large-patch14:
  `config.json`, `model.safetensors` (+ `tokenizer.json` for `tokenize`).
  `apply(params, images=None, input_ids=None, attention_mask=None)` ->
  {'image_embeds', 'text_embeds'} [B, P], projected and NOT L2-normalised.
- 'lpips_vgg16': a directory with `vgg16.safetensors` and `lpips_vgg_v0.1.safetensors`,
  converted from torchvision's `vgg16-397923af.pth` (ImageNet VGG16) and the lpips
  package's `lpips/weights/v0.1/vgg.pth`:
      python scripts/convert_to_safetensors.py lpips_vgg16 --vgg16 vgg16-397923af.pth \
          --lpips .../lpips/weights/v0.1/vgg.pth --out DIR
  `apply(params, x, y)` -> distances [B].
- 'inception_fid': a directory with `pt_inception-2015-12-05.safetensors`, converted from
  pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (github.com/mseitzer/pytorch-fid
  releases):
      python scripts/convert_to_safetensors.py inception_fid \
          --inception pt_inception-2015-12-05-6726825d.pth --out DIR
  `apply(params, images)` -> {'pool': [B, 2048]}.
- 'sd_vae': a diffusers AutoencoderKL directory, the `vae` folder of an SD1.x / SD2 / SDXL
  checkpoint (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5/vae,
  stabilityai/sdxl-vae): `config.json`, `diffusion_pytorch_model.safetensors` (the fp16
  variant is used when only it is present). Both attention key spellings load
  (to_q/to_k/to_v/to_out.0 and the older query/key/value/proj_attn).
  `apply(params, images, method=model.encode)` -> {'mean', 'logvar'} [B, h, w, C],
  unscaled (multiply by `model.scaling_factor` for the diffusion latent space), logvar
  clamped to [-30, 20]; runs only the encoder. `apply(params, latent, method=model.decode)`
  -> images [B, H, W, 3] on the [0, 1] scale, not clipped. The module is
  infdiff.models.sd_vae.SDVAE.

The converter needs torch (the `parity` extra); nothing under infdiff imports torch.
Safetensors are read by a small torch-free reader that also handles bfloat16 storage
(Qwen3's Hub weights); every parameter is returned as float32.

Shapes without weights: inside `with infdiff.pretrained.abstract():` `load` reads only the
directory's `config.json` (LPIPS and Inception: nothing, the full-size network) and returns
the module with its params as `jax.ShapeDtypeStruct` leaves (the tree `load` would return,
nothing allocated), and `tokenize` returns zero ids and an all-ones mask of the requested
shape without a tokenizer. Lowering and compiling a paper-size step with frozen backbones
(benchmarks/paper_scale.py) needs only their config.json files this way.

For tests, `infdiff.pretrained.testing.write_tiny(kind, path)` writes a tiny random-weight
checkpoint of any kind in the same file layout (seconds, no torch). Parity with the PyTorch
references is checked in tests/test_pretrained.py against fixtures made by
scripts/make_parity_fixtures.py.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from infdiff.pretrained.common import CheckpointFormatError, CheckpointNotFoundError

KINDS = {
    "dinov2": "infdiff.pretrained.dinov2",
    "qwen3": "infdiff.pretrained.qwen3",
    "clip": "infdiff.pretrained.clip",
    "lpips_vgg16": "infdiff.pretrained.lpips",
    "inception_fid": "infdiff.pretrained.inception",
    "sd_vae": "infdiff.pretrained.sd_vae",
}

__all__ = [
    "KINDS",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "abstract",
    "is_abstract",
    "load",
    "tokenize",
]

_abstract_depth = 0  # > 0 inside `abstract()` (a plain global: data reader threads see it too)


@contextlib.contextmanager
def abstract() -> Iterator[None]:
  """Within it `load` and `tokenize` give shapes only (see the module docstring)."""
  global _abstract_depth
  _abstract_depth += 1
  try:
    yield
  finally:
    _abstract_depth -= 1


def is_abstract() -> bool:
  """Whether `load` and `tokenize` currently give shapes only (inside `abstract()`)."""
  return _abstract_depth > 0


def load(kind: str, path: str | os.PathLike, **overrides) -> tuple[Any, Any]:
  """Builds the Linen port of `kind` and its params from a local checkpoint.

  Args:
    kind: one of 'dinov2', 'qwen3', 'lpips_vgg16', 'inception_fid', 'clip', 'sd_vae'.
    path: checkpoint directory (see the module docstring for the files per kind).
    **overrides: module fields to override, e.g. dtype.

  Returns:
    (model, params); call `model.apply(params, ...)`. Inside `abstract()` the params are
    jax.ShapeDtypeStruct leaves and only config.json is read.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown pretrained kind {kind!r}; known: {', '.join(KINDS)}")
  port = importlib.import_module(KINDS[kind])
  return (port.abstract if is_abstract() else port.load)(os.fspath(path), **overrides)


def tokenize(
    path: str | os.PathLike, texts: list[str], max_length: int
) -> tuple[np.ndarray, np.ndarray]:
  """Tokenises texts with the `tokenizer.json` of a local HF directory.

  Sequences are truncated to `max_length` and right-padded to exactly `max_length` (RaPD
  uses 128) with the pad token named in tokenizer_config.json (else id 0; pad ids are
  masked, so their value does not matter). Special tokens follow the tokenizer's own
  post-processor (Qwen3 adds none; CLIP adds start/end of text).

  Args:
    path: directory holding tokenizer.json (and optionally tokenizer_config.json).
    texts: strings to encode.
    max_length: output length L.

  Returns:
    (input_ids, attention_mask), int32 numpy arrays of shape [len(texts), max_length];
    inside `abstract()` zeros and ones, and no tokenizer is read.
  """
  if is_abstract():
    shape = (len(texts), int(max_length))
    return np.zeros(shape, np.int32), np.ones(shape, np.int32)
  from tokenizers import Tokenizer

  from infdiff.pretrained import common

  path = common.require_files("tokenizer", path, ["tokenizer.json"])
  tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
  pad_id = 0
  cfg_path = os.path.join(path, "tokenizer_config.json")
  if os.path.isfile(cfg_path):
    pad = common.read_json(cfg_path).get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if pad is not None and tok.token_to_id(pad) is not None:
      pad_id = tok.token_to_id(pad)
  tok.enable_truncation(max_length)
  tok.enable_padding(direction="right", pad_id=pad_id, length=max_length)
  enc = tok.encode_batch(list(texts))
  ids = np.array([e.ids for e in enc], np.int32)
  mask = np.array([e.attention_mask for e in enc], np.int32)
  return ids, mask
