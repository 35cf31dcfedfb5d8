"""Library calls for the notebooks in `colabs/` (and any interactive session).

The notebooks hold no logic: every cell calls one of these functions, which go through
the same paths as the command-line tools (config files and `--config.` overrides as
`infdiff.main` parses them, the trainer, the `Generator` contract, evaluator JSON).

  config = notebook.load_config("rapd", ["total_steps=300"])   # configs/rapd.py:demo
  workdir = notebook.train(config, "/tmp/rapd_demo")
  images = notebook.sample(workdir, ["a red circle"], sizes=[(32, 32), (128, 128)])
  notebook.show(images)
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np
from absl import flags
from ml_collections import config_flags

from infdiff import utils

utils.quiet_library_logs_everywhere()  # checkpoint internals log ~20 lines per save


def repo_root() -> str:
  """The checkout that holds `configs/` (the package is installed from it, `pip -e`)."""
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def methods() -> tuple[str, ...]:
  """The method names: one per `configs/<method>.py` of the checkout."""
  d = os.path.join(repo_root(), "configs")
  names = os.listdir(d) if os.path.isdir(d) else []
  return tuple(sorted(n[:-3] for n in names if n.endswith(".py") and not n.startswith("_")))


def config_spec(method: str, preset: str = "demo") -> str:
  """'rapd' -> '<repo>/configs/rapd.py:demo'; a path (with ':preset' or not) is kept."""
  if method in methods():
    path = os.path.join(repo_root(), "configs", f"{method}.py")
    return f"{path}:{preset}" if preset else path
  return method


def load_config(method: str, overrides: Sequence[str] = (), preset: str = "demo"):
  """The config `python -m infdiff.main --config=SPEC --config.KEY=VALUE ...` would train.

  Args:
    method: one of `methods()` (its `configs/<method>.py`) or a config spec
      'path/to/config.py:preset'.
    overrides: 'key=value' strings (or full '--config.key=value' flags), parsed exactly
      as on the command line; a typo is the same one-line error.
    preset: the preset of a method name (default: its one-command demo).

  Returns:
    The locked ConfigDict.
  """
  args = [o if o.startswith("--config.") else f"--config.{o}" for o in overrides]
  argv = ["notebook", f"--config={config_spec(method, preset)}", *args]
  fv = flags.FlagValues()
  # The override flags are registered from argv when the config flag is defined.
  config_flags.DEFINE_config_file(
      "config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv
  )
  fv(argv)
  return fv.config


def train(config, workdir: str) -> str:
  """Trains every stage of `config` into `workdir` (resuming a run that is there, so a
  rerun of a finished cell only reloads it) and returns `workdir`."""
  from infdiff import config_lib
  from infdiff import train as train_lib

  config_lib.check_required_paths(config)
  train_lib.train_and_evaluate(config, workdir)
  return workdir


def run_or_train(
    method: str,
    workdir: str = "",
    *,
    train_dir: str = "runs/notebook",
    overrides: Sequence[str] = (),
    steps: int | None = None,
) -> str:
  """`workdir` if given (an existing run), else trains `method`'s demo preset (with
  `overrides`; `steps` training steps for every stage, None for the preset's) into
  `train_dir/<method>` and returns that directory. A relative `train_dir` is under the
  checkout (Jupyter starts in colabs/, Colab in the clone)."""
  if workdir:
    if not os.path.isdir(workdir):
      raise FileNotFoundError(f"no run directory {workdir}")
    return workdir
  name = os.path.basename(config_spec(method).split(":")[0])[: -len(".py")]
  train_dir = os.path.join(repo_root(), train_dir)  # unchanged if absolute
  config = load_config(method, overrides)
  if steps is not None:
    if steps <= 0:
      raise ValueError(f"steps must be positive, got {steps}")
    config.total_steps = steps
    for stage in config.stages:  # stages with their own count (RaPD's stage 1: 3x)
      if "total_steps" in config[stage]:
        config[stage].total_steps = steps
  return train(config, os.path.join(train_dir, name))


def generator(workdir: str, **options):
  """The run's `Generator` (sampler options as `infdiff.sample --sampler_option`)."""
  from infdiff import runs

  return runs.load_generator(workdir, "sampling", **options)


