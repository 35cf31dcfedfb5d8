"""Tests for infdiff.data: decoding, sources, transforms and the grain loader."""

from __future__ import annotations

import json
import os

import data_fixtures as fx
import ml_collections
import numpy as np
import pytest

from infdiff import fields
from infdiff.data import decode, pipeline, sources, transforms


def _cfg(source: str, **overrides) -> ml_collections.ConfigDict:
  c = pipeline.default_data_config()
  c.source = source
  c.min_size = fx.MIN_SIZE
  c.max_pixels = fx.MAX_PIXELS
  c.keep_strings = True
  c.split = "all"
  c.num_threads = 2
  for k, v in overrides.items():
    c[k] = v
  return c


def _small_square(record, rng, batch_rng):
  """Keeps the id and a 16 x 16 resize: enough to follow records through the loader."""
  return transforms.RandomResizedSquare(size=16)(record, rng, batch_rng)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("messy"))
  return root, fx.write_messy_folder(root)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("plain"))
  return root, fx.write_plain_folder(root, 12)


def _decode(root, name):
  return decode.decode_file(os.path.join(root, name), min_size=1)


# ------------------------------------------------------------------------------- decoding


def test_conversions_to_uint8_rgb(messy):
  root, _ = messy
  gray = _decode(root, "gray.png")
  assert gray.shape == (20, 24, 3) and gray.dtype == np.uint8
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  np.testing.assert_array_equal(gray[0, :, 0], np.arange(0, 240, 10))

  rgba = _decode(root, "rgba.png")
  np.testing.assert_array_equal(rgba[:, :10], 255)  # transparent -> white
  np.testing.assert_array_equal(rgba[:, 10:], np.broadcast_to([255, 0, 0], (20, 10, 3)))

  g16 = _decode(root, "gray16.png")
  assert g16[0, 0, 0] == 128 and g16[0, 15, 0] == 255 and g16[5, 5, 0] == 0

  c16 = _decode(root, "rgb16.png")
  np.testing.assert_array_equal(c16[0, 0], [255, 128, 0])

  cmyk = _decode(root, "cmyk.jpg")
  assert cmyk.shape == (24, 24, 3)
  np.testing.assert_allclose(cmyk.reshape(-1, 3).mean(0), [255, 0, 0], atol=3)


def test_exif_orientation_applied(messy):
  root, _ = messy
  im = _decode(root, "exif6.jpg")
  # Stored 20 x 40 with red on the left; turned 90 degrees clockwise: 40 x 20, red on top.
  assert im.shape == (40, 20, 3)
  np.testing.assert_allclose(im[2:18].reshape(-1, 3).mean(0), [255, 0, 0], atol=8)
  np.testing.assert_allclose(im[22:38].reshape(-1, 3).mean(0), [0, 0, 255], atol=8)


@pytest.mark.parametrize(
    "name,reason",
    [
        ("empty.jpg", "empty"),
        ("text.png", "not_image"),
        ("one.png", "too_small"),
        ("huge.png", "too_large"),
        ("truncated.jpg", "truncated"),
    ],
)
def test_decode_failure_reasons(messy, name, reason):
  root, _ = messy
  with pytest.raises(decode.DecodeError) as e:
    decode.decode_file(os.path.join(root, name), min_size=fx.MIN_SIZE, max_pixels=fx.MAX_PIXELS)
  assert e.value.reason == reason


def test_probe_reads_header_only(messy):
  root, _ = messy
  # The truncated JPEG passes the cheap header probe: only decoding finds it.
  h = decode.probe_file(os.path.join(root, "truncated.jpg"))
  assert (h.width, h.height, h.format) == (64, 64, "JPEG")


# -------------------------------------------------------------------------------- sources


