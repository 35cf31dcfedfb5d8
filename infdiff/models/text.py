"""Text conditioning for the stage-2 denoiser behind one interface.

A text path is two pieces:
  * a `Tokenizer`: `encode(texts, max_length) -> (ids [B, L] int32, mask [B, L] int32)`
    (numpy, host side, runs in the data pipeline);
  * a `TextEncoder`: `init(rng, ids, mask) -> params` and
    `encode(params, ids, mask) -> TextFeatures(hidden [B, L, D], mask [B, L])`
    (jax, runs inside the jitted step), plus `width` (= D, the DiT's `text_dim`) and
    `trainable` (whether its params are optimised with the denoiser).

Two encoders are provided, chosen by name through `build_text_encoder`:
  * "small": `SmallTextEncoder`, a few transformer layers over `WordVocab` word ids,
    trained from scratch jointly with the DiT. It is a demo substitute for Qwen3 that
    needs no pretrained weights; its quality is far below a language model's.
  * "qwen3": the frozen Qwen3-1.7B of the paper (128 tokens, width 2048). The port lives
    in `infdiff.pretrained` and is imported only when this path is chosen:
    `infdiff.pretrained.load("qwen3", path)` returns `(model, params)` with
    `model.apply(params, input_ids, attention_mask)["hidden_states"]`; `Qwen3Adapter`
    wraps that apply function. Its tokenizer comes with the port and follows the same
    `Tokenizer` protocol.

The unconditional (CFG / caption-dropout) input is the empty text: every token is
padding (mask all zeros). The DiT's cross-attention then adds nothing, whatever the
hidden values are, so training and sampling agree for both encoders.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infdiff.models import layers
from infdiff.models.layers import Attention, SwiGLU

Dtype = Any

PAD_ID = 0  # id of padding tokens (mask 0)
UNK_ID = 1  # id of out-of-vocabulary words
_SPECIALS = ("<pad>", "<unk>")
_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


class TextFeatures(NamedTuple):
  """Encoded text as the denoiser consumes it."""

  hidden: jax.Array  # [B, L, D] token features
  mask: jax.Array  # [B, L] nonzero for real tokens


class Tokenizer(Protocol):
  """Host-side tokenizer: captions -> fixed-length ids and padding mask."""

  def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns ids [B, max_length] int32 and mask [B, max_length] int32."""
    ...


class TextEncoder(Protocol):
  """Device-side text encoder used by the stage-2 method."""

  width: int  # D of the hidden states (the DiT's text_dim)
  trainable: bool  # True if the params are optimised together with the denoiser

  def init(self, rng: jax.Array, ids: jax.Array, mask: jax.Array) -> Any:
    """Returns the encoder's variables (for a frozen encoder: the loaded weights)."""
    ...

  def encode(self, params: Any, ids: jax.Array, mask: jax.Array) -> TextFeatures:
    """ids [B, L], mask [B, L] -> TextFeatures."""
    ...


# ---------------------------------------------------------------------------------------
# Demo vocabulary.


def split_words(text: str) -> list[str]:
  """Lower-case word-level split; punctuation marks are tokens of their own."""
  return _WORD_RE.findall(text.lower())


