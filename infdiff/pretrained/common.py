"""Shared pieces of the pretrained ports: checkpoint reading, layers, torch-exact resizing.

Everything here is torch-free: safetensors are read with `safetensors.numpy`, and the
resampling matrices reproduce `torch.nn.functional.interpolate` (align_corners=False) so
that a port fed the same pixels as its PyTorch reference sees the same resized input.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

# --------------------------------------------------------------------------- errors


class CheckpointNotFoundError(FileNotFoundError):
  """A checkpoint directory is missing or lacks files; the message is one line."""


class CheckpointFormatError(ValueError):
  """A checkpoint's files exist but do not hold what the port expects."""


def require_files(kind: str, path: str | os.PathLike, files: Sequence[str]) -> str:
  """Checks that `path` is a directory holding every name in `files`.

  Args:
    kind: model kind for the message, e.g. 'dinov2'.
    path: checkpoint directory.
    files: file names expected inside it.

  Returns:
    The path as a string.

  Raises:
    CheckpointNotFoundError: one line naming the path and the missing files.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointNotFoundError(
        f"{kind} checkpoint directory {path} is not a directory (expected {', '.join(files)})"
    )
  missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
  if missing:
    raise CheckpointNotFoundError(f"{kind} checkpoint at {path} missing {', '.join(missing)}")
  return path


def read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


# safetensors dtype codes -> numpy. bfloat16 comes from ml_dtypes (a jax dependency):
# `safetensors.numpy` cannot read BF16, the storage type of most LLM checkpoints.
_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_CODES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a .safetensors file into numpy arrays (memory-mapped, BF16 included).

  The format is an 8-byte little-endian header length, a JSON header of
  {name: {dtype, shape, data_offsets}}, then the raw little-endian tensor bytes.
  """
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  data = (
      np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
      if os.path.getsize(path) > 8 + n
      else b""
  )
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    start, end = info["data_offsets"]
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    out[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
  return out


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str) -> None:
  """Writes numpy arrays (BF16 included) as a .safetensors file."""
  header, offset, blobs = {}, 0, []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    blob = a.tobytes()
    header[name] = {
        "dtype": _ST_CODES[a.dtype],
        "shape": list(a.shape),
        "data_offsets": [offset, offset + len(blob)],
    }
    offset += len(blob)
    blobs.append(blob)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the spec pads the header to 8-byte alignment with spaces
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for blob in blobs:
      f.write(blob)


def read_safetensors(kind: str, path: str, files: Iterable[str]) -> dict[str, np.ndarray]:
  """Reads and merges safetensors files into one {name: array} dict (any stored dtype)."""
  out: dict[str, np.ndarray] = {}
  for name in files:
    full = os.path.join(path, name)
    try:
      tensors = load_safetensors(full)
    except (OSError, ValueError, KeyError, struct.error) as e:
      raise CheckpointFormatError(
          f"{kind} checkpoint file {full} is not readable safetensors: {e}"
      ) from e
    out.update(tensors)
  return out