def test_folder_scan_counts_and_valid_files(messy):
  root, expected = messy
  src = sources.make_source(
      f"folder:{root}", split="all", min_size=fx.MIN_SIZE, max_pixels=fx.MAX_PIXELS
  )
  rel = sorted(os.path.relpath(p, root) for p in src.paths)
  assert rel == sorted(expected["valid"] + ["truncated.jpg"])  # header fine: kept for now
  counts = {k: v for k, v in src.skip_counts.items() if v}
  assert counts == expected["scan_skips"]
  rec = src[src.paths.index(os.path.join(root, "UPPER.JPG"))]
  assert set(rec) == {"encoded", "caption", "id"} and rec["caption"] == ""


def test_loader_yields_only_valid_images_and_counts_skips(messy):
  root, expected = messy
  cfg = _cfg(f"folder:{root}")
  loader = pipeline.make_loader(cfg, _small_square, global_batch_size=1, seed=0, num_epochs=1)
  ids = [os.path.relpath(b["id"][0], root) for b in loader]
  # The truncated file's slot is filled by another valid file: one more row than files.
  assert len(ids) == len(expected["valid"]) + 1
  assert set(ids) == set(expected["valid"])
  counts = {k: v for k, v in loader.skip_counts().items() if v}
  assert counts == {**expected["scan_skips"], **expected["decode_skips"]}
  assert loader.skip_summary().startswith("skipped 5 files: ")


def test_empty_or_invalid_folder_raises_one_line(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError) as e:
    sources.make_source(f"folder:{empty}")
  assert str(empty) in str(e.value) and "\n" not in str(e.value)

  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "a.jpg").write_bytes(b"")
  (bad / "b.png").write_text("nope")
  with pytest.raises(ValueError) as e:
    pipeline.make_loader(_cfg(f"folder:{bad}"), _small_square, global_batch_size=1, seed=0)
  msg = str(e.value)
  assert str(bad) in msg and "\n" not in msg and "empty=1" in msg and "not_image=1" in msg

  for spec in (f"folder:{tmp_path}/missing", "nosuch:thing", "folder:"):
    with pytest.raises(ValueError) as e:
      sources.make_source(spec)
    assert "\n" not in str(e.value)


def test_hash_split_is_disjoint_and_complete(tmp_path):
  names = fx.write_plain_folder(str(tmp_path), 40, size=(16, 16))
  kw = dict(eval_fraction=0.25)
  train = sources.make_source(f"folder:{tmp_path}", split="train", **kw)
  held = sources.make_source(f"folder:{tmp_path}", split="eval", **kw)
  t, e = set(train.paths), set(held.paths)
  assert not t & e and len(t | e) == len(names) and 0 < len(e) < len(t)
  # Deterministic: the same files every time.
  assert set(sources.make_source(f"folder:{tmp_path}", split="eval", **kw).paths) == e


def test_photos_have_mixed_native_sizes():
  src = sources.make_source("photos", split="all")
  assert len(src) >= 8
  shapes = set()
  for i in range(len(src)):
    rec = sources.load_record(src[i], min_size=1, max_pixels=decode.DEFAULT_MAX_PIXELS)
    assert rec["image"].dtype == np.uint8 and rec["image"].shape[-1] == 3
    shapes.add(rec["image"].shape)
  assert len(shapes) >= 5