def sample(
    workdir: str,
    conditions: Sequence[str] = ("",),
    sizes: Sequence[tuple[int, int]] = ((64, 64),),
    *,
    num: int = 1,
    seed: int = 0,
    **options,
) -> dict[str, np.ndarray]:
  """{'WxH': [len(conditions) * num, H, W, 3]} from the run's generator, one seed.

  The same seed gives the same images (`Generator.iter_sample`). `conditions` are
  prompts for text-conditioned methods; an unconditional generator draws one
  unconditional sample per entry instead.
  """
  gen = generator(workdir, **options)
  if not gen.conditional:  # prompts mean nothing to it: one unconditional draw per prompt
    conditions = [""] * len(conditions)
  return {f"{w}x{h}": imgs for (w, h), imgs in gen.iter_sample(list(conditions), num, seed, sizes)}


def zoom(
    workdir: str,
    scales: Sequence[int] = (1, 2, 4, 8, 16),
    *,
    region: tuple[float, float, float] = (0.25, 0.25, 0.5),
    condition: str = "",
    seed: int = 0,
    **options,
) -> dict:
  """One sample rendered at increasing scales, cropped to the same region.

  A latent generator (RaPD, INFD) denoises one latent and renders it at `s` times its
  base size for each scale; other generators (∞-Diff, Patch-DM) sample the same seed at
  each size. `region` = (top, left, side) as fractions of the image: every scale shows
  that same square with `s`x the pixels (default: the centre half).

  Returns:
    {'scale': [...], 'size': [(W, H)], 'crop': [[h, w, 3] arrays], 'seconds': [...],
     'peak_rss_gib': [...]} with the time of each render (or sample) and the process's
    peak resident memory after it.
  """
  from infdiff import cli
  from infdiff.methods import base

  top, left, side = region
  if not (0 <= top < 1 and 0 <= left < 1 and 0 < side <= 1 - max(top, left)):
    raise ValueError(f"region {region}: (top, left, side) fractions inside the image")
  gen = generator(workdir, **options)
  conds = gen.check_conditions([condition if gen.conditional else ""])
  base_h, base_w = gen.native_size
  latent = gen.latents(conds, num=1, seed=seed) if isinstance(gen, base.LatentGenerator) else None
  out = {"scale": [], "size": [], "crop": [], "seconds": [], "peak_rss_gib": []}
  for s in scales:
    h, w = base_h * s, base_w * s
    start = time.perf_counter()
    if latent is not None:
      img = gen.render(latent, h, w)[0]
    else:
      img = next(iter(gen.iter_sample(conds, 1, seed, [(w, h)])))[1][0]
    out["seconds"].append(time.perf_counter() - start)
    out["peak_rss_gib"].append(cli.peak_rss_gib())
    out["scale"].append(s)
    out["size"].append((w, h))
    y, x = round(top * h), round(left * w)
    out["crop"].append(img[y : y + max(1, round(side * h)), x : x + max(1, round(side * w))])
  return out


GUIDE_TASKS = ("superres", "inpaint", "hole", "outpaint", "colours")