def read_sharded_safetensors(kind: str, path: str) -> dict[str, np.ndarray]:
  """Reads an HF checkpoint: model.safetensors or model.safetensors.index.json + shards."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    shards = sorted(set(read_json(index)["weight_map"].values()))
    require_files(kind, path, shards)
    return read_safetensors(kind, path, shards)
  require_files(kind, path, ["model.safetensors"])
  return read_safetensors(kind, path, ["model.safetensors"])


def take(state: Mapping[str, np.ndarray], key: str, kind: str) -> np.ndarray:
  """state[key] as float32, with a one-line error naming the missing tensor."""
  if key not in state:
    raise CheckpointFormatError(f"{kind} checkpoint lacks tensor {key!r}")
  return np.asarray(state[key], np.float32)


def linear(state, prefix: str, kind: str, bias: bool = True) -> dict[str, np.ndarray]:
  """torch Linear ([out, in] weight) -> flax Dense params ([in, out] kernel)."""
  p = {"kernel": take(state, prefix + ".weight", kind).T}
  if bias:
    p["bias"] = take(state, prefix + ".bias", kind)
  return p


def conv(state, prefix: str, kind: str, bias: bool = True) -> dict[str, np.ndarray]:
  """torch Conv2d ([O, I, kh, kw]) -> flax Conv params ([kh, kw, I, O])."""
  p = {"kernel": take(state, prefix + ".weight", kind).transpose(2, 3, 1, 0)}
  if bias:
    p["bias"] = take(state, prefix + ".bias", kind)
  return p


def norm(state, prefix: str, kind: str, bias: bool = True) -> dict[str, np.ndarray]:
  """torch LayerNorm/RMSNorm weight (and bias) -> flax scale (and bias)."""
  p = {"scale": take(state, prefix + ".weight", kind)}
  if bias:
    p["bias"] = take(state, prefix + ".bias", kind)
  return p


def init_shapes(model: nn.Module, *example_args, **example_kw) -> Any:
  """The unboxed variables `model.init` creates, as jax.ShapeDtypeStruct (nothing allocated).

  The tree a port's `load` returns has exactly this structure, shapes and dtypes.
  """
  return jax.eval_shape(
      lambda: nn.unbox(model.init(jax.random.key(0), *example_args, **example_kw))
  )


def check_params(kind: str, model: nn.Module, params: Any, *example_args, **example_kw) -> Any:
  """Checks converted params against the module's own init shapes; returns jnp params.

  Catches a config/checkpoint mismatch at load time with a one-line message instead of
  an obscure error inside `apply`.
  """
  expected = init_shapes(model, *example_args, **example_kw)
  exp_flat = {
      jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)
  }
  got_flat = {
      jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)
  }
  missing = sorted(set(exp_flat) - set(got_flat))
  extra = sorted(set(got_flat) - set(exp_flat))
  bad = sorted(k for k in set(exp_flat) & set(got_flat) if exp_flat[k] != got_flat[k])
  if missing or extra or bad:
    detail = [
        f"missing {missing[:3]}" if missing else "",
        f"unexpected {extra[:3]}" if extra else "",
    ]
    detail += [f"shape {k}: {got_flat[k]} vs {exp_flat[k]}" for k in bad[:3]]
    raise CheckpointFormatError(
        f"{kind} checkpoint does not match its config: " + "; ".join(d for d in detail if d)
    )
  return jax.tree.map(jnp.asarray, params)


# --------------------------------------------------------------------------- layers


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    use_bias: bool = True,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    name: str | None = None,
) -> nn.Dense:
  """nn.Dense whose kernel (and bias) carry logical axis names."""
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
      name=name,
  )


def conv2d(
    features: int,
    kernel: int | tuple[int, int],
    *,
    strides: int | tuple[int, int] = 1,
    padding: Any = "VALID",
    use_bias: bool = True,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
  """NHWC nn.Conv with logical names (None, None, 'conv_in', 'conv_out')."""
  kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
  strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(
      features,
      kernel,
      strides=strides,
      padding=padding,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")
      ),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
      name=name,
  )


def layer_norm(eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32, name=None):
  """nn.LayerNorm with 'norm' logical names (`models.layers.layer_norm`, eps first)."""
  from infdiff.models import layers

  return layers.layer_norm(dtype, param_dtype, epsilon=eps, name=name)


_NORMAL = nn.initializers.normal(0.02)


def param(module: nn.Module, name: str, shape, axes, init=_NORMAL):
  """A free parameter (embedding table, class token) with logical names."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, module.param_dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU default (erf)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise CheckpointFormatError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def dot_attention(q, k, v, bias=None):
  """Softmax attention in float32. q [B, L, H, Dh], k/v [B, S, H, Dh]; bias [B|1, H|1, L, S]."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("blhd,bshd->bhls", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhls,bshd->blhd", probs, v)


# --------------------------------------------------------------------------- resizing


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a (torch: -0.75, PIL/antialias: -0.5)."""
  x = np.abs(x)
  out = np.where(x <= 1.0, ((a + 2) * x - (a + 3)) * x * x + 1, 0.0)
  return np.where((x > 1.0) & (x < 2.0), (((x - 5) * x + 8) * x - 4) * a, out)