def test_captions_jsonl_and_sidecar(tmp_path):
  jroot = tmp_path / "jsonl"
  fx.write_plain_folder(str(jroot / "imgs"), 3)
  lines = [{"file": f"imgs/img_{i:03d}.png", "caption": f"picture {i}"} for i in range(3)]
  (jroot / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  src = sources.make_source(f"captions:{jroot}", split="all")
  got = {os.path.basename(src[i]["id"]): src[i]["caption"] for i in range(len(src))}
  assert got == {f"img_{i:03d}.png": f"picture {i}" for i in range(3)}

  sroot = tmp_path / "sidecar"
  fx.write_plain_folder(str(sroot), 3)
  (sroot / "img_000.txt").write_text("a red square\n")
  (sroot / "img_002.txt").write_text("two blue circles")
  src = sources.make_source(f"captions:{sroot}", split="all")
  got = {os.path.basename(src[i]["id"]): src[i]["caption"] for i in range(len(src))}
  assert got == {
      "img_000.png": "a red square",
      "img_001.png": "",
      "img_002.png": "two blue circles",
  }


def test_tfds_example_mapping():
  png = fx.png16_rgb(np.full((4, 5, 3), 65535, np.uint16))
  rec = sources.tfds_to_record({"image": png, "caption": b"a cat"}, 7, "image", "caption")
  assert rec == {"id": "7", "encoded": png, "caption": "a cat"}
  arr = np.zeros((4, 5, 1), np.uint8)
  rec = sources.tfds_to_record({"image": arr, "label": 3}, 2, "image", "caption")
  assert rec["image"].shape == (4, 5, 3) and rec["caption"] == ""


def test_shapes_source_if_available():
  shapes = pytest.importorskip("infdiff.data.shapes")
  del shapes
  src = sources.make_source("shapes", split="train", size=32, num_scenes=8)
  rec = src[0]
  assert rec["image"].dtype == np.uint8 and rec["image"].shape == (32, 32, 3)
  loader = pipeline.make_loader(
      _cfg("shapes"),
      transforms.MultiResCrop(enc_size=16, s_max=2.0, target_window=8),
      global_batch_size=2,
      seed=0,
      source=src,
  )
  assert next(loader)["target"].shape == (2, 8, 8, 3)


# ----------------------------------------------------------------------------- transforms


def _ramp_image(h: int, w: int) -> np.ndarray:
  """uint8 [h, w, 3] whose channels are (row, col, 0): every pixel names its position."""
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  return np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)


@pytest.mark.parametrize("shape", [(150, 200), (70, 40)])
def test_multires_crop_window(shape):
  r, p, s_max = 16, 8, 4.0
  t = transforms.MultiResCrop(enc_size=r, s_max=s_max, target_window=p)
  image = _ramp_image(*shape)
  scales = []
  for seed in range(20):
    rng = np.random.default_rng(seed)
    out = t({"image": image, "caption": "c", "id": "x"}, rng, np.random.default_rng(0))
    assert out["image"].shape == (r, r, 3) and out["target"].shape == (p, p, 3)
    assert out["coord"].shape == (p, p, 2) and out["cell"].shape == (2,)
    assert all(out[k].dtype == np.float32 for k in ("image", "target", "coord", "cell", "scale"))
    assert out["caption"] == "c"
    side = int(round(2.0 / out["cell"][0]))
    assert 1.0 <= out["scale"] <= s_max and side == round(out["scale"] * r)
    assert r <= side <= min(shape)
    # Recover the crop position from the pixel values: rows/cols of the target window.
    win_top, win_left = np.round(out["target"][0, 0, :2] * 255).astype(int)
    # Encoder input cell (0, 0) averages crop rows top .. top + side / r: its mean row.
    crop_top = int(round(out["image"][0, 0, 0] * 255 - side / (2 * r) + 0.5))
    crop_left = int(round(out["image"][0, 0, 1] * 255 - side / (2 * r) + 0.5))
    wt, wl = win_top - crop_top, win_left - crop_left
    assert 0 <= wt <= side - p and 0 <= wl <= side - p
    np.testing.assert_allclose(out["coord"], fields.crop_grid(side, side, wt, wl, p, p), atol=1e-6)
    crop = image[crop_top : crop_top + side, crop_left : crop_left + side]
    np.testing.assert_allclose(out["image"], fields.area_downsample(crop, r, r) / 255, atol=1e-5)
    np.testing.assert_allclose(out["target"], crop[wt : wt + p, wl : wl + p] / 255, atol=1e-6)
    scales.append(float(out["scale"]))
  assert max(scales) > 1.5  # the scale actually varies


def test_multires_crop_whole_grid_shares_scale_per_batch():
  r = 8
  t = transforms.MultiResCrop(enc_size=r, s_max=3.0, target_window=None)
  image = fx.rgb_image(40, 50, 0)
  sides = set()
  for b in range(6):
    outs = [
        t({"image": image}, np.random.default_rng([i, b]), np.random.default_rng([99, b]))
        for i in range(3)
    ]
    side = outs[0]["target"].shape[0]
    assert side in (8, 16, 24)
    for o in outs:
      assert o["target"].shape == (side, side, 3) and o["image"].shape == (r, r, 3)
      np.testing.assert_allclose(o["coord"], fields.coord_grid(side, side))
    sides.add(side)
  assert len(sides) > 1


