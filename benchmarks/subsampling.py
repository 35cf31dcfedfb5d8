"""∞-Diff subsampling: train-step time and memory against the rate N^2 / points.

Builds the ∞-Diff main stage (`configs/infty_diff.py:demo` widths: nf 32, 2 sparse
blocks, kernel 7, grid channels 32, UNet ch 32 x (1, 2, 4), 1 res block, z_dim 64 with
the encoder) at data resolution 128 with a 32^2 inner grid (attention at sides 16 and 8,
the demo's two coarse levels; paper Tables 4/5's smallest column), and for every rate
(default 1, 2, 4, 8, 16) the real jitted, donated train step
(`infdiff.train.make_train_step`, as `step_efficiency.py`) at a fixed batch (default 8).
Per rate it prints

  step time    median wall time of one step; the rates are timed in alternation (one
               step of every rate per round) so load that drifts affects all alike
  speed-up     step time at rate 1 / step time at the rate
  peak memory  from XLA's buffer assignment of the compiled step
               (`compiled.memory_analysis()`): temp + arguments + outputs - aliased,
               i.e. the state, the batch and the step's working set, with the donated
               state counted once
  reduction    peak memory at rate 1 / peak memory at the rate

beside the paper's numbers for data 128 / inner 32: Table 5 (memory reduction at a fixed
batch of 16), Table 4 (speed-up at a fixed 10 GB memory budget, relative to 2x: not the
same quantity as ours at a fixed batch) and Table 3 (fixed-batch speed-up on FFHQ-128 at
1/2/4/8x, inner grid not stated). Targets: memory reduction >= Table 5 at every rate and
speed-up >= 2 at 8x. The last line is

  subsampling 8x: speedup=<float> memory_reduction=<float>

(for the largest rate given when 8 is not among --rates).

--breakdown 1,8 also compiles and times the parts of the step at those rates: the
parameter-free preparation (mollifier on the full N^2 image, noising, two random subsets,
index maps, gathers), the denoiser and the encoder forward+backward, the denoiser's inner
grid UNet alone (the same at every rate), the points <-> grid interpolation, the whole
loss gradient, and what the step adds to it (clipping, Adam, EMA, non-finite guard).

Usage: python -m benchmarks.subsampling [--quick] [--rates 1,2,4,8,16] [--batch 8]
                                        [--repeats 5] [--breakdown 1,8]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common

# Paper, data 128 / inner 32. Table 5: memory reduction at a fixed batch (vs 1x).
PAPER_MEMORY = {2: 1.56, 4: 2.44, 8: 3.27, 16: 3.90}
# Table 4: speed-up at a fixed memory budget, relative to 2x (1x is not in the table).
PAPER_BUDGET_SPEEDUP = {2: 1.00, 4: 1.64, 8: 2.65, 16: 2.89}
# Table 3: speed-up at a fixed batch, FFHQ 128.
PAPER_BATCH_SPEEDUP = {1: 1.0, 2: 1.0, 4: 1.3, 8: 1.6}
TARGET_SPEEDUP_8X = 2.0


def load_config(arg: str = "demo"):
  """configs/infty_diff.py:get_config(arg), loaded by path (configs/ is not a package)."""
  path = os.path.join(common.ROOT, "configs/infty_diff.py")
  spec = importlib.util.spec_from_file_location("infty_diff_cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def bench_config(quick: bool = False):
  """The demo preset at the benchmark's sizes (data 128, inner grid 32; --quick: tiny)."""
  c = load_config("demo,z=64")  # the diffusion autoencoder (encoder on), as in the paper
  s = c.infty_diff
  if quick:
    s.batch_size = 2
    s.image_size = 32
    s.z_dim = 16
    s.net.update(nf=16, num_blocks=1, kernel_size=3, grid_size=8, grid_channels=16)
    s.net.unet.update(ch=16, channel_mult=(1, 2), attention_resolutions=(4,), dropout_resolution=4)
  else:
    s.batch_size = 8
    s.image_size = 128
    s.net.grid_size = 32  # sides 32, 16, 8 with channel_mult (1, 2, 4)
    s.net.unet.attention_resolutions = (16, 8)  # the demo's two coarse levels, scaled
    s.net.unet.dropout_resolution = 16
  return c


def fmt_rate(r: float) -> str:
  return f"{r:g}x"


