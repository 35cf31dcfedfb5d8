"""grain input pipeline: sharded, shuffled, repeated, decoded robustly, checkpointable.

    loader = make_loader(config.data, transform, global_batch_size=256, seed=0)
    batch = next(loader)            # dict of numpy arrays, each [global_batch // processes, ...]
    state = loader.get_state()      # JSON-serialisable; goes into the Orbax checkpoint
    loader.set_state(state)         # resumes the exact same sequence of batches
    logging.info(loader.skip_summary())   # "skipped 7 files: truncated=1, empty=1, ..."

Per process the pipeline is
    indices of this process's shard (source index i with i % process_count == process_index)
    -> shuffle(seed) -> repeat(num_epochs) -> read + decode + transform -> batch
    -> reader threads (-> optional worker processes) -> skip accounting
The batch is formed on the index-addressed (MapDataset) side, so batch b always holds stream
positions [b * rows, (b + 1) * rows): the iterator state is a batch counter and resuming is
exact, with threads or worker processes alike.

Bad files. Sources reject most bad files from their headers at construction (counted in
`source.skip_counts`). A file that fails only when decoded (truncated data) is skipped: its
slot is filled by the next decodable file of the same shard, and the failure travels with
the batch (as small int arrays) to the main process, which records each failed file once.
Replacing instead of dropping keeps every batch full and the position-to-batch mapping
fixed, which is what makes the state exact; the cost is that a replacement file appears
twice in that epoch, negligible for the few files that get past the header scan.
`loader.skip_counts()` adds both kinds, per reason; the decode-time part is in the state.

Randomness. Record at stream position t on process p gets
`np.random.default_rng([seed, p, t])`; all rows of batch b share
`np.random.default_rng([seed, BATCH_STREAM, b])` (the same on every process, so choices such
as an output shape agree across hosts). Positions keep counting across epochs, so each
epoch sees new crops; the shuffle is reseeded per epoch by grain.

Strings. 'caption' and 'id' are dropped from batches unless data.keep_strings, which keeps
them as numpy object arrays [B] (host-side only: drop them before sending a batch to
devices).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from infdiff.data import decode as decode_lib
from infdiff.data import sources as sources_lib
from infdiff.data import transforms as transforms_lib

BATCH_STREAM = 0x5EED  # tag that keeps the per-batch generator apart from per-record ones
_SKIP_REASON = "_skip_reason"  # int32 [B, K] reason code per failed attempt, -1 = none
INDEX = "index"  # int32 [B] source index of every example
_SKIP_INDEX = "_skip_index"  # int64 [B, K] source index of each failed attempt


def default_data_config() -> ml_collections.ConfigDict:
  """The data fields `make_source`/`make_loader` read, with their defaults."""
  c = ml_collections.ConfigDict()
  c.source = "shapes"  # 'shapes' | 'photos' | 'folder:/path' | 'captions:/path' | 'tfds:name'
  c.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data_dir (None: default)
  c.split = "train"  # 'train'/'eval'/'all' (hash split of files) or a TFDS split string
  c.eval_fraction = sources_lib.DEFAULT_EVAL_FRACTION  # files held out as 'eval' (hash split)
  c.min_size = decode_lib.DEFAULT_MIN_SIZE  # skip images with a smaller side
  # Skip images with more pixels (2**26). PIL's own bomb guard caps this at ~179M pixels.
  c.max_pixels = decode_lib.DEFAULT_MAX_PIXELS
  c.num_threads = 2  # reader threads (on 2 cores threads beat processes)
  c.num_workers = 0  # worker processes (grain mp_prefetch); 0 = threads only
  c.prefetch_buffer_size = 4  # batches buffered by the reader threads
  c.worker_buffer_size = 2  # batches buffered per worker process
  c.max_decode_retries = 16  # consecutive undecodable files tolerated before an error
  c.keep_strings = False  # keep 'caption'/'id' in batches as numpy object arrays
  c.drop_remainder = True  # drop a last partial batch (finite epochs only)
  # Extra source options: 'shapes' size/num_scenes/seed/categories, 'photos' include_gray,
  # 'tfds:' image_feature/caption_feature.
  c.source_kwargs = ml_collections.ConfigDict()
  # Side of the built-in 'shapes' images. They are rendered analytically, so make it at
  # least s_max * enc_size: multi-resolution crops then see real detail, not upsampling.
  c.shapes_size = 64
  # Categories the built-in 'shapes' scenes are drawn from; () = all six (e.g.
  # --config.data.shapes_categories="('single_object',)" trains on one GenEval category).
  c.shapes_categories = ()
  # Number of distinct built-in 'shapes' scenes (items of the source; a scene is a pure
  # function of its index, so more scenes cost no memory and no set-up time).
  c.shapes_num_scenes = 10_000
  return c


def _get(cfg, name: str):
  """A field of the data config, with `default_data_config()`'s value when absent."""
  if name in cfg:
    return cfg[name]
  return default_data_config()[name]