def test_small_image_upscaled_and_random_resized_square():
  t = transforms.MultiResCrop(enc_size=32, s_max=4.0, target_window=16)
  out = t({"image": fx.rgb_image(20, 30, 0)}, np.random.default_rng(0), np.random.default_rng(0))
  assert out["image"].shape == (32, 32, 3) and float(out["scale"]) == 1.0
  rrs = transforms.RandomResizedSquare(size=16, min_scale=0.5)
  out = rrs({"image": fx.rgb_image(40, 60, 1), "caption": "x"}, np.random.default_rng(1), None)
  assert out["image"].shape == (16, 16, 3) and out["caption"] == "x"
  assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0
  # Largest square of a constant image stays constant.
  const = np.full((30, 50, 3), 51, np.uint8)
  out = transforms.RandomResizedSquare(size=8)({"image": const}, np.random.default_rng(0), None)
  np.testing.assert_allclose(out["image"], 0.2, atol=1e-6)


def test_registry_and_tokenize(plain):
  root, _ = plain
  assert isinstance(transforms.make_transform("multires_crop"), transforms.MultiResCrop)
  with pytest.raises(ValueError):
    transforms.make_transform("nope")

  def tok(caption):
    ids = np.zeros(6, np.int32)
    ids[: len(caption)] = [ord(c) for c in caption[:6]]
    return ids, (ids > 0).astype(np.int32)

  t = transforms.Compose([transforms.RandomResizedSquare(size=8), transforms.Tokenize(tok)])
  loader = pipeline.make_loader(
      _cfg(f"folder:{root}", keep_strings=False), t, global_batch_size=4, seed=0
  )
  batch = next(loader)
  assert batch["text_ids"].shape == (4, 6) and batch["text_ids"].dtype == np.int32
  assert set(batch) == {"image", "text_ids", "text_mask", "index"}  # strings dropped


# --------------------------------------------------------------------------------- loader


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_iterator_state_round_trip(plain, num_workers):
  root, _ = plain
  cfg = _cfg(f"folder:{root}", num_workers=num_workers, keep_strings=False)
  t = transforms.MultiResCrop(enc_size=8, s_max=3.0, target_window=4)

  def fresh():
    return pipeline.make_loader(cfg, t, global_batch_size=4, seed=3)

  loader = fresh()
  for _ in range(5):  # past the end of the first epoch (12 files = 3 batches)
    next(loader)
  state = json.loads(json.dumps(loader.get_state()))  # must survive serialisation
  expected = [next(loader) for _ in range(3)]
  loader.close()
  restored = fresh()
  restored.set_state(state)
  got = [next(restored) for _ in range(3)]
  restored.close()
  for a, b in zip(expected, got):
    _assert_batches_equal(a, b)
  # A different seed gives a different stream.
  other = pipeline.make_loader(cfg, t, global_batch_size=4, seed=4)
  assert not np.array_equal(next(other)["target"], next(fresh())["target"])
  other.close()


def test_decode_skips_survive_state(messy):
  root, _ = messy
  cfg = _cfg(f"folder:{root}")
  loader = pipeline.make_loader(cfg, _small_square, global_batch_size=1, seed=0, num_epochs=1)
  for _ in loader:
    pass
  state = json.loads(json.dumps(loader.get_state()))
  fresh = pipeline.make_loader(cfg, _small_square, global_batch_size=1, seed=0, num_epochs=1)
  assert fresh.skip_counts()["truncated"] == 0
  fresh.set_state(state)
  assert fresh.skip_counts()["truncated"] == 1


