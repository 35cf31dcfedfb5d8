"""Data: random-access sources, robust decoding, host-side transforms, grain pipelines.

`make_source` picks the data by one string; `make_loader` turns a data config into a
sharded, checkpointable iterator of numpy batches; `default_data_config` lists the fields.
"""

from infdiff.data.decode import REASONS, DecodeError, decode_image, probe_image
from infdiff.data.pipeline import Loader, default_data_config, make_loader
from infdiff.data.sources import make_source
from infdiff.data.transforms import (
    TRANSFORMS,
    MultiResCrop,
    RandomResizedSquare,
    Tokenize,
    make_transform,
)

__all__ = [
    "REASONS",
    "TRANSFORMS",
    "DecodeError",
    "Loader",
    "MultiResCrop",
    "RandomResizedSquare",
    "Tokenize",
    "decode_image",
    "default_data_config",
    "make_loader",
    "make_source",
    "make_transform",
    "probe_image",
]
