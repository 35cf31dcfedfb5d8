"""Parity of the pretrained Linen ports with their PyTorch references, torch-free.

The fixtures under tests/fixtures/pretrained/ were written by
scripts/make_parity_fixtures.py: tiny random-weight reference models (transformers,
lpips, pytorch-fid) saved in the real checkpoint layouts, with inputs and outputs.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infdiff import pretrained
from infdiff.models import sd_vae
from infdiff.pretrained import clip, common, dinov2, inception, lpips, qwen3, testing

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "pretrained")
TOL = 1e-4


def fixture(kind):
  path = os.path.join(FIXTURES, kind)
  return path, dict(np.load(os.path.join(path, "parity.npz")))


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_dinov2_offset_pos_interpolation_matches_torch_scale_factor():
  path, ref = fixture("dinov2")
  _, params = pretrained.load("dinov2", path)
  table = params["params"]["position_embeddings"][1:]
  for gh, gw in ((5, 7), (2, 9)):
    got = dinov2.interpolate_pos_embed(table, gh, gw, offset=0.1)
    assert max_diff(got, ref[f"pos_offset_{gh}x{gw}"]) <= TOL
  # The size-based rule (transformers 5) samples elsewhere: the two must differ.
  assert max_diff(dinov2.interpolate_pos_embed(table, 5, 7), ref["pos_offset_5x7"]) > 1e-3


@pytest.mark.parametrize("kind,tags", [("dinov2", "ab"), ("dinov2_swiglu", "a")])
def test_dinov2_parity_non_square_with_pos_interpolation_and_resize(kind, tags):
  path, ref = fixture(kind)
  model, params = pretrained.load("dinov2", path)
  assert model.pretrain_image_size // model.patch_size == 3  # 3x3 table, inputs need 5x7, 5x8
  assert model.use_swiglu_ffn == (kind == "dinov2_swiglu")
  apply = jax.jit(model.apply)
  for tag in tags:
    out = apply(params, jnp.asarray(ref[f"images_{tag}"]))
    assert out["patch_tokens"].shape == ref[f"patch_{tag}"].shape
    assert max_diff(out["cls_token"], ref[f"cls_{tag}"]) <= TOL
    assert max_diff(out["patch_tokens"], ref[f"patch_{tag}"]) <= TOL


def test_qwen3_parity_with_and_without_padding():
  path, ref = fixture("qwen3")
  model, params = pretrained.load("qwen3", path)  # sharded: index + 3 shards
  ids, mask = pretrained.tokenize(path, list(ref["texts"]), ref["input_ids"].shape[1])
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])
  assert (mask[:, 0] == 1).all() and (np.diff(mask, axis=1) <= 0).all()  # right padding
  apply = jax.jit(model.apply)
  hidden = np.asarray(apply(params, ids, mask))
  valid = mask.astype(bool)
  assert max_diff(hidden[valid], ref["hidden_padded"][valid]) <= TOL
  for b in range(len(ids)):
    n = int(mask[b].sum())
    alone = apply(params, ids[b : b + 1, :n])[0]
    assert max_diff(alone, ref["hidden_single"][b, :n]) <= TOL
    assert max_diff(alone, hidden[b, :n]) <= TOL  # padding does not change valid tokens


def test_clip_parity_image_and_text():
  path, ref = fixture("clip")
  model, params = pretrained.load("clip", path)
  out = model.apply(
      params,
      images=jnp.asarray(ref["images"]),
      input_ids=ref["input_ids"],
      attention_mask=ref["attention_mask"],
  )
  assert max_diff(out["image_embeds"], ref["image_embeds"]) <= TOL
  assert max_diff(out["text_embeds"], ref["text_embeds"]) <= TOL
  # Legacy configs (eos_token_id 2) pool at argmax(input_ids); the end-of-text id is the
  # largest here, so both pooling rules pick the same token.
  legacy = clip.Clip(**{**model_fields(model), "text": {**model.text, "eos_token_id": 2}})
  legacy_out = jax.jit(lambda p, i, m: legacy.apply(p, input_ids=i, attention_mask=m))
  got = legacy_out(params, ref["input_ids"], ref["attention_mask"])["text_embeds"]
  assert max_diff(got, ref["text_embeds"]) <= TOL
  ids, mask = pretrained.tokenize(path, ["a photo of a cat"], ref["input_ids"].shape[1])
  np.testing.assert_array_equal(ids[0], ref["input_ids"][0])
  text_only = jax.jit(lambda p, i, m: model.apply(p, input_ids=i, attention_mask=m))
  assert set(text_only(params, ids, mask)) == {"text_embeds"}


def test_lpips_vgg16_parity():
  path, ref = fixture("lpips_vgg16")
  model, params = pretrained.load("lpips_vgg16", path)
  assert model.widths == (8, 16, 32, 64, 64)
  d = jax.jit(model.apply)(params, jnp.asarray(ref["x0"]), jnp.asarray(ref["x1"]))
  assert d.shape == ref["distance"].shape
  assert max_diff(d, ref["distance"]) <= TOL
  assert abs(float(d[0])) < 1e-9 and float(d[1]) > 1e-3  # identical pair vs different pair


def test_inception_fid_parity():
  path, ref = fixture("inception_fid")
  model, params = pretrained.load("inception_fid", path)
  assert model.width_divisor == 8
  out = jax.jit(model.apply)(params, jnp.asarray(ref["images"]))
  assert out["pool"].shape == ref["pool"].shape == (2, 2048 // 8)
  assert max_diff(out["pool"], ref["pool"]) <= TOL


@pytest.mark.parametrize("kind", sorted(pretrained.KINDS))
def test_missing_checkpoint_is_one_line_error(kind, tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    pretrained.load(kind, tmp_path / "nope")
  assert "\n" not in str(e.value) and kind in str(e.value)
  (tmp_path / "empty").mkdir()
  with pytest.raises(pretrained.CheckpointNotFoundError) as e:
    pretrained.load(kind, tmp_path / "empty")
  msg = str(e.value)
  assert "\n" not in msg and "missing" in msg and ".safetensors" in msg


EXAMPLES = {
    "dinov2": lambda: (jnp.zeros((1, 8, 8, 3)),),
    "qwen3": lambda: (jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3), jnp.int32)),
    "clip": lambda: (jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 3), jnp.int32)),
    "lpips_vgg16": lambda: (jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 3))),
    "inception_fid": lambda: (jnp.zeros((1, 8, 8, 3)),),
    "sd_vae": lambda: (jnp.zeros((1, 8, 8, 3)),),
}


@pytest.mark.parametrize("kind", sorted(pretrained.KINDS))
def test_tiny_writers_load_and_every_param_has_logical_axes(kind, tmp_path):
  model, params = pretrained.load(kind, testing.write_tiny(kind, tmp_path / kind))
  leaves = jax.tree.leaves(params)
  assert leaves and all(x.dtype == jnp.float32 for x in leaves)
  boxed = jax.eval_shape(model.init, jax.random.key(0), *EXAMPLES[kind]())
  is_boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)
  boxed_leaves = jax.tree.leaves(boxed["params"], is_leaf=is_boxed)
  assert boxed_leaves and all(is_boxed(x) for x in boxed_leaves)
  # The loaded tree has exactly the init tree's structure (plain arrays, no boxes).
  assert jax.tree.structure(nn.unbox(boxed)) == jax.tree.structure(params)


# Variables of the full-size networks the abstract LPIPS / Inception give (no config.json:
# their widths come from the weights, which an abstract load does not read).
FULL_SIZE = {"lpips_vgg16": 14_714_688 + 1472, "inception_fid": 23_834_568 - 2_049_000}


@pytest.mark.parametrize("kind", sorted(pretrained.KINDS))
def test_abstract_load_reads_only_the_config_and_gives_the_loaded_shapes(kind, tmp_path):
  path = testing.write_tiny(kind, tmp_path / kind)
  model, params = pretrained.load(kind, path)
  bare = tmp_path / "bare"  # the config alone, no weights
  bare.mkdir()
  if os.path.isfile(os.path.join(path, "config.json")):
    with open(os.path.join(path, "config.json")) as f:
      (bare / "config.json").write_text(f.read())
  with pretrained.abstract():
    assert pretrained.is_abstract()
    amodel, shapes = pretrained.load(kind, bare)
    with pytest.raises(FileNotFoundError):  # a directory is still required
      pretrained.load(kind, tmp_path / "nope")
  assert not pretrained.is_abstract()
  assert type(amodel) is type(model)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  if kind in FULL_SIZE:
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    assert n == FULL_SIZE[kind]
  else:
    same = lambda x: (x.shape, x.dtype)
    assert jax.tree.map(same, shapes) == jax.tree.map(same, params)


def test_abstract_tokenize_needs_no_tokenizer(tmp_path):
  with pretrained.abstract():
    ids, mask = pretrained.tokenize(tmp_path / "no_tokenizer", ["a cat", "", "a red dog"], 7)
  assert ids.shape == mask.shape == (3, 7) and ids.dtype == mask.dtype == np.int32
  with pytest.raises(FileNotFoundError):
    pretrained.tokenize(tmp_path / "no_tokenizer", ["a cat"], 7)


def test_dinov2_swiglu_bf16_and_config_mismatch(tmp_path):
  path = testing.write_tiny_dinov2(tmp_path / "g", use_swiglu_ffn=True)
  model, params = pretrained.load("dinov2", path, image_size=(8, 12))
  x = jnp.asarray(np.random.default_rng(0).random((2, 13, 17, 3)), jnp.float32)
  out = jax.jit(model.apply)(params, x)
  assert out["patch_tokens"].shape == (2, 2, 3, 32)
  model16 = dinov2.Dinov2(**{**model_fields(model), "dtype": jnp.bfloat16})
  out16 = jax.jit(model16.apply)(params, x)
  assert out16["patch_tokens"].dtype == jnp.bfloat16
  rel = max_diff(out16["patch_tokens"], out["patch_tokens"]) / float(
      jnp.abs(out["patch_tokens"]).max()
  )
  assert rel < 0.05
  # A config that disagrees with the weights fails at load time, in one line.
  with pytest.raises(common.CheckpointFormatError) as e:
    pretrained.load("dinov2", path, hidden_size=16)
  assert "\n" not in str(e.value)


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
  _, p32 = pretrained.load("qwen3", testing.write_tiny_qwen3(tmp_path / "f32", seed=3))
  model, p16 = pretrained.load(
      "qwen3", testing.write_tiny_qwen3(tmp_path / "bf16", seed=3, weights_dtype="bfloat16")
  )
  for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16)):
    assert b.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a.astype(jnp.bfloat16), np.float32))
  ids = jnp.array([[1, 2, 3, 4]], jnp.int32)
  assert np.isfinite(np.asarray(model.apply(p16, ids))).all()


def test_safetensors_reader_matches_reference_library(tmp_path):
  from safetensors.numpy import load_file, save_file

  rng = np.random.default_rng(0)
  tensors = {
      "a": rng.random((3, 5), np.float32),
      "b": np.arange(7, dtype=np.int64),
      "c": np.ones(0, np.float16),
  }
  save_file(tensors, str(tmp_path / "ref.safetensors"))
  mine = common.load_safetensors(str(tmp_path / "ref.safetensors"))
  assert set(mine) == set(tensors)
  for k, v in tensors.items():
    np.testing.assert_array_equal(mine[k], v)
    assert mine[k].dtype == v.dtype
  common.save_safetensors(tensors, str(tmp_path / "mine.safetensors"))
  back = load_file(str(tmp_path / "mine.safetensors"))
  for k, v in tensors.items():
    np.testing.assert_array_equal(back[k], v)


def model_fields(model):
  return {f: getattr(model, f) for f in model.__dataclass_fields__ if f not in ("parent", "name")}


def test_resize_matches_identity_and_preserves_constants():
  x = jnp.ones((1, 7, 9, 3))
  for method in ("bilinear", "bicubic"):
    for aa in (False, True):
      y = common.resize(x, (13, 4), method, aa)
      assert y.shape == (1, 13, 4, 3) and max_diff(y, 1.0) < 1e-6
  assert common.resize(x, (7, 9), "bicubic", True) is x


def test_no_torch_imported():
  import sys

  assert "torch" not in sys.modules


def param_count(model, *args, **kw):
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *args, **kw)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def test_real_configs_have_the_published_parameter_counts():
  """Shapes only (no weights): the ports at full size hold exactly the reference params."""
  img, ids = jnp.zeros((1, 14, 14, 3)), jnp.zeros((1, 2), jnp.int32)
  base = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14)
  # facebook/dinov2-base: 86,580,480 including the unused mask token (768).
  assert param_count(dinov2.model_from_config({**base, "image_size": 518}), img) == 86_580_480 - 768
  text = dict(
      vocab_size=49408,
      hidden_size=512,
      intermediate_size=2048,
      num_hidden_layers=12,
      num_attention_heads=8,
  )
  vision = dict(
      hidden_size=768,
      intermediate_size=3072,
      num_hidden_layers=12,
      num_attention_heads=12,
      patch_size=32,
      image_size=224,
  )
  cfg = dict(projection_dim=512, text_config=text, vision_config=vision)
  # openai/clip-vit-base-patch32: 151,277,313 including logit_scale.
  assert param_count(clip.model_from_config(cfg), images=img, input_ids=ids) == 151_277_312
  # Qwen/Qwen3-1.7B model card: 1.7B parameters, 1.4B without the (tied) embedding.
  qcfg = dict(
      vocab_size=151936,
      hidden_size=2048,
      intermediate_size=6144,
      num_hidden_layers=28,
      num_attention_heads=16,
      num_key_value_heads=8,
      head_dim=128,
      rope_theta=1e6,
  )
  n = param_count(qwen3.model_from_config(qcfg), ids)
  assert round(n / 1e9, 1) == 1.7 and round((n - 151936 * 2048) / 1e9, 1) == 1.4
  # torchvision VGG16 features (14,714,688) + LPIPS heads (64+128+256+512+512).
  assert param_count(lpips.LpipsVgg16(), img, img) == 14_714_688 + 1472
  # torchvision Inception3 without aux head (23,834,568) minus its 1000-way fc.
  assert param_count(inception.InceptionFid(), img) == 23_834_568 - 2_049_000


# --------------------------------------------------------------------------- sd_vae


def vae_apply(model, params, x, method):
  return jax.jit(lambda p, v: model.apply(p, v, method=getattr(model, method)))(params, x)


@pytest.mark.parametrize("kind", ["sd_vae", "sd_vae_legacy"])
def test_sd_vae_parity_odd_size_both_attention_key_spellings(kind):
  _, ref = fixture("sd_vae")  # sd_vae_legacy: the same weights, old attention names
  model, params = pretrained.load("sd_vae", os.path.join(FIXTURES, kind))
  assert model.block_out_channels == (4, 8, 8) and model.scaling_factor == 0.18215
  assert ref["images"].shape == (2, 19, 23, 3)
  enc = vae_apply(model, params, jnp.asarray(ref["images"]), "encode")
  assert enc["mean"].shape == enc["logvar"].shape == ref["mean"].shape == (2, 4, 5, 4)
  assert max_diff(enc["mean"], ref["mean"]) <= TOL
  assert max_diff(enc["logvar"], ref["logvar"]) <= TOL
  dec = vae_apply(model, params, jnp.asarray(ref["mean"]), "decode")
  assert dec.shape == ref["sample"].shape == (2, 16, 20, 3)
  assert max_diff(dec, 0.5 * ref["sample"] + 0.5) <= TOL  # [0, 1] scale, not clipped
  assert float(dec.max()) > 1.0 or float(dec.min()) < 0.0


SD_VAE_CONFIG = dict(  # stable-diffusion-v1-5 vae/config.json (SDXL: scaling 0.13025)
    _class_name="AutoencoderKL",
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
)


def test_sd_vae_full_size_parameter_count():
  """Shapes only: SD1.5 / SDXL VAE = 83,653,863 params in diffusers 0.36.0."""
  model = sd_vae.from_config({**SD_VAE_CONFIG, "scaling_factor": 0.13025})
  assert model.scaling_factor == 0.13025 and model.shift_factor is None
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))))[
      "params"
  ]
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  assert count(shapes) == 83_653_863
  assert count(shapes["encoder"]) == 34_163_592
  assert count(shapes["decoder"]) == 49_490_179
  assert shapes["quant_conv"]["kernel"].shape == (1, 1, 8, 8)
  assert shapes["post_quant_conv"]["kernel"].shape == (1, 1, 4, 4)
  assert sd_vae.SDVAE.from_config(SD_VAE_CONFIG).scaling_factor == 0.18215  # the default


def test_sd_vae_shapes_odd_and_non_square_sizes(tmp_path):
  model, params = pretrained.load("sd_vae", testing.write_tiny("sd_vae", tmp_path / "v"))
  # Two levels (factor 2): each side s -> floor(s / 2), as torch's pad + stride-2 conv.
  for (h, w), (lh, lw) in (((19, 23), (9, 11)), ((16, 40), (8, 20)), ((7, 6), (3, 3))):
    x = jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32)
    enc = jax.eval_shape(lambda p, v: model.apply(p, v, method=model.encode), params, x)
    assert enc["mean"].shape == enc["logvar"].shape == (2, lh, lw, 4)
    assert enc["mean"].dtype == enc["logvar"].dtype == jnp.float32
    z = jax.ShapeDtypeStruct((2, lh, lw, 4), jnp.float32)
    out = jax.eval_shape(lambda p, v: model.apply(p, v, method=model.decode), params, z)
    assert out.shape == (2, 2 * lh, 2 * lw, 3)
  x = jnp.asarray(np.random.default_rng(0).random((2, 19, 23, 3)), jnp.float32)
  enc = vae_apply(model, params, x, "encode")
  np.testing.assert_allclose(
      jax.jit(model.apply)(params, x), vae_apply(model, params, enc["mean"], "decode"), atol=1e-6
  )
  # logvar is clamped to [-30, 20] like diffusers' DiagonalGaussianDistribution.
  qc = params["params"]["quant_conv"]
  big = {"params": {**params["params"], "quant_conv": {**qc, "bias": qc["bias"] + 1e3}}}
  moments = vae_apply(model, big, x, "moments")
  assert moments.shape == (2, 9, 11, 8) and float(moments[..., 4:].min()) > 20.0
  assert float(vae_apply(model, big, x, "encode")["logvar"].max()) == 20.0


def test_sd_vae_errors_are_one_line(tmp_path):
  bad = {**SD_VAE_CONFIG, "down_block_types": ["AttnDownEncoderBlock2D"] * 4}
  with pytest.raises(ValueError) as e:
    sd_vae.from_config(bad)
  assert "\n" not in str(e.value) and "AttnDownEncoderBlock2D" in str(e.value)
  for cfg in (
      {**SD_VAE_CONFIG, "act_fn": "gelu"},
      {**SD_VAE_CONFIG, "out_channels": 1},
      {**SD_VAE_CONFIG, "up_block_types": ["UpDecoderBlock2D"] * 3},
      {**SD_VAE_CONFIG, "_class_name": "AutoencoderTiny"},
  ):
    with pytest.raises(ValueError) as e:
      sd_vae.from_config(cfg)
    assert "\n" not in str(e.value)
  # Through the loader: an unsupported config is a CheckpointFormatError (a ValueError).
  path = testing.write_tiny_sd_vae(
      tmp_path / "attn", down_block_types=["AttnDownEncoderBlock2D"] * 2
  )
  with pytest.raises(common.CheckpointFormatError) as e:
    pretrained.load("sd_vae", path)
  assert "\n" not in str(e.value)
  # Weights the config has no place for (attention turned off) / mis-shaped weights.
  path = testing.write_tiny_sd_vae(tmp_path / "ok")
  for overrides in ({"mid_block_add_attention": False}, {"latent_channels": 8}):
    with pytest.raises(common.CheckpointFormatError) as e:
      pretrained.load("sd_vae", path, **overrides)
    assert "\n" not in str(e.value)
  with pytest.raises(pretrained.CheckpointNotFoundError) as e:
    pretrained.load("sd_vae", tmp_path / "nope")
  assert "\n" not in str(e.value) and "diffusion_pytorch_model.safetensors" in str(e.value)


def test_sd_vae_tiny_round_trip_legacy_keys_and_encoder_only_params(tmp_path):
  model, params = pretrained.load("sd_vae", testing.write_tiny("sd_vae", tmp_path / "new"))
  assert model.block_out_channels == (8, 16) and model.norm_num_groups == 4
  _, legacy = pretrained.load(
      "sd_vae", testing.write_tiny("sd_vae", tmp_path / "old", legacy_keys=True)
  )
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(legacy)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  attn = params["params"]["encoder"]["mid_block"]["attentions_0"]
  assert set(attn) == {"norm", "q", "k", "v", "proj_out"}
  assert attn["q"]["kernel"].shape == (1, 1, 16, 16)  # torch Linear -> 1x1 conv kernel
  # A frozen-encoder user can keep only the encoder half (and the decoder half alone).
  x = jnp.asarray(np.random.default_rng(1).random((1, 12, 10, 3)), jnp.float32)
  half = {"params": {k: params["params"][k] for k in ("encoder", "quant_conv")}}
  np.testing.assert_array_equal(
      vae_apply(model, half, x, "encode")["mean"], vae_apply(model, params, x, "encode")["mean"]
  )
  half = {"params": {k: params["params"][k] for k in ("decoder", "post_quant_conv")}}
  z = jax.ShapeDtypeStruct((1, 3, 4, 4), jnp.float32)
  out = jax.eval_shape(lambda p, v: model.apply(p, v, method=model.decode), half, z)
  assert out.shape == (1, 6, 8, 3)
  # Without quant_conv / post_quant_conv (e.g. SD3/FLUX-style configs).
  model2, params2 = pretrained.load(
      "sd_vae",
      testing.write_tiny_sd_vae(
          tmp_path / "noq", use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1
      ),
  )
  assert "quant_conv" not in params2["params"] and model2.shift_factor == 0.1
  assert jax.eval_shape(model2.apply, params2, x).shape == (1, 12, 10, 3)