def source_from_config(data_cfg, *, split: str | None = None) -> Any:
  """`sources.make_source` with the fields of a data config."""
  kw = dict(_get(data_cfg, "source_kwargs") or {})
  if _get(data_cfg, "source") == "shapes":
    kw.setdefault("size", _get(data_cfg, "shapes_size"))
    kw.setdefault("num_scenes", _get(data_cfg, "shapes_num_scenes"))
    if _get(data_cfg, "shapes_categories"):
      kw.setdefault("categories", tuple(_get(data_cfg, "shapes_categories")))
  return sources_lib.make_source(
      _get(data_cfg, "source"),
      split=split or _get(data_cfg, "split"),
      data_dir=_get(data_cfg, "data_dir"),
      min_size=_get(data_cfg, "min_size"),
      max_pixels=_get(data_cfg, "max_pixels"),
      eval_fraction=_get(data_cfg, "eval_fraction"),
      **kw,
  )


@dataclasses.dataclass(frozen=True)
class _ReadRecord:
  """Stream position + source index -> transformed record (runs in reader threads/workers).

  Picklable: it holds the source, the transform and plain numbers.
  """

  source: Any
  transform: Callable
  seed: int
  process_index: int
  process_count: int
  rows_per_batch: int
  min_size: int
  max_pixels: int
  max_retries: int

  def __call__(self, position: int, index: int) -> dict[str, Any]:
    reasons = np.full([self.max_retries], -1, np.int32)  # [K]
    failed = np.full([self.max_retries], -1, np.int64)  # [K]
    n = len(self.source)
    for attempt in range(self.max_retries):
      try:
        record = sources_lib.load_record(
            self.source[index], min_size=self.min_size, max_pixels=self.max_pixels
        )
        break
      except decode_lib.DecodeError as e:
        reasons[attempt] = decode_lib.REASONS.index(e.reason)
        failed[attempt] = index
        # The next source index of this process's shard (wrapping), so shards stay disjoint.
        index += self.process_count
        if index >= n:
          index = self.process_index
    else:
      raise RuntimeError(
          f"{self.max_retries} consecutive undecodable files in the data source "
          f"(last index {index}); raise data.max_decode_retries or clean the data"
      )
    rng = np.random.default_rng([self.seed, self.process_index, position])
    batch_rng = np.random.default_rng([self.seed, BATCH_STREAM, position // self.rows_per_batch])
    out = self.transform(record, rng, batch_rng)
    out[INDEX] = np.int32(index)  # the source record read (per-image parameters)
    out[_SKIP_REASON] = reasons
    out[_SKIP_INDEX] = failed
    return out


@dataclasses.dataclass(frozen=True)
class _Stack:
  """Batches records: arrays are stacked; strings are dropped or kept as object arrays."""

  keep_strings: bool

  def __call__(self, rows):
    out = {}
    for key, first in rows[0].items():
      if isinstance(first, str):
        if self.keep_strings:
          out[key] = np.array([r[key] for r in rows], dtype=object)  # [B]
        continue
      out[key] = np.stack([np.asarray(r[key]) for r in rows])  # [B, ...]
    return out


class Loader:
  """Iterator over numpy batches with exact, serialisable state and skip accounting."""

  def __init__(self, dataset: grain.IterDataset, source: Any):
    self._dataset = dataset
    self._it = iter(dataset)
    self.source = source
    self._decode_skips: dict[int, str] = {}  # source index -> reason (each file once)

  def __iter__(self) -> Loader:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    reasons = batch.pop(_SKIP_REASON)
    indices = batch.pop(_SKIP_INDEX)
    for code, index in zip(reasons[reasons >= 0], indices[reasons >= 0]):
      self._decode_skips[int(index)] = decode_lib.REASONS[int(code)]
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable state: grain's iterator state plus the decode-time skips."""
    return {
        "grain": self._it.get_state(),
        "decode_skips": sorted([i, r] for i, r in self._decode_skips.items()),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes from `get_state()`'s value (also after a JSON round trip)."""
    self._it.set_state(state["grain"])
    self._decode_skips = {int(i): str(r) for i, r in state.get("decode_skips", [])}

  def skip_counts(self) -> dict[str, int]:
    """Files skipped so far, per reason: header-scan rejections + decode failures seen."""
    counts = dict(getattr(self.source, "skip_counts", None) or {})
    for reason in decode_lib.REASONS:
      counts.setdefault(reason, 0)
    for reason in self._decode_skips.values():
      counts[reason] += 1
    return counts

  def skip_summary(self) -> str:
    """One log line, e.g. 'skipped 7 files: truncated=1, empty=1, not_image=5'."""
    counts = self.skip_counts()
    detail = ", ".join(f"{k}={v}" for k, v in counts.items() if v)
    return f"skipped {sum(counts.values())} files" + (f": {detail}" if detail else "")

  def close(self) -> None:
    """Stops reader threads and worker processes."""
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def make_loader(
    data_cfg,
    transform: Callable | str,
    *,
    global_batch_size: int,
    seed: int,
    split: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    source: Any = None,
) -> Loader:
  """Builds this process's iterator over batches.

  Args:
    data_cfg: a data ConfigDict or dict (see `default_data_config`; missing fields take
      the defaults).
    transform: a callable `(record, rng, batch_rng) -> record` (a method's
      `data_transform(split)`), or a registered transform name, built with its defaults.
    global_batch_size: rows per step over all processes; must divide by process_count.
    seed: shuffle and augmentation seed.
    split: overrides `data_cfg.split` (e.g. 'eval').
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    num_epochs: None repeats forever (training); an int stops after that many passes.
    source: an already built source (default: built from `data_cfg`).

  Returns:
    A `Loader`: iterator of dicts of numpy arrays with leading dim
    global_batch_size // process_count, plus get_state/set_state/skip_counts.

  Raises:
    ValueError: bad source, no valid image, or a batch size that does not split.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} does not divide over {process_count} processes"
    )
  rows = global_batch_size // process_count
  if source is None:
    source = source_from_config(data_cfg, split=split)
  if len(source) <= process_index:
    raise ValueError(
        f"data source of {len(source)} records has no shard for process {process_index}"
    )
  if isinstance(transform, str):
    transform = transforms_lib.make_transform(transform)

  read = _ReadRecord(
      source=source,
      transform=transform,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
      rows_per_batch=rows,
      min_size=_get(data_cfg, "min_size"),
      max_pixels=_get(data_cfg, "max_pixels"),
      max_retries=_get(data_cfg, "max_decode_retries"),
  )
  ds = grain.MapDataset.range(process_index, len(source), process_count)  # this shard
  ds = ds.shuffle(seed=seed).repeat(num_epochs)
  ds = ds.map_with_index(read)
  ds = ds.batch(
      rows,
      drop_remainder=_get(data_cfg, "drop_remainder"),
      batch_fn=_Stack(_get(data_cfg, "keep_strings")),
  )
  it_ds = ds.to_iter_dataset(
      grain.ReadOptions(
          num_threads=_get(data_cfg, "num_threads"),
          prefetch_buffer_size=_get(data_cfg, "prefetch_buffer_size"),
      )
  )
  num_workers = _get(data_cfg, "num_workers")
  if num_workers > 0:
    from absl import flags  # noqa: PLC0415

    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # spawned workers read absl flags
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=_get(data_cfg, "worker_buffer_size")
        )
    )
  return Loader(it_ds, source)
