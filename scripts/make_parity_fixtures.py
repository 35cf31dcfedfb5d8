"""Builds tiny random-weight PyTorch reference models and saves parity fixtures.

Needs the `parity` extra (torch, torchvision, transformers, lpips, pytorch-fid, diffusers);
run it in a separate environment so the main one stays torch-free:

    python scripts/make_parity_fixtures.py --out tests/fixtures/pretrained
    python scripts/make_parity_fixtures.py --kinds sd_vae  # one kind (torch + diffusers)

Each maker imports its reference library itself, so one kind needs only its own packages.

For each kind it writes tests/fixtures/pretrained/<kind>/ holding the checkpoint in the
real file layout plus `parity.npz` (inputs and reference outputs):

- dinov2: transformers Dinov2Model (save_pretrained), inputs that need position-embedding
  interpolation (non-square) and an input resize.
- dinov2_swiglu: the same with the SwiGLU FFN of ViT-G (fused `weights_in` on disk).
- qwen3: transformers Qwen3ForCausalLM saved in shards (index + shards) with a tiny
  WordLevel tokenizer.json; last hidden states with right padding and per-sequence
  without padding.
- clip: transformers CLIPModel with a tiny tokenizer; get_image_features /
  get_text_features.
- lpips_vgg16: lpips.LPIPS(net='vgg') whose trunk is torchvision's `vgg.make_layers` at
  1/8 of the VGG16 widths (the full network would not fit the fixture budget) and linear
  heads of matching widths; converted from .pth with scripts/convert_to_safetensors.py.
- inception_fid: pytorch-fid's InceptionV3 wrapper around its FID Inception blocks
  (FIDInceptionA/C/E_1/E_2 + torchvision B/D) with every channel width divided by 8 (the
  torchvision BasicConv2d the blocks build is narrowed while constructing); converted
  from .pth the same way.
- sd_vae: diffusers AutoencoderKL (save_pretrained) with block_out_channels (4, 8, 8),
  one ResBlock per level and 2 GroupNorm groups; `images` of odd size (2 x 19 x 23),
  `latent_dist.mean` / `.logvar` and `decode(mean).sample` (NHWC, diffusers' [-1, 1]
  scale). The same weights with the older attention names (query/key/value/proj_attn)
  go to sd_vae_legacy/ (no parity.npz; diffusers is checked to load it to identical
  outputs).

No weights are downloaded: lpips/pytorch-fid constructors are called on their no-download
paths and every weight is random (seeded).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert_to_safetensors  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WORDS = "a photo of cat dog red blue green big small the on in with tree house sky car bird".split()
TEXTS = [
    "a photo of a cat",
    "red car on the tree",
    "dog",
    "the big blue house in the sky with a bird",
]


def randomize(module: torch.nn.Module, seed: int) -> None:
  """Seeded random weights at scales that keep activations O(1)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim == 0:
        continue  # logit_scale
      if p.ndim == 1 and ("norm" in name or name.endswith("bn.weight") or "layernorm" in name):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
      elif "lambda1" in name:
        p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      elif "embedding" in name or "cls_token" in name or "class_embedding" in name:
        p.copy_(torch.randn(p.shape, generator=g))
      else:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)
    for name, b in module.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.1 * torch.randn(b.shape, generator=g))
      elif name.endswith("running_var"):
        b.copy_(1.0 + 0.1 * torch.rand(b.shape, generator=g))


def images(seed: int, *shape) -> np.ndarray:
  return np.random.default_rng(seed).random(shape).astype(np.float32)  # [B, H, W, 3] in [0, 1]


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
  return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def word_tokenizer(path: str, pad: str, specials=(), template=None):
  from tokenizers import Tokenizer, models, pre_tokenizers, processors

  vocab = {"[UNK]": 0}
  for w in WORDS:
    vocab[w] = len(vocab)
  for s in (*specials, pad):
    vocab.setdefault(s, len(vocab))
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  if template is not None:
    bos, eos = template
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"pad_token": pad, "model_max_length": 128}, f)
  return tok


def encode(tok, texts, max_length, pad_id):
  tok.enable_truncation(max_length)
  tok.enable_padding(direction="right", pad_id=pad_id, length=max_length)
  enc = tok.encode_batch(texts)
  return np.array([e.ids for e in enc], np.int64), np.array(
      [e.attention_mask for e in enc], np.int64
  )


