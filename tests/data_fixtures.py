"""On-disk image fixtures for the data tests: the bad and awkward files found in the wild."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image

# Limits the tests run the pipeline with: the 200 x 200 'huge' image is over MAX_PIXELS.
MAX_PIXELS = 30_000
MIN_SIZE = 16


def png16_rgb(arr: np.ndarray) -> bytes:
  """A 48-bit (16 bits per channel) RGB PNG of uint16 [H, W, 3], written by hand (PIL
  cannot write this mode)."""
  h, w, _ = arr.shape
  raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

  ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
  return (
      b"\x89PNG\r\n\x1a\n"
      + chunk(b"IHDR", ihdr)
      + chunk(b"IDAT", zlib.compress(raw))
      + chunk(b"IEND", b"")
  )


def rgb_image(h: int, w: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: str, im: Image.Image, fmt: str, **kw) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im.save(path, fmt, **kw)


def write_messy_folder(root: str) -> dict[str, object]:
  """Writes the messy folder; returns the expected valid relative paths and skip counts."""
  os.makedirs(root, exist_ok=True)
  # Valid RGB images, one in a subfolder.
  _save(f"{root}/rgb_a.png", Image.fromarray(rgb_image(24, 32, 0)), "PNG")
  _save(f"{root}/rgb_b.jpg", Image.fromarray(rgb_image(40, 20, 1)), "JPEG", quality=95)
  _save(f"{root}/sub/dir/rgb_c.bmp", Image.fromarray(rgb_image(30, 30, 2)), "BMP")
  _save(f"{root}/UPPER.JPG", Image.fromarray(rgb_image(20, 28, 3)), "JPEG")
  # Greyscale ramp.
  gray = np.tile(np.arange(0, 240, 10, dtype=np.uint8), (20, 1))  # [20, 24]
  _save(f"{root}/gray.png", Image.fromarray(gray, "L"), "PNG")
  # RGBA: left half transparent (any colour underneath), right half opaque red.
  rgba = np.zeros((20, 20, 4), np.uint8)
  rgba[:, :10] = (0, 0, 0, 0)
  rgba[:, 10:] = (255, 0, 0, 255)
  _save(f"{root}/rgba.png", Image.fromarray(rgba, "RGBA"), "PNG")
  # 16-bit greyscale and 48-bit RGB PNGs.
  g16 = np.full((20, 20), 65535, np.uint16)
  g16[:, :10] = 0
  g16[0, 0] = 32896  # 32896 / 257 = 128 exactly
  _save(f"{root}/gray16.png", Image.fromarray(g16), "PNG")
  c16 = np.zeros((18, 18, 3), np.uint16)
  c16[..., 0] = 65535
  c16[..., 1] = 32896
  with open(f"{root}/rgb16.png", "wb") as f:
    f.write(png16_rgb(c16))
  # CMYK JPEG of pure red (C=0, M=Y=100%, K=0).
  _save(f"{root}/cmyk.jpg", Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG", quality=95)
  # EXIF orientation 6 (stored sideways; displayed after a 90 degree clockwise turn).
  stored = np.zeros((20, 40, 3), np.uint8)  # [H=20, W=40]
  stored[:, :20] = (255, 0, 0)
  stored[:, 20:] = (0, 0, 255)
  exif = Image.Exif()
  exif[0x0112] = 6
  _save(f"{root}/exif6.jpg", Image.fromarray(stored), "JPEG", quality=95, exif=exif)
  # --- Bad files ---
  open(f"{root}/empty.jpg", "wb").close()  # zero bytes
  with open(f"{root}/text.png", "w") as f:
    f.write("this is not an image\n" * 10)
  _save(f"{root}/one.png", Image.new("RGB", (1, 1), (1, 2, 3)), "PNG")  # too small
  _save(f"{root}/huge.png", Image.new("RGB", (200, 200), (9, 9, 9)), "PNG")  # > MAX_PIXELS
  buf = io.BytesIO()
  Image.fromarray(rgb_image(64, 64, 4)).save(buf, "JPEG", quality=95)
  with open(f"{root}/truncated.jpg", "wb") as f:
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # header intact, data cut
  with open(f"{root}/notes.txt", "w") as f:
    f.write("not an image extension: never scanned")
  valid = [
      "rgb_a.png",
      "rgb_b.jpg",
      "sub/dir/rgb_c.bmp",
      "UPPER.JPG",
      "gray.png",
      "rgba.png",
      "gray16.png",
      "rgb16.png",
      "cmyk.jpg",
      "exif6.jpg",
  ]
  scan_skips = {"empty": 1, "not_image": 1, "too_small": 1, "too_large": 1}
  decode_skips = {"truncated": 1}
  return {"valid": valid, "scan_skips": scan_skips, "decode_skips": decode_skips}


def write_plain_folder(root: str, n: int, size: tuple[int, int] = (24, 32)) -> list[str]:
  """n small valid PNGs named img_000.png ...; returns their relative paths."""
  os.makedirs(root, exist_ok=True)
  names = []
  for i in range(n):
    name = f"img_{i:03d}.png"
    Image.fromarray(rgb_image(*size, seed=100 + i)).save(f"{root}/{name}")
    names.append(name)
  return names


def write_tfds_dataset(data_dir: str) -> str:
  """Prepares a 4-example array_record TFDS dataset (PNG-encoded images + captions) without
  TensorFlow; example 3's image bytes are truncated. Returns the dataset name."""
  import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy, only this fixture needs it)

  class InfdiffTinyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text()}
      )
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(4):
        buf = io.BytesIO()
        Image.fromarray(np.full((20 + i, 24, 3), 10 * i, np.uint8)).save(buf, "PNG")
        data = buf.getvalue() if i != 3 else buf.getvalue()[:60]
        # Bytes, not arrays: TFDS would need TensorFlow to encode an array.
        yield i, {"image": data, "caption": f"caption {i}"}

  builder = InfdiffTinyCaptions(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder.name