def test_process_shards_are_disjoint(plain):
  root, names = plain
  cfg = _cfg(f"folder:{root}")
  seen = []
  for pi in range(2):
    loader = pipeline.make_loader(
        cfg,
        _small_square,
        global_batch_size=4,
        seed=0,
        process_index=pi,
        process_count=2,
        num_epochs=1,
    )
    batches = list(loader)
    assert all(b["image"].shape == (2, 16, 16, 3) for b in batches)
    seen.append({os.path.basename(i) for b in batches for i in b["id"]})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(names)
  with pytest.raises(ValueError):
    pipeline.make_loader(cfg, _small_square, global_batch_size=3, seed=0, process_count=2)


def test_config_driven_loader_on_photos():
  cfg = pipeline.default_data_config()
  cfg.source = "photos"
  t = transforms.MultiResCrop(enc_size=16, target_window=8)
  loader = pipeline.make_loader(cfg, t, global_batch_size=2, seed=0)
  batch = next(loader)
  assert batch["image"].shape == (2, 16, 16, 3) and batch["target"].shape == (2, 8, 8, 3)
  assert set(batch) == {"image", "target", "coord", "cell", "scale", "index"}


def test_whole_grid_targets_stack_per_batch(plain):
  root, _ = plain
  t = transforms.MultiResCrop(enc_size=8, s_max=3.0, target_window=None)
  loader = pipeline.make_loader(_cfg(f"folder:{root}"), t, global_batch_size=3, seed=0)
  sides = set()
  for _ in range(8):
    batch = next(loader)
    side = batch["target"].shape[1]
    assert batch["target"].shape == (3, side, side, 3) and side in (8, 16, 24)
    np.testing.assert_allclose(batch["scale"], side / 8)
    sides.add(side)
  assert len(sides) > 1


def test_tfds_source_on_disk(tmp_path):
  import sys  # noqa: PLC0415

  name = fx.write_tfds_dataset(str(tmp_path))
  src = sources.make_source(f"tfds:{name}", split="train", data_dir=str(tmp_path))
  assert len(src) == 4 and all("encoded" in src[i] for i in range(4))
  # TFDS shuffles examples when writing: match them by caption, not by index.
  assert {src[i]["caption"] for i in range(4)} == {f"caption {i}" for i in range(4)}
  cfg = _cfg(f"tfds:{name}", data_dir=str(tmp_path), split="train")
  loader = pipeline.make_loader(cfg, _small_square, global_batch_size=1, seed=0, num_epochs=1)
  caps = [b["caption"][0] for b in loader]
  # The truncated example ('caption 3') is replaced by another one, never yielded.
  assert set(caps) == {"caption 0", "caption 1", "caption 2"} and len(caps) == 4
  assert loader.skip_counts()["truncated"] == 1
  assert "tensorflow" not in sys.modules
  with pytest.raises(ValueError) as e:
    sources.make_source("tfds:no_such_dataset_here", data_dir=str(tmp_path))
  assert "\n" not in str(e.value)


def test_symlink_cycle_and_plain_dict_config(tmp_path):
  fx.write_plain_folder(str(tmp_path / "a"), 2)
  os.symlink(str(tmp_path), str(tmp_path / "a" / "loop"))  # a folder cycle
  src = sources.make_source(f"folder:{tmp_path}", split="all")
  assert sorted(os.path.basename(p) for p in src.paths) == ["img_000.png", "img_001.png"]
  cfg = {"source": f"folder:{tmp_path}", "split": "all", "num_threads": 1}
  loader = pipeline.make_loader(cfg, "random_resized_square", global_batch_size=2, seed=0)
  assert next(loader)["image"].shape == (2, 64, 64, 3)


def test_batches_carry_the_source_index_of_every_example():
  """batch['index'] is the source record each example came from (Patch-DM's per-image
  codes look it up): it names the same record as the example's id."""
  cfg = _cfg("shapes", shapes_size=16)
  cfg.source_kwargs.num_scenes = 12
  cfg.split = "train"
  loader = pipeline.make_loader(cfg, _small_square, global_batch_size=4, seed=0)
  for _ in range(3):
    batch = next(loader)
    assert batch["index"].dtype == np.int32 and batch["index"].shape == (4,)
    assert [f"shapes/train/{i}" for i in batch["index"]] == list(batch["id"])