def guided(
    workdir: str,
    task: str,
    *,
    scale: float = 1.0,
    num: int = 2,
    seed: int = 0,
    index: int = 0,
    step_rule: str = "auto",
    **sampler_options,
) -> dict:
  """One inverse problem on held-out image `index`, through `infdiff.guide.run`.

  Tasks, on the generator's native size N (`GUIDE_TASKS`):
    superres  the 2N canvas from its 2x area-downsampling
    inpaint   the N canvas from its left half
    hole      the N canvas from the ring around a centred N/2 hole
    outpaint  the 3N/2 canvas from the N image at its centre
    colours   the N canvas from the mean colour of each quadrant

  Returns {'task', 'canvas', 'report' (guide.run's constraint errors, guided and
  unguided, per condition), 'images': {'held-out': [1, ...], 'unguided': [num, ...],
  'guided': [num, ...]}}. Files go to WORKDIR/guided/<task>.
  """
  from infdiff import guide, runs

  if task not in GUIDE_TASKS:
    raise ValueError(f"unknown guidance task {task!r}; expected one of {GUIDE_TASKS}")
  n = generator(workdir, **sampler_options).native_size[0]
  out = os.path.join(runs.run_root(workdir), "guided", task)
  side = {"superres": 2 * n, "outpaint": 3 * n // 2}.get(task, n)
  inputs = guide.held_out_inputs(
      workdir,
      n if task == "outpaint" else side,
      os.path.join(out, "inputs"),
      factor=2,
      index=index,
  )
  off = (side - n) // 2
  kwargs = {
      "superres": dict(lowres=inputs["lowres"]),
      "inpaint": dict(crops=[inputs["half"]]),
      "hole": dict(crops=inputs["ring"]),
      "outpaint": dict(crops=[f"{off},{off},{inputs['truth']}"]),
      "colours": dict(colours=inputs["colours"]),
  }[task]
  report = guide.run(
      workdir,
      f"{side}x{side}",
      scale=scale,
      step_rule=step_rule,
      num=num,
      seed=seed,
      out=out,
      sampler_options=sampler_options,
      **kwargs,
  )
  read = lambda kind: np.stack(
      [guide.read_png(os.path.join(out, f"{kind}_{i:03d}.png")) for i in range(num)]
  )
  images = {"held-out": guide.read_png(inputs["truth"])[None]}
  images.update({k: read(k) for k in ("unguided", "guided")})
  return {"task": task, "canvas": side, "report": report, "images": images}


def guide_all(workdir: str, tasks: Sequence[str] = GUIDE_TASKS, **kwargs) -> list[dict]:
  """`guided` for each task (the same keyword arguments for all)."""
  return [guided(workdir, t, **kwargs) for t in tasks]


def show_guided(results: Sequence[dict], *, scale: float = 2.0) -> list:
  """For each `guided` result: its constraint errors (mean squared error of the
  condition, unguided vs guided) and the held-out image beside the samples."""
  figs = []
  for r in results:
    for label, e in r["report"].items():
      print(
          f"{r['task']} ({r['canvas']}x{r['canvas']}) {label}: unguided "
          f"{e['unguided_mean']:.5f}, guided {e['guided_mean']:.5f}"
      )
    figs.append(show(r["images"], scale=scale))
  return figs


def has_autoencoder(workdir: str) -> bool:
  """Whether a stage of the run provides a `FieldAutoencoder` (RaPD, INFD)."""
  from infdiff import runs
  from infdiff.methods import base

  return runs.has_contract(workdir, base.AUTOENCODER)


def recon_curve(
    workdir: str, scales: Sequence[int] = (1, 2, 4, 8, 16), *, num: int = 8, seed: int = 0
):
  """`--metric=recon` of the run's autoencoder at `scales` (PSNR/SSIM of its renders and
  of bicubic upsampling against the ground truth at each scale), as an evaluator
  `Result`; None for a run without an autoencoder."""
  from infdiff import runs
  from infdiff.evaluators import common, recon

  if not has_autoencoder(workdir):
    return None
  ae = runs.load_autoencoder(workdir, "a recon curve")
  source = common.held_out_source(common.run_data_config(workdir))
  return recon.evaluate(ae, source, num=num, seed=seed, scales=tuple(scales))


def same_images(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
  """Whether two `sample` results hold identical pixels at every size."""
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def evaluate(workdir: str, metric: str, sizes: Sequence[str] = (), **kwargs):
  """`python -m infdiff.evaluate --workdir=W --metric=M --size=... --num=...`: computes the
  metric, writes `W/eval/<metric>.json` and returns its `Result` (keyword arguments as
  the CLI's flags: num, seed, data, step, tile, sampler_options, ...)."""
  from infdiff import evaluate as evaluate_lib

  return evaluate_lib.run(evaluate_lib.make_args(workdir, metric, tuple(sizes), **kwargs))[0]


def default_metrics(workdir: str) -> list[str]:
  """The metrics that apply to a run, from the contracts it provides: recon for an
  autoencoder; for its generator ShapesEval (text-conditioned), seams (patch-based: it
  has a `patch_size`) or SWD (unconditional)."""
  from infdiff import runs
  from infdiff.methods import base

  out = ["recon"] if runs.has_contract(workdir, base.AUTOENCODER) else []
  if runs.has_contract(workdir, base.GENERATOR):
    gen = generator(workdir)
    if gen.conditional:
      out.append("shapes_eval")
    else:
      out.append("seams" if getattr(gen, "patch_size", None) else "swd")
  return out


def evaluate_all(workdir: str, metrics: Sequence[str] | None = None, **kwargs) -> dict:
  """`evaluate` for each metric (default: `default_metrics`), the same keyword arguments
  for all; returns {metric: Result}."""
  names = default_metrics(workdir) if metrics is None else metrics
  return {m: evaluate(workdir, m, **kwargs) for m in names}


def eval_results(workdir: str) -> dict:
  """{name: Result} read back from the run's `eval/*.json` (what `evaluate` wrote)."""
  import json

  from infdiff import runs
  from infdiff.evaluators import common

  directory = os.path.join(runs.run_root(workdir), "eval")
  out = {}
  for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
    if not name.endswith(".json"):
      continue
    with open(os.path.join(directory, name)) as f:
      out[name[: -len(".json")]] = common.Result.from_json(json.load(f))
  return out


def show_eval(results: dict) -> list:
  """Each result's table, and a plot: PSNR/SSIM against scale for scale rows ('2x'), else
  one bar group per row (e.g. ShapesEval categories, one bar per size). Returns figures."""
  import matplotlib.pyplot as plt

  figs = []
  for name, result in results.items():
    print(f"{name}:\n{result.table()}\n")
    rows = list(result.rows)
    if rows and all(r.endswith("x") and r[:-1].isdigit() for r in rows):
      if any(c.endswith("_psnr") for c in result.columns()):
        figs.append(plot_recon(result))
      continue
    cols = result.columns()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) * len(cols)), 3))
    width = 0.8 / max(1, len(cols))
    for j, c in enumerate(cols):
      vals = [result.rows[r].get(c, float("nan")) for r in rows]
      ax.bar(np.arange(len(rows)) + j * width, vals, width, label=c)
    ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, rows, rotation=30, fontsize=7)
    ax.set_title(name, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    figs.append(fig)
  return figs


def show(images: dict[str, np.ndarray], *, max_per_row: int = 8, scale: float = 2.0, gap: int = 8):
  """Images side by side on one canvas: a column per key (e.g. per size), a row per
  image, each at its own pixel size (no resampling: a 4x render is drawn 4x larger),
  magnified `scale` times on screen. Returns the matplotlib figure."""
  import matplotlib.pyplot as plt

  keys = list(images)
  rows = min(max_per_row, max(len(v) for v in images.values()))
  # A column is at least as wide as its label (about 6 canvas pixels per character).
  widths = [images[k].shape[2] for k in keys]
  cols = [max(w, 6 * max(len(line) for line in k.split("\n"))) for k, w in zip(keys, widths)]
  row_h = max(images[k].shape[1] for k in keys)
  label_h = 12 * max(k.count("\n") + 1 for k in keys) + gap
  canvas = np.ones((label_h + rows * (row_h + gap) + gap, sum(cols) + gap * (len(keys) + 1), 3))
  x, centres = gap, []
  for k, w, col in zip(keys, widths, cols):
    left = x + (col - w) // 2
    for i, img in enumerate(images[k][:rows]):
      y = label_h + gap + i * (row_h + gap)
      canvas[y : y + img.shape[0], left : left + w] = np.clip(img[..., :3], 0.0, 1.0)
    centres.append(x + col / 2)
    x += col + gap
  dpi = 100
  h, w = canvas.shape[:2]
  fig = plt.figure(figsize=(scale * w / dpi, scale * h / dpi), dpi=dpi)
  ax = fig.add_axes((0, 0, 1, 1))
  ax.imshow(canvas, interpolation="nearest")
  ax.axis("off")
  for k, cx in zip(keys, centres):
    ax.text(cx, label_h - gap / 2, k, ha="center", va="bottom", fontsize=8)
  return fig


def show_zoom(zoomed: dict, *, scale: float = 2.0):
  """The crops of `zoom` side by side, titled with scale, size, time and memory."""
  images = {
      f"{s}x {w}x{h}\n{t:.2f} s, {m:.2f} GiB": crop[None]
      for s, (w, h), crop, t, m in zip(
          zoomed["scale"],
          zoomed["size"],
          zoomed["crop"],
          zoomed["seconds"],
          zoomed["peak_rss_gib"],
      )
  }
  return show(images, scale=scale)


def plot_recon(result, *, metric: str = "psnr"):
  """A `recon_curve` result as model vs bicubic `metric` against scale (the figure), or a
  printed line for None (a run without an autoencoder)."""
  import matplotlib.pyplot as plt

  if result is None:
    print("this run has no autoencoder stage: no reconstruction curve")
    return None

  scales = [int(k[:-1]) for k in result.rows]
  fig, ax = plt.subplots(figsize=(4, 3))
  for name in ("model", "bicubic"):
    ax.plot(scales, [r[f"{name}_{metric}"] for r in result.rows.values()], "o-", label=name)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("output scale")
  ax.set_ylabel(metric.upper() + (" (dB)" if metric == "psnr" else ""))
  ax.set_title(result.note, fontsize=7)
  ax.legend()
  fig.tight_layout()
  return fig