@dataclasses.dataclass(frozen=True)
class WordVocab:
  """Word-level vocabulary for the demo text encoder.

  Ids: 0 is padding, 1 is unknown, then words by decreasing training frequency (ties
  alphabetical, so a build is deterministic).
  """

  words: tuple[str, ...]  # id -> token, including the two specials first

  def __post_init__(self):
    if tuple(self.words[:2]) != _SPECIALS:
      raise ValueError(f"vocabulary must start with {_SPECIALS}")
    object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.words)})

  @classmethod
  def build(cls, captions: Iterable[str], max_size: int) -> WordVocab:
    """Keeps the `max_size - 2` most frequent words of `captions`.

    Args:
      captions: training captions.
      max_size: vocabulary size including the pad and unk ids.

    Returns:
      The vocabulary.
    """
    if max_size < len(_SPECIALS):
      raise ValueError(f"max_size must be at least {len(_SPECIALS)}")
    counts = collections.Counter(w for c in captions for w in split_words(c))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return cls(_SPECIALS + tuple(w for w, _ in ranked[: max_size - len(_SPECIALS)]))

  def __len__(self) -> int:
    return len(self.words)

  def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> ids and mask, truncated or padded to `max_length`.

    Args:
      texts: B captions. An empty caption encodes to all padding (the unconditional
        input).
      max_length: L, tokens kept per caption.

    Returns:
      ids [B, L] int32 (0 pad, 1 unknown word) and mask [B, L] int32 (1 = real token).
    """
    ids = np.full((len(texts), max_length), PAD_ID, np.int32)
    for row, text in enumerate(texts):
      toks = [self._index.get(w, UNK_ID) for w in split_words(text)][:max_length]
      ids[row, : len(toks)] = toks
    return ids, (ids != PAD_ID).astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    """ids -> space-joined words, padding dropped."""
    return " ".join(self.words[int(i)] for i in ids if int(i) != PAD_ID)

  def save(self, path: str) -> None:
    """Writes the vocabulary as JSON (e.g. into a checkpoint directory)."""
    with open(path, "w") as f:
      json.dump({"format": "infdiff.WordVocab", "words": list(self.words)}, f)

  @classmethod
  def load(cls, path: str) -> WordVocab:
    """Reads a vocabulary written by `save`."""
    with open(path) as f:
      return cls(tuple(json.load(f)["words"]))


# ---------------------------------------------------------------------------------------
# Demo encoder.


class SmallTextEncoder(nn.Module):
  """Demo substitute for Qwen3: word embeddings + a few pre-LN transformer layers.

  Trained from scratch together with the denoiser on the demo captions. Padding
  positions are masked out of attention and their outputs set to zero.
  """

  vocab_size: int = 4096  # WordVocab size (ids 0 pad, 1 unk)
  width: int = 256  # hidden width D (the DiT's text_dim)
  depth: int = 2  # transformer layers
  heads: int = 4  # attention heads
  max_length: int = 32  # longest token sequence (learned position table size)
  mlp_ratio: float = 4.0  # SwiGLU hidden = mlp_ratio * width
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, ids, mask):
    """ids [B, L] int, mask [B, L] -> hidden [B, L, width] float32 (zero on padding)."""
    length = ids.shape[1]
    if length > self.max_length:
      raise ValueError(f"{length} tokens exceed max_length {self.max_length}")
    mask = mask.astype(bool)
    embed = nn.Embed(
        self.vocab_size,
        self.width,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")
        ),
        name="embed",
    )
    pos = self.param(
        "pos_embed",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
        (self.max_length, self.width),
        self.param_dtype,
    )
    x = embed(ids) + pos[None, :length].astype(self.dtype)  # [B, L, width]
    for i in range(self.depth):
      h = layers.layer_norm(self.dtype, self.param_dtype, name=f"ln_attn_{i}")(x)
      x = x + Attention(
          self.heads,
          self.width // self.heads,
          self.width,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"attn_{i}",
      )(h, mask=mask)
      h = layers.layer_norm(self.dtype, self.param_dtype, name=f"ln_mlp_{i}")(x)
      x = x + SwiGLU(
          int(self.width * self.mlp_ratio), self.dtype, self.param_dtype, name=f"mlp_{i}"
      )(h)
      x = nn.with_logical_constraint(x, layers.ACT_TOKENS)
    x = layers.layer_norm(self.dtype, self.param_dtype, name="ln_final")(x)
    return (x * mask[..., None]).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class SmallTextAdapter:
  """`TextEncoder` over `SmallTextEncoder` (trainable)."""

  module: SmallTextEncoder
  trainable: bool = True

  @property
  def width(self) -> int:
    return self.module.width

  def init(self, rng, ids, mask):
    """Fresh variables of the module."""
    return self.module.init(rng, ids, mask)

  def encode(self, params, ids, mask) -> TextFeatures:
    """ids [B, L], mask [B, L] -> TextFeatures(hidden [B, L, width], mask)."""
    return TextFeatures(self.module.apply(params, ids, mask), mask)


@dataclasses.dataclass(frozen=True)
class Qwen3Adapter:
  """`TextEncoder` over a frozen language model's apply function (the Qwen3 port).

  `apply_fn(params, input_ids, attention_mask)` must return a dict whose
  'hidden_states' is [B, L, D] or a sequence of per-layer [B, L, D] (then `layer`
  picks one; -1 is the last). The features are under `stop_gradient` and zeroed on
  padding.
  """

  apply_fn: Callable[..., Any]  # e.g. model.apply of infdiff.pretrained.load("qwen3", ...)
  params: Any  # the loaded frozen weights, returned by `init`
  width: int = 2048  # Qwen3-1.7B hidden width
  layer: int = -1  # which hidden state to use when the port returns all layers
  trainable: bool = False

  def init(self, rng, ids, mask):
    """Returns the loaded weights; rng, ids and mask are unused."""
    del rng, ids, mask
    return self.params

  def encode(self, params, ids, mask) -> TextFeatures:
    """ids [B, L], mask [B, L] -> TextFeatures(hidden [B, L, width], mask)."""
    hidden = self.apply_fn(params, ids, mask)
    if isinstance(hidden, dict):
      hidden = hidden["hidden_states"]
    if isinstance(hidden, (list, tuple)):
      hidden = hidden[self.layer]
    hidden = jax.lax.stop_gradient(hidden) * mask[..., None].astype(hidden.dtype)
    return TextFeatures(hidden, mask)


def _build_small(**kwargs) -> SmallTextAdapter:
  return SmallTextAdapter(SmallTextEncoder(**kwargs))


def _build_qwen3(path: str, layer: int = -1) -> Qwen3Adapter:
  # Imported here so the demo path never needs the port (or its weights).
  pretrained = importlib.import_module("infdiff.pretrained")
  model, params = pretrained.load("qwen3", path)
  width = int(model.hidden_size)
  return Qwen3Adapter(model.apply, params, width=width, layer=layer)


TEXT_ENCODERS: dict[str, Callable[..., TextEncoder]] = {
    "small": _build_small,
    "qwen3": _build_qwen3,
}


def build_text_encoder(name: str, **kwargs) -> TextEncoder:
  """Text encoder by config name.

  Args:
    name: "small" (kwargs are `SmallTextEncoder` fields) or "qwen3" (kwargs: `path` to
      the weights, optional `layer`).
    **kwargs: passed to the builder.

  Returns:
    An object following the `TextEncoder` protocol.
  """
  if name not in TEXT_ENCODERS:
    raise KeyError(f"unknown text encoder {name!r}; known: {sorted(TEXT_ENCODERS)}")
  return TEXT_ENCODERS[name](**kwargs)
