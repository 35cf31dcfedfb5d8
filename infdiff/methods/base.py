"""The interface every method (or stage of a method) implements for the one trainer.

The trainer owns everything generic: mesh, data loading, state construction with
shardings, the jitted and donated step, optimisers, EMA, checkpoints, logging and
evaluation. A method supplies the parts that differ:

- `groups`: the trainable parameter groups, updated in this order within one step.
  A plain model has one ('model',); a GAN has ('model', 'disc') and its `loss` is
  called once per group, always with the latest parameters of every group, so the
  discriminator step sees the generator just updated (standard alternation).
- `ema_groups`: groups with an EMA copy of their parameters (evaluation, sampling). The
  decay is `config.<stage>.ema_decay` if the stage sets it, else the run's `ema_decay`;
  0 keeps no copy (`TrainState.ema` is empty and inference uses the parameters).
- `data_transform(split)`: the host-side transform from source records to training
  examples (e.g. the multi-resolution crop).
- `data_source(source, split)`: the training source the trainer reads, given the one the
  data config names (default: unchanged). A method that samples records unevenly wraps it
  (INFD draws a fixed share from the high-resolution images, `sources.balance_by_size`).
- `prepare(mesh, training=True)`: frozen inputs that are not trained nor checkpointed
  with the run (pretrained teachers loaded from local paths, a frozen previous stage,
  latent statistics). Returned as a pytree and passed to every loss call. Leaves boxed
  with `nn.LogicallyPartitioned` (e.g. `nn.LogicallyPartitioned(w, ('embed', 'mlp'))`)
  are sharded by the config's logical axis rules like parameters; unboxed leaves are
  replicated. The trainer passes training=True; inference (sampling, evaluation CLIs)
  passes training=False, and a method then skips inputs only its training loss uses
  (a distillation or REPA teacher, LPIPS).
- `init(rng, batch)`: per group, the Linen parameters (boxed with logical names):
  `{group: params}`. A method with mutable, non-trained variables (BatchNorm statistics
  of a discriminator, EMA codebooks) returns `{'params': {group: params},
  'state': {group: {collection: tree}}}` instead, e.g.
  `{'params': {'model': ..., 'disc': v['params']}, 'state': {'disc': {'batch_stats':
  v['batch_stats']}}}`. The state is sharded like parameters, checkpointed with the run
  and kept in `TrainState.model_state` (groups without state are absent).
- `loss(group, params, aux, batch, rng, step)`: scalar loss and metrics for `group`,
  returned as `(loss, metrics)`. With mutable state it is called with the keyword
  `state=` (the current `{group: {collection: tree}}` of every group, including updates
  made earlier in the same step) and returns `(loss, metrics, updates)`, where `updates`
  is a `{group: {collection: tree}}` of the collections it changed (e.g. the
  `batch_stats` from `apply(..., mutable=['batch_stats'])`); structures and shapes must
  match the initial state. Updates are written into the new state after the step, and
  dropped with the rest of the step when the loss or gradients are non-finite.
- `optimizer_config(group)`: the optax config of a group (default: the stage's `optim`).
- `summaries(params, aux, batch, rng)`: images for TensorBoard (optional).
- `finalize(ctx)`: host work after the last step (e.g. latent statistics, samples).
- `provides` and `make_inference(params, aux, **options)`: the inference contract the
  stage offers (`FieldAutoencoder` and/or `Generator`, below) and how to build it from
  its parameters; `infdiff.runs` and every CLI, evaluator and notebook go through it.
- `__init__(config, stage, workdir, training=True)`: `runs.load_run` builds the method
  with training=False, so training-only inputs are neither loaded nor required.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np


class Method:
  """Base class with defaults; subclasses override what they need."""

  groups: tuple[str, ...] = ("model",)
  # Groups whose parameters get an EMA copy (used for evaluation and sampling); none when
  # the stage's EMA decay is 0.
  ema_groups: tuple[str, ...] = ("model",)
  # Inference contracts this stage provides: AUTOENCODER and/or GENERATOR.
  provides: tuple[str, ...] = ()

  def __init__(self, config, stage: str, workdir: str, *, training: bool = True):
    self.config = config  # the full run config
    self.stage = stage
    self.cfg = config[stage]  # this stage's section
    self.workdir = workdir  # this stage's directory
    # False when built for inference (`runs.load_run`): training-only inputs (teachers,
    # LPIPS) are neither loaded nor required.
    self.training = training
    self._inference = None

  def data_transform(self, split: str):
    raise NotImplementedError

  def data_source(self, source, split: str):
    """The source the trainer reads for `split` (default: the config's, unchanged)."""
    del split
    return source

  def prepare(self, mesh, training: bool = True) -> Any:
    """Frozen inputs of the loss (training) or of inference (training=False)."""
    del mesh, training
    return {}

  def init(self, rng, batch) -> dict:
    raise NotImplementedError

  def loss(self, group, params, aux, batch, rng, step):
    """(loss, metrics), or (loss, metrics, state updates) when called with `state=`."""
    raise NotImplementedError

  def optimizer_config(self, group: str):
    del group
    return self.cfg.optim

  def summaries(self, params, aux, batch, rng) -> dict:
    del params, aux, batch, rng
    return {}

  def finalize(self, ctx) -> None:
    del ctx

  # --- inference --------------------------------------------------------------------
  def make_inference(self, params, aux, **options):
    """Builds this stage's `FieldAutoencoder` or `Generator` from its parameters.

    Args:
      params: {group: params} (EMA where the run keeps one).
      aux: the frozen inputs from `prepare(mesh, training=False)`.
      **options: sampling options from the CLI (e.g. num_steps, cfg_scale); an option
        that does not apply is a one-line ValueError.
    """
    del params, aux, options
    raise ValueError(f"stage {self.stage} provides no inference contract")

  def inference(self, params, aux, **options):
    """The stage's contract object, built once and then given the new parameters.

    Training-time evaluators call this at every evaluation, so compiled functions are
    reused as the parameters change.
    """
    if self._inference is None or options:
      self._inference = self.make_inference(params, aux, **options)
    else:
      self._inference.set_params(params, aux)
    return self._inference


# ---------------------------------------------------------------------------------------
# Inference contracts. `infdiff.sample`, `infdiff.evaluate`, the benchmarks and the
# notebooks talk to these two, never to a method's internals. A stage declares which
# it provides in `Method.provides` and builds it in `Method.make_inference`.

AUTOENCODER = "autoencoder"
GENERATOR = "generator"


def pad_batch(x: np.ndarray, b: int) -> np.ndarray:
  """`x` [n, ...] padded to b rows by repeating its last row (static shapes: one compile)."""
  if len(x) == b:
    return x
  return np.concatenate([x, np.repeat(x[-1:], b - len(x), axis=0)])


class FieldAutoencoder(abc.ABC):
  """Images -> latent -> images at any size (RaPD stage 1; INFD's autoencoder; InfGen).

  Implementations stream over the latents in fixed-size chunks (static shapes, one
  compile) and render through the tiled renderer where the method has one, so memory
  stays bounded in both the number of latents and the output size.
  """

  kind = AUTOENCODER
  # Encoder input side(s) (H, W): `encode` takes images of exactly this size.
  input_size: tuple[int, int]

  @abc.abstractmethod
  def encode(self, images: np.ndarray) -> np.ndarray:
    """[N, H_in, W_in, 3] float32 in [0, 1] -> latents [N, h, w, C] (numpy)."""

  @abc.abstractmethod
  def render(self, latents: np.ndarray, height: int, width: int, *, tile: int | None = None):
    """[N, h, w, C] latents -> [N, height, width, 3] float32 images (not clipped)."""

  def set_params(self, params, aux) -> None:
    """Swaps in new parameters (a training-time evaluator reuses the compiled code)."""
    del params, aux

  def encode_in_chunks(self, encode_fn, params, images, batch: int) -> np.ndarray:
    """`encode_fn(params, x [batch, H_in, W_in, 3])` over `images` in fixed-size chunks.

    Checks the input size (one-line ValueError) and pads the last chunk by repeating its
    last image, so a jitted encoder compiles once whatever the number of images.
    """
    images = np.asarray(images, np.float32)
    if images.shape[1:3] != tuple(self.input_size):
      raise ValueError(
          f"the encoder takes {self.input_size[0]}x{self.input_size[1]} images, "
          f"got {images.shape[1]}x{images.shape[2]}"
      )
    out = []
    for s in range(0, len(images), batch):
      chunk = images[s : s + batch]
      z = encode_fn(params, pad_batch(chunk, batch))
      out.append(np.asarray(z)[: len(chunk)])
    return np.concatenate(out)


class Generator(abc.ABC):
  """Samples images at any list of sizes.

  `conditional` generators take one prompt per condition; unconditional ones accept only
  empty conditions ('' or none) and refuse prompts with a one-line ValueError.
  """

  kind = GENERATOR
  conditional: bool = False
  max_size: int = 8192  # largest output side the sample CLI accepts

  @property
  @abc.abstractmethod
  def native_size(self) -> tuple[int, int]:
    """(H, W) of the images the generator was trained on: scale 1 of a zoom."""

  def check_conditions(self, conditions) -> list[str]:
    """The conditions as a list of prompts; a one-line ValueError if they do not apply."""
    conditions = list(conditions or [""])
    if not self.conditional and any(c for c in conditions):
      raise ValueError(
          f"{type(self).__name__} is unconditional: it takes no prompts "
          f"(got {conditions[0]!r}); leave --prompt out"
      )
    return conditions

  @abc.abstractmethod
  def iter_sample(self, conditions, num: int, seed: int, sizes):
    """Yields ((W, H), [len(conditions) * num, H, W, 3]) one size at a time.

    Images are condition-major (all `num` samples of the first condition first), in
    [0, 1]. The same seed gives the same images whatever the batching. Implementations
    call `check_conditions` first.
    """

  @staticmethod
  def key_batches(n_total: int, seed: int, batch: int):
    """Yields (count, keys): per-sample keys fold_in(PRNGKey(seed), i) in fixed-size batches.

    The last batch is padded by repeating its last key (a fixed shape: one compile) and
    `count` says how many of its results are real, so sample i depends on its seed and
    index only, whatever the batching.
    """
    import jax  # local: keeps this module importable without initialising jax

    key = jax.random.PRNGKey(seed)
    for start in range(0, n_total, batch):
      idx = list(range(start, min(start + batch, n_total)))
      count = len(idx)
      idx += [idx[-1]] * (batch - count)
      yield count, [jax.random.fold_in(key, i) for i in idx]

  def sample(self, conditions, num: int, seed: int, sizes) -> dict:
    """{(W, H): [len(conditions) * num, H, W, 3] float32 in [0, 1]}."""
    return dict(self.iter_sample(conditions, num, seed, sizes))

  def set_params(self, params, aux) -> None:
    """Swaps in new parameters (a training-time evaluator reuses the compiled code)."""
    del params, aux


class LatentGenerator(Generator):
  """A generator with a latent: the denoising cost does not depend on the output size.

  `latents` runs the sampler once per image; `render` draws those latents at any size.
  """

  @abc.abstractmethod
  def latents(self, conditions, num: int = 1, seed: int = 0) -> np.ndarray:
    """Denoised latents [len(conditions) * num, h, w, C], condition-major."""

  @abc.abstractmethod
  def render(self, latents: np.ndarray, height: int, width: int) -> np.ndarray:
    """[N, h, w, C] -> [N, height, width, 3] float32 in [0, 1]."""

  def iter_sample(self, conditions, num: int, seed: int, sizes):
    z = self.latents(self.check_conditions(conditions), num=num, seed=seed)
    for w, h in sizes:
      yield (w, h), self.render(z, h, w)


class GuidablePrior(abc.ABC):
  """A latent diffusion prior whose samples are fields, opened up for guided sampling.

  Diffusion posterior sampling (`infdiff.guide`, DPS) needs, at every step, the predicted
  clean latent, a differentiable path from it to pixels at arbitrary coordinates, and the
  sampler's schedule. A `LatentGenerator` that also subclasses this exposes exactly that,
  as pure JAX functions with the parameters closed over, so the guidance code never
  imports a method:

  - `latent_shape`: (h, w, C) of one latent.
  - `schedule`, `parameterization`: the discrete Gaussian diffusion it was trained with
    (`infdiff.diffusion.gaussian`).
  - `model_fn()`: `(x [B, h, w, C], t [B] int32) -> output` (the parameterisation's).
  - `field_fn()`: `x0 [B, h, w, C] (the diffusion latent) -> field`, any pytree the render
    function takes (INFD: the decoded feature map phi).
  - `render_fn()`: `(field, coords [B, H, W, 2], cells [B, 2]) -> rgb [B, H, W, 3]` in
    [0, 1] (not clipped), differentiable; coords are points of the [-1, 1]^2 domain
    (METHODS.md), so a box of the canvas is rendered at its own grid without the rest.

  A prior whose diffusion state depends on the canvas (∞-Diff diffuses the pixels of the
  canvas itself) returns a per-canvas prior from `guidance_view(H, W)`; per-sample inputs
  that are not diffused (∞-Diff's autoencoder latent z) come from `initial_state` as a
  `context` pytree, and its model function then takes `(x, t, context)`. The defaults fit
  a latent prior whose latent does not depend on the canvas (INFD).
  """

  clip_x0: float | None = None  # the sampler's clip of x0_hat, if it clips

  def guidance_view(self, height: int, width: int) -> GuidablePrior:
    """The prior whose samples are canvases of height x width (default: this one)."""
    del height, width
    return self

  def initial_state(self, keys):
    """(noise [B, *latent_shape], context) for per-sample keys [B] (context None: none)."""
    import jax  # local: keeps this module importable without initialising jax

    noise = jax.numpy.stack([jax.random.normal(k, self.latent_shape) for k in keys])
    return noise, None

  def to_images(self, x0, height: int, width: int) -> np.ndarray:
    """Final states [B, *latent_shape] -> canvases [B, height, width, 3] in [0, 1]."""
    return self.render(x0, height, width)

  latent_shape: tuple[int, int, int]
  schedule: Any
  parameterization: str = "eps"

  @abc.abstractmethod
  def model_fn(self):
    """The denoiser `(x, t) -> output`, parameters closed over."""

  @abc.abstractmethod
  def field_fn(self):
    """`x0 latent -> field` (differentiable)."""

  @abc.abstractmethod
  def render_fn(self):
    """`(field, coords, cells) -> rgb` (differentiable)."""