def memory_bytes(compiled) -> dict:
  """Peak training memory of a compiled step from XLA's buffer assignment.

  peak = temp + arguments + outputs - aliased (a donated input that the output reuses is
  counted once). `peak_memory_in_bytes` is XLA's own figure (0 where not reported).
  """
  m = compiled.memory_analysis()
  peak = (
      m.temp_size_in_bytes
      + m.argument_size_in_bytes
      + m.output_size_in_bytes
      - m.alias_size_in_bytes
  )
  return dict(
      peak=int(peak),
      temp=int(m.temp_size_in_bytes),
      args=int(m.argument_size_in_bytes),
      xla_peak=int(getattr(m, "peak_memory_in_bytes", 0) or 0),
  )


def flops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def random_batch(config, batch: int, seed: int = 0) -> dict:
  n = int(config.infty_diff.image_size)
  rng = np.random.default_rng(seed)
  return {"image": rng.random((batch, n, n, 3), np.float32)}


class RateBench:
  """The method, its train state and its compiled train step at one rate."""

  def __init__(self, config, rate: float, batch: dict, workdir: str):
    from infdiff.methods import get_method_class

    config = config.copy_and_resolve_references()
    config.infty_diff.rate = float(rate)
    config.infty_diff.batch_size = int(batch["image"].shape[0])
    self.rate = rate
    self.method = get_method_class("infty_diff")(
        config, "infty_diff", os.path.join(workdir, f"rate{rate:g}")
    )
    self.bench = common.StepBench(self.method, config, batch)
    b = self.bench
    with b.mesh, nn.logical_axis_rules(b.rules):
      compiled = b.step.lower(b.state, b.batch, b.aux).compile()
    self.memory = memory_bytes(compiled)
    self.flops = flops_of(compiled)
    b.step = compiled  # the same executable runs the timed steps (one compile per rate)
    self.times: list[float] = []

  def time_step(self, warmup: int = 0) -> None:
    self.times.append(common.median_time(lambda: self.bench.run(1), repeats=1, warmup=warmup))

  @property
  def seconds(self) -> float:
    return statistics.median(self.times)


# --- per-part breakdown ----------------------------------------------------------------
def _part(fn, *args, repeats: int = 3) -> dict:
  """Compiled memory (same formula as the step), FLOPs and median time of jit(fn)(*args)."""
  compiled = jax.jit(fn).lower(*args).compile()
  run = lambda: jax.block_until_ready(compiled(*args))
  out = memory_bytes(compiled)
  out["flops"] = flops_of(compiled)
  out["seconds"] = common.median_time(run, repeats=repeats, warmup=1)
  return out


def breakdown(rb: RateBench, repeats: int = 3, unet: bool = True) -> dict:
  """{part: {'peak', 'temp', 'flops', 'seconds'}} of the step's parts at rb's rate."""
  from infdiff.diffusion import gaussian
  from infdiff.models import sparse
  from infdiff.models.sparse_unet import _grid_unet

  m, b = rb.method, rb.bench
  cfg = m.cfg
  n = m.image_size
  params = nn.unbox(jax.device_get(b.state.params))
  p = params["model"]
  batch = b.batch
  rng = jax.random.PRNGKey(1)
  nb = batch["image"].shape[0]

  def prep(batch, rng):
    # method.loss up to the networks (the parameter-free part of the step)
    k_t, k_eps, k_pts, k_enc, _ = jax.random.split(rng, 5)
    x0 = batch["image"].astype(jnp.float32) * 2.0 - 1.0
    t = gaussian.sample_timesteps(k_t, nb, m.schedule.num_steps)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    both = m.mollify(jnp.concatenate([gaussian.q_sample(m.schedule, x0, t, eps), eps], -1))
    x_t, target = both[..., :3], both[..., 3:]
    pts = sparse.point_set(sparse.random_subset(k_pts, nb, n, n, m.points), n, n)
    enc_pts = sparse.point_set(sparse.random_subset(k_enc, nb, n, n, m.points), n, n)
    return dict(
        x=sparse.gather_points(x_t, pts),
        target=sparse.gather_points(target, pts),
        pts=pts,
        t=t,
        enc_x=sparse.gather_points(x0, enc_pts),
        enc_pts=enc_pts,
    )

  parts = {"prep (no params)": _part(prep, batch, rng, repeats=repeats)}
  ins = jax.jit(prep)(batch, rng)
  z = None
  if m.encoder is not None:
    enc = lambda ep, ins: m.encoder.apply({"params": ep}, ins["enc_x"], ins["enc_pts"], n, n)
    z = jax.jit(enc)(p["encoder"], ins)

    def enc_grad(ep, ins):
      return jax.grad(lambda ep: jnp.sum(enc(ep, ins) ** 2))(ep)

    parts["encoder f+b"] = _part(enc_grad, p["encoder"], ins, repeats=repeats)

  def net_grad(np_, ins, z):
    def f(np_):
      out = m.net.apply(
          {"params": np_},
          ins["x"],
          ins["pts"],
          n,
          n,
          ins["t"],
          z,
          train=True,
          rngs={"dropout": jax.random.PRNGKey(2)},
      )
      return jnp.mean((out - ins["target"]) ** 2)

    return jax.grad(f)(np_)

  parts["denoiser f+b"] = _part(net_grad, p["net"], ins, z, repeats=repeats)

  g_ch, g = cfg.net.grid_channels, cfg.net.grid_size
  if unet:
    u = _grid_unet(m.net, g_ch, m.net.dropout, m.net.dropout_resolution, m.net.z_dim)
    grid = jax.random.normal(jax.random.PRNGKey(3), (nb, g, g, g_ch), jnp.float32)

    def unet_grad(up, grid, t, z):
      def f(up):
        out = u.apply(
            {"params": up}, grid, t, cond=z, train=True, rngs={"dropout": jax.random.PRNGKey(4)}
        )
        return jnp.mean(out**2)

      return jax.grad(f)(up)

    parts["  of which inner UNet f+b"] = _part(
        unet_grad, p["net"]["unet"], grid, ins["t"], z, repeats=repeats
    )

  feats = jax.random.normal(jax.random.PRNGKey(5), (nb, m.points, g_ch), jnp.float32)

  def interp_grad(feats, pts):
    def f(feats):
      gr = sparse.points_to_grid(feats, pts, n, n, g, g, k=int(cfg.net.knn))
      return jnp.mean(sparse.grid_to_points(gr, pts, n, n) ** 2)

    return jax.grad(f)(feats)

  parts["  of which points<->grid f+b"] = _part(interp_grad, feats, ins["pts"], repeats=repeats)

  def loss_grad(params, batch, rng):
    return jax.value_and_grad(lambda q: m.loss("model", {"model": q}, {}, batch, rng, 0)[0])(
        params["model"]
    )

  parts["loss value_and_grad"] = _part(loss_grad, params, batch, rng, repeats=repeats)
  parts["train step"] = dict(
      rb.memory, flops=rb.flops, seconds=rb.seconds if rb.times else float("nan")
  )
  return parts


