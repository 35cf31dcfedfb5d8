"""Tests for the shapes dataset and its detector."""

import json

import numpy as np
import pytest

from infdiff.data import pipeline, shapes
from infdiff.evaluators import metrics, shapes_detector
from infdiff.fields import area_downsample


def _scene(i, category=None, rotate=False):
  return shapes.sample_scene(np.random.default_rng([7, i]), category, rotate=rotate)


@pytest.mark.parametrize("rotate", [False, True])
def test_render_scale_consistency_40db(rotate):
  # A 512^2 render box-filtered to 64^2 must match the 64^2 render: both are the same
  # continuous scene averaged over the 64^2 pixel footprints.
  worst = np.inf
  for i in range(12):
    scene = _scene(i, shapes.CATEGORIES[i % 6], rotate)
    big = shapes.render_scene(scene, 512, 512)
    small = shapes.render_scene(scene, 64, 64)
    worst = min(worst, float(metrics.scale_consistency_psnr(big, small)))
  assert worst >= 40.0, worst


def test_render_non_square_and_non_integer_ratio():
  scene = _scene(3, "counting")
  big = shapes.render_scene(scene, 300, 420)
  small = shapes.render_scene(scene, 48, 80)
  assert big.shape == (300, 420, 3) and big.dtype == np.float32
  assert float(metrics.psnr(area_downsample(big, 48, 80), small)) >= 40.0


def test_crop_equals_window_of_full_render():
  scene = _scene(5, "position")
  full = shapes.render_scene(scene, 96, 128)
  crop = shapes.render_scene(scene, 96, 128, crop=(17, 40, 50, 61))
  np.testing.assert_allclose(crop, full[17:67, 40:101], atol=1e-6)


def test_render_colours_and_range():
  scene = _scene(0, "colors")
  img = shapes.render_scene(scene, 64, 64)
  assert img.min() >= 0.0 and img.max() <= 1.0
  obj = scene["objects"][0]
  r, c = (np.asarray(obj["centre"]) + 1.0) * 32.0  # centre pixel (a shape's interior)
  np.testing.assert_allclose(img[int(r), int(c)], shapes.PALETTE[obj["colour"]], atol=1e-5)
  np.testing.assert_allclose(img[0, 0], scene["background"], atol=1e-5)


def test_shape_areas_match_analytic():
  for cls in shapes.CLASSES:
    scene = {
        "background": [0.0, 0.0, 0.0],
        "objects": [{"class": cls, "colour": "yellow", "centre": [0.1, -0.2], "size": 0.5}],
    }
    img = shapes.render_scene(scene, 256, 256)
    area = img[..., 0].sum() / shapes.PALETTE["yellow"][0] * (2.0 / 256) ** 2
    np.testing.assert_allclose(area, shapes.unit_area(cls) * 0.25, rtol=2e-3)


@pytest.mark.parametrize("category", shapes.CATEGORIES)
def test_scene_structure(category):
  for i in range(10):
    scene = _scene(i, category)
    assert scene["category"] == category
    assert json.loads(json.dumps(scene)) == scene
    objs = scene["objects"]
    for a in range(len(objs)):
      ca, sa = np.asarray(objs[a]["centre"]), objs[a]["size"]
      assert np.all(np.abs(ca) + sa <= 1.0)
      for b in range(a):
        cb, sb = np.asarray(objs[b]["centre"]), objs[b]["size"]
        assert np.hypot(*(ca - cb)) >= sa + sb + shapes.MARGIN - 1e-5
    assert sum(c["count"] for c in scene["counts"]) == len(objs)
    if category == "position":
      rel = scene["relation"]
      a, b = objs[rel["subject"]]["centre"], objs[rel["object"]]["centre"]
      assert shapes_detector.relation_holds(rel["type"], a, b)
    else:
      assert scene["relation"] is None
    if category == "color_attr":
      assert objs[0]["colour"] != objs[1]["colour"] and objs[0]["class"] != objs[1]["class"]


def test_captions():
  obj = lambda cls, col, rc=(0.0, 0.0): {"class": cls, "colour": col, "centre": list(rc)}
  assert shapes.caption({"category": "colors", "objects": [obj("circle", "red")]}) == (
      "a red circle"
  )
  scene = {"category": "two_object", "objects": [obj("square", "blue"), obj("star", "orange")]}
  assert shapes.caption(scene) == "a blue square and an orange star"
  scene = {
      "category": "counting",
      "objects": [obj("star", "yellow")] * 3,
      "counts": [{"class": "star", "colour": "yellow", "count": 3}],
  }
  assert shapes.caption(scene) == "three yellow stars"
  scene = {
      "category": "position",
      "objects": [obj("circle", "red"), obj("square", "blue")],
      "relation": {"subject": 0, "object": 1, "type": "left of"},
  }
  assert shapes.caption(scene) == "a red circle to the left of a blue square"