def make_dinov2(out: str, swiglu: bool = False) -> None:
  from transformers import Dinov2Config, Dinov2Model

  cfg = Dinov2Config(
      use_swiglu_ffn=swiglu,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      mlp_ratio=2,
      patch_size=4,
      image_size=12,
      layerscale_value=1.0,
      attn_implementation="eager",
  )
  model = Dinov2Model(cfg).eval()
  randomize(model, 1)
  model.save_pretrained(out, safe_serialization=True)
  res = {}
  # A: 20x28 is a multiple of the patch: 5x7 grid vs the 3x3 table -> interpolation.
  # B: 21x30 is resized (bicubic, antialias) to 20x32 first -> 5x8 grid.
  cases = (("a", (20, 28), None), ("b", (21, 30), (20, 32)))
  for tag, (h, w), size in cases[:1] if swiglu else cases:
    x = images(10 + len(res), 2, h, w, 3)
    t = nchw(x)
    if size is not None:
      t = F.interpolate(t, size=size, mode="bicubic", align_corners=False, antialias=True)
    with torch.no_grad():
      hs = model(pixel_values=normalise(t, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state
    gh, gw = t.shape[2] // 4, t.shape[3] // 4
    res[f"images_{tag}"] = x
    res[f"cls_{tag}"] = hs[:, 0].numpy()
    res[f"patch_{tag}"] = hs[:, 1:].reshape(2, gh, gw, -1).numpy()
  # The "+0.1 offset" interpolation of the original DINOv2 code / transformers 4.
  pos = (
      model.embeddings.position_embeddings.detach()[:, 1:].reshape(1, 3, 3, -1).permute(0, 3, 1, 2)
  )
  for gh, gw in ((5, 7), (2, 9)):
    table = F.interpolate(
        pos, scale_factor=((gh + 0.1) / 3, (gw + 0.1) / 3), mode="bicubic", align_corners=False
    )
    assert table.shape[2:] == (gh, gw)
    res[f"pos_offset_{gh}x{gw}"] = table.permute(0, 2, 3, 1).reshape(gh * gw, -1).numpy()
  np.savez(os.path.join(out, "parity.npz"), **res)


def make_qwen3(out: str) -> None:
  from transformers import Qwen3Config, Qwen3ForCausalLM

  os.makedirs(out, exist_ok=True)
  tok = word_tokenizer(out, "<|endoftext|>", specials=("<|im_start|>", "<|im_end|>"))
  pad_id = tok.token_to_id("<|endoftext|>")
  cfg = Qwen3Config(
      vocab_size=tok.get_vocab_size(),
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=16,
      rope_theta=10000.0,
      max_position_embeddings=256,
      tie_word_embeddings=True,
      attn_implementation="eager",
  )
  model = Qwen3ForCausalLM(cfg).eval()
  randomize(model, 2)
  model.save_pretrained(out, safe_serialization=True, max_shard_size="40KB")
  max_len = 12
  ids, mask = encode(tok, TEXTS, max_len, pad_id)
  with torch.no_grad():
    padded = model.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    padded = padded.last_hidden_state.numpy()
    single = np.zeros_like(padded)
    for b in range(len(TEXTS)):
      n = int(mask[b].sum())
      hs = model.model(input_ids=torch.from_numpy(ids[b : b + 1, :n])).last_hidden_state
      single[b, :n] = hs[0].numpy()
  np.savez(
      os.path.join(out, "parity.npz"),
      input_ids=ids.astype(np.int32),
      attention_mask=mask.astype(np.int32),
      hidden_padded=padded,
      hidden_single=single,
      texts=np.array(TEXTS),
  )


def make_clip(out: str) -> None:
  from transformers import CLIPConfig, CLIPModel

  os.makedirs(out, exist_ok=True)
  bos, eos = "<|startoftext|>", "<|endoftext|>"
  tok = word_tokenizer(out, eos, specials=(bos, eos), template=(bos, eos))
  text = dict(
      vocab_size=tok.get_vocab_size(),
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=16,
      bos_token_id=tok.token_to_id(bos),
      eos_token_id=tok.token_to_id(eos),
      pad_token_id=tok.token_to_id(eos),
  )
  vision = dict(
      hidden_size=48,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=16,
      patch_size=4,
  )
  cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
  cfg._attn_implementation = "eager"
  model = CLIPModel(cfg).eval()
  randomize(model, 3)
  model.save_pretrained(out, safe_serialization=True)
  x = images(20, 2, 20, 28, 3)
  t = nchw(x)
  s = min(t.shape[2:])
  top, left = int(round((t.shape[2] - s) / 2)), int(round((t.shape[3] - s) / 2))
  t = t[:, :, top : top + s, left : left + s]
  t = F.interpolate(t, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
  ids, mask = encode(tok, TEXTS, 10, tok.token_to_id(eos))
  with torch.no_grad():
    img = model.get_image_features(pixel_values=normalise(t, CLIP_MEAN, CLIP_STD))
    txt = model.get_text_features(
        input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
    )
  img = img if torch.is_tensor(img) else img.pooler_output
  txt = txt if torch.is_tensor(txt) else txt.pooler_output
  np.savez(
      os.path.join(out, "parity.npz"),
      images=x,
      input_ids=ids.astype(np.int32),
      attention_mask=mask.astype(np.int32),
      image_embeds=img.numpy(),
      text_embeds=txt.numpy(),
  )


def make_lpips(out: str) -> None:
  import lpips
  import lpips.pretrained_networks as pn
  import torchvision

  div = 8
  cfg = [c if c == "M" else c // div for c in torchvision.models.vgg.cfgs["D"]]
  widths = [64 // div, 128 // div, 256 // div, 512 // div, 512 // div]

  class _NarrowVgg(torch.nn.Module):

    def __init__(self, **kwargs):
      super().__init__()
      self.features = torchvision.models.vgg.make_layers(cfg)

  orig = pn.tv.vgg16
  pn.tv.vgg16 = lambda *a, **k: _NarrowVgg()
  try:
    model = lpips.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False)
  finally:
    pn.tv.vgg16 = orig
  lins = [lpips.NetLinLayer(c, use_dropout=True) for c in widths]
  for i, lin in enumerate(lins):
    setattr(model, f"lin{i}", lin)
  model.lins = torch.nn.ModuleList(lins)
  randomize(model, 4)
  with torch.no_grad():
    for lin in lins:  # lpips heads are non-negative
      lin.model[1].weight.abs_()
  model.eval()
  vgg_state = {f"features.{k.split('.', 1)[1]}": v for k, v in model.net.state_dict().items()}
  lin_state = {
      k: v
      for k, v in model.state_dict().items()
      if k.startswith("lin") and not k.startswith("lins")
  }
  with tempfile.TemporaryDirectory() as tmp:
    torch.save(vgg_state, os.path.join(tmp, "vgg16.pth"))
    torch.save(lin_state, os.path.join(tmp, "vgg.pth"))
    convert_to_safetensors.convert_lpips_vgg16(
        os.path.join(tmp, "vgg16.pth"), os.path.join(tmp, "vgg.pth"), out
    )
  x0, x1 = images(30, 3, 32, 40, 3), images(31, 3, 32, 40, 3)
  x1[0] = x0[0]  # identical pair -> distance 0
  with torch.no_grad():
    d = model(nchw(x0), nchw(x1), normalize=True).reshape(-1).numpy()
  np.savez(os.path.join(out, "parity.npz"), x0=x0, x1=x1, distance=d)


def make_inception(out: str) -> None:
  import pytorch_fid.inception as pfi
  import torchvision.models.inception as tvi

  div = 8
  base = tvi.BasicConv2d

  class _Narrow(base):

    def __init__(self, in_channels, out_channels, **kwargs):
      n = lambda c: c if c == 3 else c // div
      super().__init__(n(in_channels), n(out_channels), **kwargs)

  def narrow_fid_inception():
    # pfi.fid_inception_v3 without its weight download.
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return net

  tvi.BasicConv2d = _Narrow
  orig = pfi.fid_inception_v3
  holder = {}

  def build():
    holder["net"] = narrow_fid_inception()
    return holder["net"]

  pfi.fid_inception_v3 = build
  try:
    wrapper = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval()
  finally:
    tvi.BasicConv2d = base
    pfi.fid_inception_v3 = orig
  net = holder["net"]
  randomize(net, 5)
  with tempfile.TemporaryDirectory() as tmp:
    torch.save(net.state_dict(), os.path.join(tmp, "pt_inception.pth"))
    convert_to_safetensors.convert_inception_fid(os.path.join(tmp, "pt_inception.pth"), out)
  x = images(40, 2, 40, 56, 3)
  with torch.no_grad():
    pool = wrapper(nchw(x))[0].reshape(2, -1).numpy()
  np.savez(os.path.join(out, "parity.npz"), images=x, pool=pool)


# diffusers' current mid-block attention names -> the older ones still found in some
# SD1.x `vae/diffusion_pytorch_model.safetensors` files.
SD_VAE_LEGACY_NAMES = {
    "to_q": "query",
    "to_k": "key",
    "to_v": "value",
    "to_out.0": "proj_attn",
}


def make_sd_vae(out: str) -> None:
  from diffusers import AutoencoderKL
  from safetensors.torch import load_file, save_file

  widths = (4, 8, 8)  # 4 -> 8 exercises the 1x1 conv_shortcut; 3 levels, factor 4
  model = AutoencoderKL(
      in_channels=3,
      out_channels=3,
      down_block_types=("DownEncoderBlock2D",) * len(widths),
      up_block_types=("UpDecoderBlock2D",) * len(widths),
      block_out_channels=widths,
      layers_per_block=1,
      latent_channels=4,
      norm_num_groups=2,
      sample_size=32,
  ).eval()
  randomize(model, 6)
  model.save_pretrained(out, safe_serialization=True)

  x = images(50, 2, 19, 23, 3)  # odd sides: 19x23 -> 9x11 -> 4x5 latent

  def run(vae):
    with torch.no_grad():
      dist = vae.encode(nchw(x) * 2.0 - 1.0).latent_dist
      sample = vae.decode(dist.mean).sample
    nhwc = lambda t: t.permute(0, 2, 3, 1).contiguous().numpy()
    return nhwc(dist.mean), nhwc(dist.logvar), nhwc(sample)

  mean, logvar, sample = run(model)
  # The same weights under the legacy attention key names, in a sibling directory.
  legacy = out.rstrip(os.sep) + "_legacy"
  shutil.rmtree(legacy, ignore_errors=True)
  os.makedirs(legacy)
  shutil.copy(os.path.join(out, "config.json"), legacy)
  weights = "diffusion_pytorch_model.safetensors"
  state = load_file(os.path.join(out, weights))
  renamed = {}
  for key, value in state.items():
    for new, old in SD_VAE_LEGACY_NAMES.items():
      key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
    renamed[key] = value
  assert sum(".query." in k for k in renamed) == 4  # weight + bias, encoder and decoder
  save_file(renamed, os.path.join(legacy, weights), metadata={"format": "pt"})
  reloaded = AutoencoderKL.from_pretrained(legacy).eval()
  for a, b in zip((mean, logvar, sample), run(reloaded)):
    assert np.array_equal(a, b), "diffusers loads the legacy copy to different outputs"
  np.savez(os.path.join(out, "parity.npz"), images=x, mean=mean, logvar=logvar, sample=sample)
  size = sum(os.path.getsize(os.path.join(legacy, f)) for f in os.listdir(legacy))
  print(f"sd_vae_legacy: {sorted(os.listdir(legacy))} {size / 1e6:.2f} MB")


MAKERS = {
    "dinov2": make_dinov2,
    "dinov2_swiglu": lambda out: make_dinov2(out, swiglu=True),  # the ViT-G FFN
    "qwen3": make_qwen3,
    "clip": make_clip,
    "lpips_vgg16": make_lpips,
    "inception_fid": make_inception,
    "sd_vae": make_sd_vae,  # also writes sd_vae_legacy/
}


def main(argv=None):
  parser = argparse.ArgumentParser(description="Write parity fixtures for infdiff.pretrained.")
  parser.add_argument("--out", default="tests/fixtures/pretrained")
  parser.add_argument("--kinds", nargs="*", default=list(MAKERS))
  args = parser.parse_args(argv)
  torch.manual_seed(0)
  for kind in args.kinds:
    path = os.path.join(args.out, kind)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    MAKERS[kind](path)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print(f"{kind}: {sorted(os.listdir(path))} {size / 1e6:.2f} MB")


if __name__ == "__main__":
  main()
