"""Train-step efficiency: achieved FLOP/s of the real jitted steps vs a plain matmul.

For the stage-1 and stage-2 steps of configs/rapd.py:demo (the step the trainer runs:
infdiff.train.make_train_step under jit with a donated state) this prints

  efficiency = (XLA cost-analysis FLOPs of the step / median step time)
               / (FLOP/s of a float32 1024^3 jnp.dot timed the same way)

next to the same ratio for a plain Flax pre-LN transformer step (Adam), the reference
for what a dense model reaches on this machine. Targets: stage 2 >= 0.45, stage 1 >= 0.35.

`dit_ref` is the stage-2 step with its DiT at the reference transformer's shape (width
256, 4 blocks, 4 heads, 256 image tokens: the demo's 32^2 latent at patch 2, batch 8):
its ratio over the reference's, target >= 0.9, bounds what the trainer adds around the
model (optimizer, EMA, non-finite skip, metrics) plus the DiT's own extras (AdaLN, text
cross-attention, QK-norm, RoPE).

Usage: python -m benchmarks.step_efficiency [--quick] [--stages stage1] [--distill]

--distill turns stage 1's semantic distillation on (RaPD Eq. 9, the adaptive-weight path)
against a tiny random DINOv2 teacher written to a temporary directory: the teacher's own
cost is negligible, so the step time is that of the student's loss and its w_ada.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common

TARGETS = {"stage1": 0.35, "stage2": 0.45}
DIT_REF_TARGET = 0.9  # dit_ref ratio / reference ratio


class _RefBlock(nn.Module):
  width: int = 256  # model width
  heads: int = 4  # attention heads
  mlp: int = 1024  # FFN hidden width

  @nn.compact
  def __call__(self, x):
    h = nn.SelfAttention(self.heads)(nn.LayerNorm()(x))
    x = x + h
    h = nn.Dense(self.width)(nn.gelu(nn.Dense(self.mlp)(nn.LayerNorm()(x))))
    return x + h


class RefTransformer(nn.Module):
  """A plain pre-LN transformer: the reference a dense model reaches on this CPU."""

  width: int = 256  # model width
  depth: int = 4  # blocks
  heads: int = 4  # attention heads
  mlp: int = 1024  # FFN hidden width

  @nn.compact
  def __call__(self, x):  # [B, L, width]
    for _ in range(self.depth):
      x = _RefBlock(self.width, self.heads, self.mlp)(x)
    return nn.Dense(self.width)(nn.LayerNorm()(x))


def reference_step(batch=8, length=256, width=256, depth=4):
  """(jitted step, state, inputs) of the reference transformer with Adam."""
  model = RefTransformer(width, depth)
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, length, width), jnp.float32)
  y = jax.random.normal(jax.random.PRNGKey(1), (batch, length, width), jnp.float32)
  params = model.init(jax.random.PRNGKey(2), x)["params"]
  tx = optax.adam(1e-4)

  def step(state, x, y):
    params, opt = state

    def loss_fn(p):
      return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return (optax.apply_updates(params, updates), opt), loss

  return jax.jit(step, donate_argnums=(0,)), (params, tx.init(params)), (x, y)


def reference_bench(steps: int, **kw):
  """(run, FLOPs of `steps` steps) of the reference transformer."""
  step, state, (x, y) = reference_step(**kw)
  flops = common.compiled_flops(step, state, x, y)
  holder = [state]

  def run():
    for _ in range(steps):
      holder[0], loss = step(holder[0], x, y)
    jax.block_until_ready((holder[0], loss))

  return run, flops * steps


def main(argv=None, config=None) -> dict:
  """Runs the benchmark and prints one table; returns {name: efficiency ratio}."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="fewer repeats, tiny reference (smoke test)")
  ap.add_argument("--stages", default="stage1,stage2,dit_ref", help="train steps to measure")
  ap.add_argument(
      "--distill", action="store_true", help="stage 1 with distillation (tiny random teacher)"
  )
  args = ap.parse_args(argv)
  stages = args.stages.split(",")
  steps, repeats = (1, 2) if args.quick else (3, 5)
  common.header("step efficiency (achieved FLOP/s of a train step / matmul FLOP/s)")

  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    if args.distill:
      from infdiff.pretrained import testing

      config = common.load_config("demo") if config is None else config
      config.rapd_stage1.distill.weight = 0.1  # w_hyper (Table 5)
      config.rapd_stage1.distill.teacher_path = testing.write_tiny_dinov2(
          os.path.join(tmp, "dinov2")
      )
    config, s1, m2 = common.demo_runs(tmp, config, stage1_step="stage1" in stages)
    c1, c2 = config.rapd_stage1, config.rapd_stage2
    s2 = common.StepBench(m2, config, common.stage2_batch(m2)) if "stage2" in stages else None
    sref = None
    if "dit_ref" in stages:
      cref = config.copy_and_resolve_references()
      width, depth = (32, 1) if args.quick else (256, 4)
      cref.rapd_stage2.dit.update(
          patch=2, width=width, depth=depth, heads=4, bottleneck=width, repa_block=1
      )
      cref.rapd_stage2.batch_size = 2 if args.quick else 8
      mref = common.stage2_method(cref, tmp)
      sref = common.StepBench(mref, cref, common.stage2_batch(mref))
    for name, bench, what in (
        (
            "stage1",
            s1,
            f"EDSR+CQAR{c1.renderer.dim} r={c1.enc_size} P={c1.target_window} "
            f"B={c1.batch_size}" + (" +distill" if c1.distill.weight > 0 else ""),
        ),
        (
            "stage2",
            s2,
            f"DiT p{c2.dit.patch} w{c2.dit.width} d{c2.dit.depth} "
            f"on {c1.enc_size}^2x{c1.encoder.latent_channels} B={c2.batch_size}",
        ),
        ("dit_ref", sref, "DiT p2 w256 d4 on 32^2 (256 tokens) B=8"),
    ):
      if bench is not None:
        flops = bench.flops()
        r = common.paired_rate(lambda b=bench: b.run(steps), flops * steps, repeats)
        rows.append((name, what, flops, r))
    ref = dict(batch=8, length=256, width=256, depth=4)
    if args.quick:
      ref = dict(batch=2, length=16, width=32, depth=1)
    run, flops = reference_bench(steps, **ref)
    r = common.paired_rate(run, flops, repeats)
    rows.append(
        (
            "reference",
            "Flax transformer w{width} d{depth} L{length} B{batch}".format(**ref),
            flops / steps,
            r,
        )
    )

  print(
      "ratio = (XLA FLOPs per step / median step time) / (float32 1024^3 matmul FLOP/s), "
      f"matmul timed before each of {repeats} repeats of {steps} steps"
  )
  print(
      f"{'step':<10} {'what':<42} {'GFLOP':>8} {'ms/step':>9} {'GFLOP/s':>8} {'mm GFLOP/s':>10} "
      f"{'ratio':>6}  target"
  )
  out = {}
  ref_ratio = rows[-1][3]["ratio"]
  for name, what, flops, r in rows:
    out[name] = r["ratio"]
    tgt = TARGETS.get(name)
    verdict = "" if tgt is None else f">= {tgt}: {'met' if r['ratio'] >= tgt else 'MISSED'}"
    if name == "dit_ref":
      rel = r["ratio"] / ref_ratio
      out["dit_ref/reference"] = rel
      verdict = f"{rel:.2f} of reference, >= {DIT_REF_TARGET}: " + (
          "met" if rel >= DIT_REF_TARGET else "MISSED"
      )
    print(
        f"{name:<10} {what:<42} {flops / 1e9:8.3f} {r['seconds'] / steps * 1e3:9.1f} "
        f"{r['rate'] / 1e9:8.1f} {r['mm_rate'] / 1e9:10.1f} {r['ratio']:6.2f}  {verdict}"
    )
  return out


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
