"""Robust image decoding: any common file becomes uint8 RGB, or a `DecodeError` with a reason.

Every image that enters training goes through `decode_image`. It converts the modes found in
the wild to one representation (uint8 [H, W, 3] RGB) and turns every failure into a
`DecodeError` whose `reason` is one of `REASONS`, so the pipeline can skip the file and count
it by reason instead of crashing or silently dropping it.

`probe_image` is the cheap half: it reads only the header (size, format) and is what a folder
scan runs on every file, so that zero-byte files, non-images, decompression bombs and tiny
images are rejected before training starts.
"""

from __future__ import annotations

import io
import os
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

# Reason codes, in a fixed order (the pipeline counts skips in a vector indexed by this).
REASONS = ("empty", "not_image", "truncated", "too_large", "too_small", "unreadable")

# Default pixel limit: 2**26 = 67,108,864 pixels (an 8192 x 8192 image, ~200 MB as uint8
# RGB). It admits 8K photographs, bounds the memory one decode can take, and stays below
# PIL's own DecompressionBombWarning threshold (~89.5M pixels) so PIL stays quiet for every
# image we accept.
DEFAULT_MAX_PIXELS = 2**26

# Default minimum side: images smaller than this carry too little content to crop from.
DEFAULT_MIN_SIZE = 16


class DecodeError(Exception):
  """An image that cannot be used; `reason` is one of `REASONS`."""

  def __init__(self, reason: str, detail: str = ""):
    if reason not in REASONS:
      raise ValueError(f"unknown decode failure reason {reason!r}")
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


class ImageHeader(NamedTuple):
  """What the header says, before any pixel is decoded."""

  width: int
  height: int
  format: str
  mode: str


def _open(data: bytes) -> Image.Image:
  """Opens the header of encoded bytes, mapping PIL's failures to reason codes."""
  if not data:
    raise DecodeError("empty", "zero bytes")
  try:
    return Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    # PIL refuses > 2x its own limit before we see the size; that is too large for us too.
    raise DecodeError("too_large", str(e)) from e
  except Image.UnidentifiedImageError as e:
    raise DecodeError("not_image", "unrecognised header") from e
  except (OSError, SyntaxError, ValueError) as e:
    # A recognised header whose first bytes are already cut or corrupt.
    raise DecodeError("truncated", str(e)) from e


def _check_size(w: int, h: int, *, min_size: int, max_pixels: int) -> None:
  if w * h > max_pixels:
    raise DecodeError("too_large", f"{w}x{h} = {w * h} pixels > max_pixels={max_pixels}")
  if min(w, h) < min_size:
    raise DecodeError("too_small", f"{w}x{h} has a side < min_size={min_size}")


def probe_image(
    data: bytes, *, min_size: int = DEFAULT_MIN_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImageHeader:
  """Checks an encoded image from its header only (no pixel decoding).

  Args:
    data: the encoded file. Only the first few KB are parsed.
    min_size: smallest accepted side in pixels.
    max_pixels: largest accepted width * height.

  Returns:
    The header's size, format and mode.

  Raises:
    DecodeError: with reason 'empty', 'not_image', 'truncated', 'too_large' or 'too_small'.
  """
  with _open(data) as im:
    w, h = im.size
    _check_size(w, h, min_size=min_size, max_pixels=max_pixels)
    return ImageHeader(w, h, im.format or "", im.mode)


def probe_file(
    path: str, *, min_size: int = DEFAULT_MIN_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImageHeader:
  """`probe_image` on a file, reading only its first 64 KB (enough for any header)."""
  if os.path.getsize(path) == 0:
    raise DecodeError("empty", "zero bytes")
  with open(path, "rb") as f:
    head = f.read(1 << 16)
  try:
    return probe_image(head, min_size=min_size, max_pixels=max_pixels)
  except DecodeError as e:
    if e.reason != "truncated":
      raise
  # Headers larger than 64 KB (big EXIF/ICC blocks before the frame header): read it all.
  with open(path, "rb") as f:
    return probe_image(f.read(), min_size=min_size, max_pixels=max_pixels)


def _to_uint8_rgb(im: Image.Image) -> np.ndarray:
  """Converts a loaded PIL image of any mode to uint8 [H, W, 3] RGB."""
  mode = im.mode
  if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
    # 16-bit greyscale (PNG/TIFF). 'I' is PIL's 32-bit container for the same data; we read
    # it as 16-bit too (clipped), which is what 16-bit files decode to. 65535 -> 255 exactly.
    a = np.asarray(im).astype(np.float64)
    a = np.clip(np.round(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    return np.repeat(a[..., None], 3, axis=-1)
  if mode == "F":
    # Float images (TIFF) are taken to be in [0, 1].
    a = np.clip(np.round(np.asarray(im, np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(a[..., None], 3, axis=-1)
  if mode == "P" or mode == "PA":
    # Palettes may carry transparency (tRNS); expand through RGBA so it is composited.
    im = im.convert("RGBA")
    mode = "RGBA"
  if mode in ("RGBA", "LA", "RGBa", "La"):
    # Composite on white: transparent pixels become white, not the undefined colour under
    # them (which is often black and would teach the model black backgrounds).
    rgba = np.asarray(im.convert("RGBA"), np.float32)  # [H, W, 4]
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
  # L, 1, CMYK, YCbCr, LAB, HSV, RGB (PIL maps 48-bit PNG to the high byte of each channel,
  # i.e. floor(v / 256), within 1 of v / 257).
  return np.asarray(im.convert("RGB"), np.uint8)


def decode_image(
    data: bytes, *, min_size: int = DEFAULT_MIN_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
  """Decodes encoded image bytes to uint8 RGB, applying the EXIF orientation.

  The header is checked against `max_pixels` before any pixel is decoded, so a
  decompression bomb costs only a header parse. Multi-frame files (GIF, TIFF) give their
  first frame.

  Args:
    data: encoded bytes (JPEG, PNG, BMP, GIF, WebP, TIFF, ...).
    min_size: smallest accepted side in pixels.
    max_pixels: largest accepted width * height.

  Returns:
    uint8 [H, W, 3] RGB, H x W after the EXIF rotation.

  Raises:
    DecodeError: reason 'empty', 'not_image', 'truncated', 'too_large', 'too_small' or
      'unreadable'.
  """
  im = _open(data)
  with im:
    w, h = im.size
    _check_size(w, h, min_size=min_size, max_pixels=max_pixels)
    try:
      im.load()
    except (OSError, SyntaxError, EOFError) as e:
      msg = str(e).lower()
      if any(k in msg for k in ("truncat", "broken", "end of", "premature", "incomplete")):
        raise DecodeError("truncated", str(e)) from e
      raise DecodeError("unreadable", str(e)) from e
    except Exception as e:  # PIL plugins raise assorted types on corrupt data.
      raise DecodeError("unreadable", f"{type(e).__name__}: {e}") from e
    try:
      im = ImageOps.exif_transpose(im)
      out = _to_uint8_rgb(im)  # [H, W, 3]
    except DecodeError:
      raise
    except Exception as e:
      raise DecodeError("unreadable", f"{type(e).__name__}: {e}") from e
  return out


def decode_file(
    path: str, *, min_size: int = DEFAULT_MIN_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
  """`decode_image` on the bytes of a file."""
  with open(path, "rb") as f:
    data = f.read()
  return decode_image(data, min_size=min_size, max_pixels=max_pixels)
