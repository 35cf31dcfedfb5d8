"""Random-access data sources, picked by one string (`config.data.source`).

  'shapes'            procedural scenes (`infdiff.data.shapes.ShapesSource`), any size.
  'photos'            the natural photographs shipped inside scikit-image (no download),
                      at their native mixed sizes (300x451 ... 1411x1411).
  'folder:/path'      every image under /path, recursively; extensions (any case):
                      .jpg .jpeg .png .bmp .gif .webp .tif .tiff.
  'captions:/path'    image + caption pairs: /path/captions.jsonl with lines
                      {"file": "rel/path.jpg", "caption": "..."}, or, without that file, a
                      sidecar rel/path.txt next to each image (missing sidecar -> '').
  'tfds:name'         `tfds.data_source(name, split=split, data_dir=data_dir)` (array_record,
                      images stored encoded; read without TensorFlow; never downloads: the
                      dataset must be prepared in data_dir beforehand).

Record format. `source[i]` is a dict with 'caption' (str, '' if none), 'id' (str: file path
or index) and either 'image' (uint8 [H, W, 3] RGB) or 'encoded' (the file's bytes). File
sources return 'encoded' so that indexing a large folder stays cheap; `load_record` (used by
the pipeline in its reader threads/workers) decodes it into 'image'.

Bad files are never dropped silently. A folder scan reads each file's header once, at
construction, and rejects zero-byte files, non-images, images over `max_pixels` and images
with a side under `min_size`; `source.skip_counts` holds the count per reason and
`source.skipped` the (path, reason) pairs. Failures that only decoding finds (truncated
data) are handled by the pipeline (see pipeline.py). A source with no valid image raises a
one-line ValueError naming the folder at construction, before anything compiles.

Held-out split for 'photos', 'folder:' and 'captions:'. Each file is assigned to 'eval' when
a hash of its path relative to the root (sha1, so stable across machines and runs) falls
below `eval_fraction`, else to 'train'; split='all' keeps every file. The assignment of a
file never depends on the other files, so adding images to a folder does not move old ones
between splits. For 'tfds:' the split string is passed to TFDS unchanged ('train',
'validation', 'train[:90%]', ...). For 'shapes' it is passed to `ShapesSource`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from infdiff.data import decode as decode_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Default fraction of files held out by the hash split (choice: large enough for a stable
# FID-style estimate on a folder of thousands, small enough not to starve training).
DEFAULT_EVAL_FRACTION = 0.05

# Colour photographs in skimage/data (native sizes from 300x451 to 1411x1411).
PHOTO_FILES_RGB = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)
# Greyscale photographs; decoding replicates them to RGB.
PHOTO_FILES_GRAY = (
    "camera.png",
    "coins.png",
    "moon.png",
    "grass.png",
    "gravel.png",
    "brick.png",
    "clock_motion.png",
    "microaneurysms.png",
)


def hash_split_fraction(key: str) -> float:
  """Deterministic value in [0, 1) for a key (sha1 based, independent of PYTHONHASHSEED)."""
  digest = hashlib.sha1(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def in_split(key: str, split: str, eval_fraction: float) -> bool:
  """Whether the file with relative path `key` belongs to `split` ('train', 'eval', 'all')."""
  if split == "all":
    return True
  held_out = hash_split_fraction(key) < eval_fraction
  if split == "eval":
    return held_out
  if split == "train":
    return not held_out
  raise ValueError(f"unknown split {split!r} for a file source (use 'train', 'eval' or 'all')")


def _format_counts(counts: dict[str, int]) -> str:
  return ", ".join(f"{k}={v}" for k, v in counts.items() if v) or "none"


@dataclasses.dataclass
class FileSource:
  """Images on disk, each with a caption; `__getitem__` returns encoded bytes.

  Build it with `scan_files` (which rejects bad files from their headers) rather than
  directly. Picklable, so grain worker processes can read from it.
  """

  paths: list[str]  # absolute paths of the accepted files
  captions: list[str]  # one per path ('' if none)
  name: str = ""  # what was scanned, for messages
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason)
  min_size: int = decode_lib.DEFAULT_MIN_SIZE  # the decode limits the pipeline applies
  max_pixels: int = decode_lib.DEFAULT_MAX_PIXELS
  # (height, width) per path from the header scan (empty when built without one).
  sizes: list[tuple[int, int]] = dataclasses.field(default_factory=list)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.paths[index]
    with open(path, "rb") as f:
      data = f.read()
    return {"encoded": data, "caption": self.captions[index], "id": path}

  @property
  def skip_counts(self) -> dict[str, int]:
    """Files rejected at scan time, per reason (all reasons present, zeros included)."""
    counts = dict.fromkeys(decode_lib.REASONS, 0)
    for _, reason in self.skipped:
      counts[reason] += 1
    return counts


def scan_files(
    entries: Sequence[tuple[str, str]],
    *,
    name: str,
    min_size: int = decode_lib.DEFAULT_MIN_SIZE,
    max_pixels: int = decode_lib.DEFAULT_MAX_PIXELS,
    num_threads: int = 8,
) -> FileSource:
  """Header-checks (path, caption) entries and keeps the usable ones, counting the rest.

  Args:
    entries: (absolute path, caption) pairs in a deterministic order.
    name: what is being scanned (a folder), used in the error message.
    min_size: smallest accepted image side.
    max_pixels: largest accepted width * height.
    num_threads: threads for header reads (I/O bound; a thread pool hides latency on
      network file systems).

  Returns:
    A FileSource over the accepted files, in the order of `entries`.

  Raises:
    ValueError: (one line) when no file is usable.
  """

  def check(path: str) -> tuple[str | None, tuple[int, int]]:
    try:
      header = decode_lib.probe_file(path, min_size=min_size, max_pixels=max_pixels)
    except decode_lib.DecodeError as e:
      return e.reason, (0, 0)
    except OSError:
      return "unreadable", (0, 0)  # missing file, permission denied, I/O error
    return None, (header.height, header.width)

  paths = [p for p, _ in entries]
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    results = list(pool.map(check, paths))
  keep_paths, keep_caps, keep_sizes, skipped = [], [], [], []
  for (path, caption), (reason, size) in zip(entries, results):
    if reason is None:
      keep_paths.append(path)
      keep_caps.append(caption)
      keep_sizes.append(size)
    else:
      skipped.append((path, reason))
  if not keep_paths:
    counts = collections.Counter(r for _, r in skipped)
    raise ValueError(
        f"no valid image in {name} ({len(entries)} candidate files, skipped: "
        f"{_format_counts(dict(counts))})"
    )
  return FileSource(keep_paths, keep_caps, name, skipped, min_size, max_pixels, keep_sizes)


def list_images(root: str) -> list[str]:
  """Image files under root (recursive, extension case-insensitive), sorted relative paths."""
  found = []
  seen = set()  # real paths of visited folders: symlinked folders are followed, cycles not
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:
      dirnames[:] = []
      continue
    seen.add(real)
    dirnames.sort()
    for fn in filenames:
      if fn.lower().endswith(IMAGE_EXTENSIONS):
        found.append(os.path.relpath(os.path.join(dirpath, fn), root))
  return sorted(found)


def _check_dir(root: str, scheme: str) -> str:
  if not root:
    raise ValueError(f"data source '{scheme}:' needs a path, e.g. '{scheme}:/data/images'")
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise ValueError(f"data source '{scheme}:{root}': not a directory")
  return root


def folder_source(
    root: str, *, split: str, eval_fraction: float, sidecar_captions: bool = False, **scan_kw
) -> FileSource:
  """Every image under `root` in `split`; captions from sidecar .txt files if asked."""
  root = _check_dir(root, "captions" if sidecar_captions else "folder")
  entries = []
  for rel in list_images(root):
    if not in_split(rel, split, eval_fraction):
      continue
    path = os.path.join(root, rel)
    caption = ""
    if sidecar_captions:
      txt = os.path.splitext(path)[0] + ".txt"
      if os.path.isfile(txt):
        with open(txt, encoding="utf-8", errors="replace") as f:
          caption = f.read().strip()
    entries.append((path, caption))
  return scan_files(entries, name=f"folder {root} (split={split})", **scan_kw)


def captions_source(root: str, *, split: str, eval_fraction: float, **scan_kw) -> FileSource:
  """Image + caption pairs from root/captions.jsonl, else from sidecar .txt files."""
  root = _check_dir(root, "captions")
  jsonl = os.path.join(root, "captions.jsonl")
  if not os.path.isfile(jsonl):
    return folder_source(
        root, split=split, eval_fraction=eval_fraction, sidecar_captions=True, **scan_kw
    )
  entries = []
  with open(jsonl, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        item = json.loads(line)
        rel, caption = str(item["file"]), str(item.get("caption", ""))
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{jsonl}:{lineno}: expected {{'file': ..., 'caption': ...}}") from e
      if in_split(rel, split, eval_fraction):
        entries.append((os.path.join(root, rel), caption))
  return scan_files(entries, name=f"captions file {jsonl} (split={split})", **scan_kw)


def photos_source(
    *, split: str, eval_fraction: float, include_gray: bool = False, **scan_kw
) -> FileSource:
  """The photographs bundled in scikit-image's package directory (read with PIL).

  There are only 9 colour photos (17 with include_gray), so the default eval_fraction
  (0.05) holds none out and split='eval' raises; use eval_fraction=0.25 (rocket.jpg and
  gravel.png go to 'eval') or split='all' for demos.
  """
  import skimage  # noqa: PLC0415  (only this source needs it)

  root = os.path.join(os.path.dirname(skimage.__file__), "data")
  names = PHOTO_FILES_RGB + (PHOTO_FILES_GRAY if include_gray else ())
  entries = [(os.path.join(root, n), "") for n in names if in_split(n, split, eval_fraction)]
  return scan_files(entries, name=f"scikit-image photos in {root} (split={split})", **scan_kw)


@dataclasses.dataclass
class TfdsSource:
  """A `tfds.data_source` mapped to the record format.

  The image feature may come back encoded (bytes: decoded later by the pipeline, robustly)
  or already decoded (uint8 array). The caption comes from `caption_feature` when the
  dataset has it, else ''.
  """

  source: Any  # the tfds ArrayRecordDataSource (random access)
  name: str
  image_feature: str = "image"  # feature holding the image
  caption_feature: str | None = "caption"  # text feature used as caption, if present
  min_size: int = decode_lib.DEFAULT_MIN_SIZE
  max_pixels: int = decode_lib.DEFAULT_MAX_PIXELS

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return tfds_to_record(self.source[index], index, self.image_feature, self.caption_feature)

  @property
  def skip_counts(self) -> dict[str, int]:
    return dict.fromkeys(decode_lib.REASONS, 0)  # TFDS sources are not scanned


def tfds_to_record(
    example: dict[str, Any], index: int, image_feature: str, caption_feature: str | None
) -> dict[str, Any]:
  """Maps one TFDS example (a dict of features) to the record format."""
  image = example[image_feature]
  out: dict[str, Any] = {"id": str(index)}
  if isinstance(image, bytes | bytearray | np.bytes_):
    out["encoded"] = bytes(image)
  else:
    image = np.asarray(image)
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    out["image"] = image[..., :3].astype(np.uint8)  # [H, W, 3]
  caption = example.get(caption_feature, b"") if caption_feature else b""
  if isinstance(caption, bytes | np.bytes_):
    caption = caption.decode("utf-8", errors="replace")
  out["caption"] = str(caption)
  return out


def tfds_source(
    name: str,
    *,
    split: str,
    data_dir: str | None,
    image_feature: str = "image",
    caption_feature: str | None = "caption",
    min_size: int = decode_lib.DEFAULT_MIN_SIZE,
    max_pixels: int = decode_lib.DEFAULT_MAX_PIXELS,
) -> TfdsSource:
  """`tfds.data_source(name, split=split, data_dir=data_dir)` in the record format."""
  if not name:
    raise ValueError("data source 'tfds:' needs a dataset name, e.g. 'tfds:imagenette'")
  import tensorflow_datasets as tfds  # noqa: PLC0415  (heavy; only this source needs it)

  try:
    # download=False: never fetch at run time, the dataset must already be prepared.
    # SkipDecoding: keep the image encoded so our robust decoder (with its size guard and
    # skip accounting) decodes it in the pipeline, not TFDS in the source.
    src = tfds.data_source(
        name,
        split=split,
        data_dir=data_dir,
        download=False,
        decoders={image_feature: tfds.decode.SkipDecoding()},
    )
  except Exception as e:  # tfds raises many types for a missing/unprepared dataset
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(
        f"data source 'tfds:{name}' (split={split}, data_dir={data_dir}): {first}"
    ) from e
  return TfdsSource(src, f"tfds:{name}", image_feature, caption_feature, min_size, max_pixels)


def shapes_source(*, split: str, **kw) -> Any:
  """`infdiff.data.shapes.ShapesSource(split=split, **kw)` (imported lazily)."""
  from infdiff.data import shapes  # noqa: PLC0415  (keeps this module importable alone)

  return shapes.ShapesSource(split=split, **kw)


def make_source(
    source: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    min_size: int = decode_lib.DEFAULT_MIN_SIZE,
    max_pixels: int = decode_lib.DEFAULT_MAX_PIXELS,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    num_threads: int = 8,
    **kw,
) -> Any:
  """Builds the random-access source named by `source` (see the module docstring).

  Args:
    source: 'shapes', 'photos', 'folder:/path', 'captions:/path' or 'tfds:name'.
    split: 'train', 'eval' or 'all' for file sources (hash split); passed through to TFDS
      and ShapesSource.
    data_dir: TFDS data directory (None: TFDS's default).
    min_size: smallest accepted image side (file and TFDS sources).
    max_pixels: largest accepted width * height (file and TFDS sources).
    eval_fraction: fraction of files held out as 'eval' by the hash split.
    num_threads: threads for the header scan of file sources.
    **kw: source-specific options: 'shapes' -> ShapesSource arguments (size, num_scenes,
      seed); 'photos' -> include_gray; 'tfds:' -> image_feature, caption_feature.

  Returns:
    An object with `__len__` and `__getitem__` returning records.

  Raises:
    ValueError: (one line) unknown scheme, bad path, or no valid image.
  """
  scheme, _, arg = source.partition(":")
  scan_kw = dict(min_size=min_size, max_pixels=max_pixels, num_threads=num_threads)
  if scheme == "shapes" and not arg:
    return shapes_source(split=split, **kw)
  if scheme == "photos" and not arg:
    return photos_source(split=split, eval_fraction=eval_fraction, **scan_kw, **kw)
  if scheme == "folder":
    return folder_source(arg, split=split, eval_fraction=eval_fraction, **scan_kw, **kw)
  if scheme == "captions":
    return captions_source(arg, split=split, eval_fraction=eval_fraction, **scan_kw, **kw)
  if scheme == "tfds":
    return tfds_source(
        arg, split=split, data_dir=data_dir, min_size=min_size, max_pixels=max_pixels, **kw
    )
  raise ValueError(
      f"unknown data source {source!r}: use 'shapes', 'photos', 'folder:/path', "
      "'captions:/path' or 'tfds:name'"
  )


def load_record(record: dict[str, Any], *, min_size: int, max_pixels: int) -> dict[str, Any]:
  """Turns a source record into a decoded one ('encoded' -> 'image' uint8 [H, W, 3]).

  Raises:
    DecodeError: when the bytes cannot be decoded (the pipeline counts and skips it).
  """
  if "encoded" not in record:
    return record
  out = {k: v for k, v in record.items() if k != "encoded"}
  out["image"] = decode_lib.decode_image(
      record["encoded"], min_size=min_size, max_pixels=max_pixels
  )
  return out


# --------------------------------------------------------------------------- balancing


def short_sides(source: Any) -> np.ndarray:
  """Short side of every record of `source`: int64 [len(source)].

  From the header scan of file sources (`FileSource.sizes`), from `size` for sources of one
  size (ShapesSource), else by reading every record once (decoded arrays or encoded
  headers: slow for large TFDS datasets, so it is only done when balancing is asked for).
  """
  n = len(source)
  sizes = getattr(source, "sizes", None)
  if sizes is not None and len(sizes) == n:
    return np.array([min(hw) for hw in sizes], np.int64)
  size = getattr(source, "size", None)
  if isinstance(size, int):
    return np.full((n,), size, np.int64)
  logging.info("reading the size of each of the %d records of %r (no size index)", n, source)
  out = np.empty((n,), np.int64)
  for i in range(n):
    rec = source[i]
    if "image" in rec:
      out[i] = min(np.shape(rec["image"])[:2])
    else:
      try:
        header = decode_lib.probe_image(rec["encoded"], min_size=0, max_pixels=2**62)
        out[i] = min(header.width, header.height)
      except decode_lib.DecodeError:
        out[i] = 0  # undecodable: the pipeline skips it anyway; count it as low-resolution
  return out


@dataclasses.dataclass
class BalancedSource:
  """A source in which a fixed fraction of the records come from a high-resolution subset.

  INFD (Sec. 5.3) samples "images from the high-resolution subset with a probability of
  0.5". Here as a virtual dataset of L slots: round(fraction * L) slots hold high-resolution
  images, the others low-resolution ones, each subset repeated cyclically in a seeded
  random order and the slots placed at random. L is the smallest length in which every
  image appears at least once, `max(n_lo / (1 - f), n_hi / f)`. The pipeline shuffles
  and repeats this dataset like any other, so every epoch has exactly the fraction, covers
  every image, and each process's shard (slots i % process_count) gets the fraction in
  expectation. Picklable (plain arrays), so grain workers can read from it.
  """

  source: Any  # the wrapped source
  index_map: np.ndarray  # int64 [L] source index of every slot
  is_hires: np.ndarray  # bool [L] whether the slot holds a high-resolution image

  def __len__(self) -> int:
    return len(self.index_map)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.source[int(self.index_map[index])]

  @property
  def skip_counts(self):
    return getattr(self.source, "skip_counts", None)

  @property
  def hires_fraction(self) -> float:
    return float(np.mean(self.is_hires))


def balance_by_size(source: Any, min_side: int, fraction: float, seed: int = 0) -> Any:
  """`BalancedSource` drawing `fraction` of its records from images with short side >=
  `min_side`, or `source` itself when there is nothing to balance.

  Args:
    source: a random-access source.
    min_side: short side from which an image counts as high-resolution (INFD: r_max).
    fraction: share of high-resolution records in (0, 1]; 0 turns balancing off.
    seed: seed of the slot layout.

  Returns:
    A `BalancedSource`, or `source` unchanged when fraction is 0 or all images fall on one
    side of `min_side` (balancing would change nothing, or could not be met).
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"the high-resolution fraction must be in [0, 1], got {fraction}")
  if fraction == 0.0:
    return source
  sides = short_sides(source)
  hires = np.flatnonzero(sides >= min_side)
  lowres = np.flatnonzero(sides < min_side)
  if len(hires) == 0 or (len(lowres) == 0 and fraction < 1.0):
    return source
  if fraction == 1.0:
    length = len(hires)
  else:
    length = int(max(np.ceil(len(lowres) / (1.0 - fraction)), np.ceil(len(hires) / fraction)))
  n_hi = int(round(fraction * length))
  rng = np.random.default_rng([seed, 0xBA1])
  is_hires = np.zeros((length,), bool)
  is_hires[rng.choice(length, n_hi, replace=False)] = True
  index_map = np.empty((length,), np.int64)
  index_map[is_hires] = np.resize(rng.permutation(hires), n_hi)
  index_map[~is_hires] = np.resize(rng.permutation(lowres), length - n_hi)
  return BalancedSource(source, index_map, is_hires)