def resize_matrix(
    n_in: int, n_out: int, method: str, antialias: bool, scale_factor: float | None = None
) -> np.ndarray:
  """[n_out, n_in] matrix equal to torch `interpolate(size=n_out, align_corners=False)`.

  Args:
    n_in: input length.
    n_out: output length.
    method: 'bilinear' or 'bicubic'.
    antialias: follow torch's `antialias=True` path (PIL-style support scaled with the
      downsampling factor, cubic a = -0.5); otherwise the classic path (cubic a = -0.75,
      taps clamped at the border).
    scale_factor: as torch `interpolate(scale_factor=...)`: sample positions use
      1 / scale_factor instead of n_in / n_out (n_out must be floor(n_in * scale_factor)).

  Returns:
    float64 weights; rows sum to 1.
  """
  if method not in ("bilinear", "bicubic"):
    raise ValueError(f"unknown resize method {method!r}")
  scale = n_in / n_out if scale_factor is None else 1.0 / scale_factor
  m = np.zeros((n_out, n_in), np.float64)
  dst = np.arange(n_out)
  if antialias:
    # torch/aten upsample *_aa: support grows with the downsampling factor; taps
    # outside the image are dropped and the rest renormalised.
    interp = 1.0 if method == "bilinear" else 2.0
    support = interp * scale if scale >= 1.0 else interp
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    for i in dst:
      center = scale * (i + 0.5)
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), n_in)
      x = (np.arange(lo, hi) - center + 0.5) * inv
      w = np.maximum(0.0, 1.0 - np.abs(x)) if method == "bilinear" else _cubic(x, -0.5)
      total = w.sum()
      m[i, lo:hi] = w / total if total != 0 else w
    return m
  src = (dst + 0.5) * scale - 0.5
  if method == "bilinear":
    src = np.maximum(src, 0.0)  # torch clamps negative sources for linear modes only
    i0 = np.floor(src).astype(np.int64)
    lam = src - i0
    i1 = np.minimum(i0 + 1, n_in - 1)
    i0 = np.minimum(i0, n_in - 1)
    np.add.at(m, (dst, i0), 1.0 - lam)
    np.add.at(m, (dst, i1), lam)
    return m
  i0 = np.floor(src).astype(np.int64)
  t = src - i0
  for k in range(-1, 3):
    idx = np.clip(i0 + k, 0, n_in - 1)
    np.add.at(m, (dst, idx), _cubic(t - k, -0.75))
  return m


def resize(
    images: jax.Array,
    size: tuple[int, int],
    method: str,
    antialias: bool,
    scale_factor: tuple[float, float] | None = None,
) -> jax.Array:
  """Resizes [B, H, W, C] to [B, h, w, C] exactly as torch `F.interpolate` would.

  Separable matmuls with fixed weights (static shapes), so it jits and differentiates.
  The identity size is returned untouched.
  """
  h_in, w_in = images.shape[1:3]
  h, w = size
  if (h_in, w_in) == (h, w) and scale_factor is None:
    return images
  sy, sx = scale_factor if scale_factor is not None else (None, None)
  my = jnp.asarray(resize_matrix(h_in, h, method, antialias, sy), jnp.float32)
  mx = jnp.asarray(resize_matrix(w_in, w, method, antialias, sx), jnp.float32)
  x = images.astype(jnp.float32)
  x = jnp.einsum("oh,bhwc->bowc", my, x, precision="highest")
  x = jnp.einsum("pw,bowc->bopc", mx, x, precision="highest")
  return x.astype(images.dtype)


def center_crop_square(images: jax.Array) -> jax.Array:
  """Largest centred square crop of [B, H, W, C] (offsets rounded like torchvision)."""
  h, w = images.shape[1:3]
  s = min(h, w)
  top = int(round((h - s) / 2.0))
  left = int(round((w - s) / 2.0))
  return images[:, top : top + s, left : left + s]
