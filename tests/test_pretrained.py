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