def print_breakdown(tables: dict) -> None:
  rates = list(tables)
  names = list(tables[rates[0]])
  print("\nbreakdown (each part compiled and timed alone; memory = temp + args + out - alias)")
  head = "".join(f" {fmt_rate(r) + ' ms':>9} {fmt_rate(r) + ' MiB':>9} {'GFLOP':>7}" for r in rates)
  print(f"{'part':<30}{head}")
  for name in names:
    row = ""
    for r in rates:
      d = tables[r][name]
      row += f" {d['seconds'] * 1e3:9.1f} {d['peak'] / 2**20:9.1f} {d['flops'] / 1e9:7.2f}"
    print(f"{name:<30}{row}")
  if len(rates) > 1:
    r0, r1 = rates[0], rates[-1]
    print(f"ratios {fmt_rate(r0)} / {fmt_rate(r1)}: time, memory")
    for name in names:
      a, b = tables[r0][name], tables[r1][name]
      print(f"  {name:<28} {a['seconds'] / b['seconds']:6.2f} {a['peak'] / max(b['peak'], 1):6.2f}")


def _fmt_opt(d: dict, r: float) -> str:
  v = d.get(int(r)) if float(r).is_integer() else None
  return "-" if v is None else f"{v:.2f}"


def main(argv=None, config=None) -> dict:
  """Runs the benchmark and prints the table; returns per-rate ratios and measurements."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
  ap.add_argument("--rates", default=None, help="subsampling rates (default 1,2,4,8,16)")
  ap.add_argument("--batch", type=int, default=None, help="images per step (default 8; quick 2)")
  ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5)")
  ap.add_argument(
      "--breakdown", default="", help="rates at which to time the step's parts, e.g. 1,8"
  )
  args = ap.parse_args(argv)
  rates_arg = args.rates or ("1,2" if args.quick else "1,2,4,8,16")
  rates = sorted({float(r) for r in rates_arg.split(",") if r.strip()} | {1.0})
  repeats = args.repeats or (1 if args.quick else 5)
  config = bench_config(args.quick) if config is None else config
  s = config.infty_diff
  batch_size = int(args.batch or s.batch_size)
  n = int(s.image_size)
  common.header("∞-Diff subsampling (train step time and memory vs points per image)")
  u = s.net.unet
  print(
      f"data {n}^2, inner grid {s.net.grid_size}^2, batch {batch_size}, nf {s.net.nf} x "
      f"{s.net.num_blocks} sparse blocks (k {s.net.kernel_size}), grid ch "
      f"{s.net.grid_channels}, UNet ch {u.ch} x {tuple(u.channel_mult)} "
      f"attn {tuple(u.attention_resolutions)}, z_dim {s.z_dim}"
      + (" (encoder on)" if s.z_dim else ""),
      flush=True,
  )
  batch = random_batch(config, batch_size)

  benches = {}
  bd_rates = [float(r) for r in args.breakdown.split(",") if r.strip()]
  with tempfile.TemporaryDirectory() as tmp:
    for r in rates:
      benches[r] = RateBench(config, r, batch, tmp)
      print(
          f"  compiled {fmt_rate(r)}: {benches[r].method.points} points/image, "
          f"peak {common.fmt_bytes(benches[r].memory['peak'])}",
          flush=True,
      )
    for i in range(repeats):  # rounds: one step of every rate each
      for r in rates:
        benches[r].time_step(warmup=1 if i == 0 else 0)
    tables = {}
    for j, r in enumerate(bd_rates):
      rb = benches.get(r) or RateBench(config, r, batch, tmp)
      tables[r] = breakdown(rb, repeats=max(repeats, 3) if not args.quick else 1, unet=j == 0)
      if j > 0:  # the inner UNet is the same at every rate: measured once
        tables[r] = {
            k: tables[bd_rates[0]][k] if "UNet" in k else v
            for k, v in {**tables[bd_rates[0]], **tables[r]}.items()
        }

  ref = benches[1.0]
  load = os.getloadavg()
  print(
      f"\nstep time: median of {repeats} rounds, every rate timed once per round; peak memory"
      " = temp + arguments + outputs - aliased of the compiled step (XLA buffer assignment)"
  )
  print(
      "paper (data 128 / inner 32): T5 = memory reduction at fixed batch 16; T4 = speed-up at"
      " a fixed 10 GB budget, relative to 2x; T3 = fixed-batch speed-up, FFHQ-128"
  )
  print(
      f"{'rate':>5} {'points':>7} {'ms/step':>9} {'speedup':>8} {'T3':>5} {'T4':>5} "
      f"{'GFLOP':>7} {'peak MiB':>9} {'temp MiB':>9} {'mem red.':>8} {'T5':>5}  target"
  )
  out = {
      "speedup": {},
      "memory_reduction": {},
      "seconds": {},
      "peak_bytes": {},
      "points": {},
      "flops": {},
  }
  for r in rates:
    rb = benches[r]
    sp = ref.seconds / rb.seconds
    mr = ref.memory["peak"] / rb.memory["peak"]
    key = int(r) if float(r).is_integer() else r
    out["speedup"][key] = sp
    out["memory_reduction"][key] = mr
    out["seconds"][key] = rb.seconds
    out["peak_bytes"][key] = rb.memory["peak"]
    out["points"][key] = rb.method.points
    out["flops"][key] = rb.flops
    verdict = []
    paper_mem = PAPER_MEMORY.get(key)
    if paper_mem is not None:
      verdict.append(f"mem >= {paper_mem}: {'met' if mr >= paper_mem else 'MISSED'}")
    if key == 8:
      verdict.append(
          f"speedup >= {TARGET_SPEEDUP_8X}: {'met' if sp >= TARGET_SPEEDUP_8X else 'MISSED'}"
      )
    print(
        f"{fmt_rate(r):>5} {rb.method.points:7d} {rb.seconds * 1e3:9.1f} {sp:8.2f} "
        f"{_fmt_opt(PAPER_BATCH_SPEEDUP, r):>5} {_fmt_opt(PAPER_BUDGET_SPEEDUP, r):>5} "
        f"{rb.flops / 1e9:7.2f} {rb.memory['peak'] / 2**20:9.1f} "
        f"{rb.memory['temp'] / 2**20:9.1f} {mr:8.2f} {_fmt_opt(PAPER_MEMORY, r):>5}  "
        + "; ".join(verdict)
    )
  print(
      f"state + batch (arguments, the same at every rate): "
      f"{ref.memory['args'] / 2**20:.1f} MiB; load average {load[0]:.2f} {load[1]:.2f} "
      f"{load[2]:.2f} on {os.cpu_count()} cores"
  )
  if tables:
    print_breakdown(tables)
    out["breakdown"] = tables
  final = 8.0 if 8.0 in rates else max(rates)
  fk = int(final) if float(final).is_integer() else final
  sp, mr = out["speedup"][fk], out["memory_reduction"][fk]
  assert math.isfinite(sp) and math.isfinite(mr)
  print(f"subsampling {fmt_rate(final)}: speedup={sp:.2f} memory_reduction={mr:.2f}", flush=True)
  return out


if __name__ == "__main__":
  main()
