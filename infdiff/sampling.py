"""Writing generated images: PNG files and grids (uint8, clipped to [0, 1]).

Sampling itself goes through the `Generator` contract (`infdiff.methods.base`), loaded
from a run directory with `infdiff.runs.load_generator`.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def to_uint8(img: np.ndarray) -> np.ndarray:
  return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: str, img: np.ndarray) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(to_uint8(img)).save(path)


def save_grid(path: str, images: np.ndarray) -> None:
  from infdiff.utils import image_grid

  save_png(path, image_grid(np.asarray(images)))