def test_source_deterministic_and_splits_disjoint():
  train = shapes.ShapesSource(size=32, num_scenes=50, seed=3, split="train")
  again = shapes.ShapesSource(size=32, num_scenes=50, seed=3, split="train")
  ev = shapes.ShapesSource(size=32, num_scenes=50, seed=3, split="eval")
  item = train[7]
  assert item["image"].shape == (32, 32, 3) and item["image"].dtype == np.uint8
  assert item["id"] == "shapes/train/7"
  np.testing.assert_array_equal(item["image"], again[7]["image"])
  assert item["meta"] == again[7]["meta"]
  assert json.loads(item["meta"]) == train.scene(7)
  assert item["caption"] == train.scene(7)["caption"]
  train_metas = {train[i]["meta"] for i in range(len(train))}
  assert len(train_metas) == len(train)
  assert not train_metas & {ev[i]["meta"] for i in range(len(ev))}
  other_seed = shapes.ShapesSource(size=32, num_scenes=50, seed=4, split="train")
  assert other_seed[7]["meta"] != item["meta"]
  assert len({json.loads(m)["category"] for m in train_metas}) == len(shapes.CATEGORIES)
  with pytest.raises(IndexError):
    train.scene(50)


def test_source_categories_subset():
  both = ("counting", "position")
  src = shapes.ShapesSource(size=16, num_scenes=40, seed=3, categories=both)
  cats = [src.scene(i)["category"] for i in range(len(src))]
  assert set(cats) == set(both)  # both drawn, nothing else
  assert src.scene(5) == shapes.ShapesSource(size=16, num_scenes=40, seed=3, categories=both).scene(
      5
  )
  # The default (all six) draws scene for scene what sample_scene draws with no category.
  full = shapes.ShapesSource(size=16, num_scenes=40, seed=3)
  for i in (0, 9, 17):
    rng = np.random.default_rng([3, shapes.SPLITS["train"], i])
    assert full.scene(i) == shapes.sample_scene(rng, None)
  d = pipeline.default_data_config()
  d.shapes_size, d.shapes_categories = 16, ("colors",)
  src = pipeline.source_from_config(d, split="train")
  assert {src.scene(i)["category"] for i in range(20)} == {"colors"}
  assert len(src) == 10_000  # the ShapesSource default
  d.shapes_num_scenes = 1_000_000
  big = pipeline.source_from_config(d, split="train")
  assert len(big) == 1_000_000 and big.scene(999_999)["category"] == "colors"
  assert big.scene(7) == src.scene(7)  # scene i does not depend on how many there are
  with pytest.raises(ValueError, match="num_scenes must be positive"):
    shapes.ShapesSource(num_scenes=0)
  for bad in (("single_object", "singel_object"), ()):
    with pytest.raises(ValueError, match="subset of"):
      shapes.ShapesSource(categories=bad)


def test_eval_prompts():
  prompts = shapes.eval_prompts(3, seed=0)
  assert [p[0] for p in prompts] == [c for c in shapes.CATEGORIES for _ in range(3)]
  assert all(p[1] == p[2]["caption"] for p in prompts)
  assert prompts == shapes.eval_prompts(3, seed=0)
  assert prompts != shapes.eval_prompts(3, seed=1)


def _accuracy(prompts, res):
  images = [shapes.render_scene(meta, res, res) for _, _, meta in prompts]
  return shapes_detector.shapes_eval(images, prompts)


def test_detector_on_ground_truth_64():
  result = _accuracy(shapes.eval_prompts(60, seed=0), 64)
  assert set(result["per_category"]) == set(shapes.CATEGORIES)
  assert result["overall"] >= 0.98, result
  assert min(result["per_category"].values()) >= 0.95, result


def test_detector_on_ground_truth_512_rotated():
  # 512^2 renders are costlier; fewer scenes, with random rotations for good measure.
  result = _accuracy(shapes.eval_prompts(10, seed=1, rotate=True), 512)
  assert result["overall"] >= 0.98, result


def test_detector_outputs_and_failures():
  scene = _scene(11, "color_attr")
  img = shapes.render_scene(scene, 128, 128)
  dets = shapes_detector.detect(img)
  assert len(dets) == 2
  for d in dets:
    match = [o for o in scene["objects"] if (o["class"], o["colour"]) == (d["class"], d["colour"])]
    assert len(match) == 1
    np.testing.assert_allclose(d["centroid"], match[0]["centre"], atol=0.02)
  # uint8 input gives the same detections.
  dets8 = shapes_detector.detect(np.round(img * 255).astype(np.uint8))
  assert sorted((d["class"], d["colour"]) for d in dets8) == sorted(
      (d["class"], d["colour"]) for d in dets
  )
  # A blank image satisfies nothing; swapped colours fail colour attribution.
  blank = np.broadcast_to(np.asarray(scene["background"], np.float32), img.shape)
  assert shapes_detector.detect(blank) == []
  assert not shapes_detector.score(blank, scene)
  assert shapes_detector.score(img, scene)
  swapped = json.loads(json.dumps(scene))
  a, b = swapped["objects"]
  a["colour"], b["colour"] = b["colour"], a["colour"]
  assert not shapes_detector.score(img, swapped)


def test_detector_position_and_counting_rules():
  scene = _scene(2, "position")
  img = shapes.render_scene(scene, 64, 64)
  assert shapes_detector.score(img, scene)
  flipped = json.loads(json.dumps(scene))
  opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
  flipped["relation"]["type"] = opposite[scene["relation"]["type"]]
  assert not shapes_detector.score(img, flipped)

  scene = _scene(4, "counting")
  img = shapes.render_scene(scene, 64, 64)
  assert shapes_detector.score(img, scene)
  wrong = json.loads(json.dumps(scene))
  wrong["counts"][0]["count"] += 1
  assert not shapes_detector.score(img, wrong)


def test_detector_leaves_non_shapes_unclassified():
  img = np.full((64, 64, 3), 0.85, np.float32)
  img[20:26, 10:50] = shapes.PALETTE["red"]  # a bar: no class fits its silhouette
  img[40:55, 40:55] = shapes.PALETTE["blue"]  # a pixel-aligned square
  dets = {d["colour"]: d for d in shapes_detector.detect(img)}
  assert set(dets) == {"red", "blue"}
  assert dets["red"]["class"] is None and dets["red"]["iou"] < shapes_detector.MIN_IOU
  assert dets["blue"]["class"] == "square"
  np.testing.assert_allclose(dets["blue"]["centroid"], [-1 + 95 / 64, -1 + 95 / 64], atol=1e-6)


def test_semantic_map_known_answer():
  """One red circle of radius 0.5 at the centre: class and colour coverage equal its area,
  the offsets cancel by symmetry, background fills the rest."""
  scene = {
      "objects": [
          {"class": "circle", "colour": "red", "centre": [0.0, 0.0], "size": 0.5, "angle": 0.0}
      ]
  }
  m = shapes.semantic_map(scene, 4, sub=16)
  names = shapes.SEMANTIC_FEATURES
  assert m.shape == (4, 4, shapes.SEMANTIC_DIM) == (4, 4, len(names))
  cov = m[..., names.index("class:circle")]
  # Mean coverage over the domain [-1, 1]^2 is the circle's area / 4.
  assert cov.mean() == pytest.approx(np.pi * 0.25 / 4.0, abs=2e-3)
  np.testing.assert_allclose(m[..., names.index("colour:red")], cov)
  np.testing.assert_allclose(m[..., 0] + cov, 1.0, atol=1e-6)
  for other in ("class:square", "class:star", "colour:blue"):
    assert np.all(m[..., names.index(other)] == 0.0)
  # The four middle cells each hold a quarter of the circle; the row offset is negative
  # in the upper ones, the column offset in the left ones, and both sum to zero.
  mid = cov[1:3, 1:3]
  np.testing.assert_allclose(mid, mid[0, 0], atol=1e-6)
  dr, dc = m[..., names.index("offset:row")], m[..., names.index("offset:col")]
  assert dr[1, 1] < 0 < dr[2, 1] and dc[1, 1] < 0 < dc[1, 2]
  assert abs(dr.sum()) < 1e-5 and abs(dc.sum()) < 1e-5
  # A quarter disc's centroid lies 4 / (3 pi) of the radius from the centre.
  assert -dr[1, 1] / mid[0, 0] == pytest.approx(4.0 / (3.0 * np.pi), abs=0.02)


def test_crop_scene_renders_and_maps_the_window():
  """A cropped scene renders as the crop of the full render and maps as its sub-grid."""
  n = 128
  for seed in range(3):
    scene = shapes.sample_scene(np.random.default_rng(seed))
    full = shapes.render_scene(scene, n, n)
    for top, left, side in ((16, 32, 64), (0, 0, 96), (40, 8, 48)):
      sub = shapes.crop_scene(scene, (top / n, left / n, side / n, side / n))
      np.testing.assert_allclose(
          shapes.render_scene(sub, side, side),
          full[top : top + side, left : left + side],
          atol=1e-5,
      )
    # Cells of 16 px: the window (16, 32, 64) is cells [1:5, 2:6] of the 8 x 8 map.
    sub = shapes.crop_scene(scene, (16 / n, 32 / n, 64 / n, 64 / n))
    np.testing.assert_allclose(
        shapes.semantic_map(sub, 4), shapes.semantic_map(scene, 8)[1:5, 2:6], atol=1e-5
    )
  with pytest.raises(ValueError, match="not square"):
    shapes.crop_scene(scene, (0.0, 0.0, 0.5, 0.25))


def test_semantic_indices_select_feature_groups():
  names = shapes.SEMANTIC_FEATURES
  assert shapes.semantic_indices(()) == list(range(shapes.SEMANTIC_DIM))
  bc = shapes.semantic_indices(("background", "class"))
  assert [names[i] for i in bc] == ["background"] + [f"class:{c}" for c in shapes.CLASSES]
  assert [names[i] for i in shapes.semantic_indices(("offset",))] == ["offset:row", "offset:col"]
  with pytest.raises(ValueError, match="unknown semantic feature group"):
    shapes.semantic_indices(("colours",))
