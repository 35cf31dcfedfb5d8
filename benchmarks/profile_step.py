"""Per-op profile of the stage-2 (DiT) and stage-1 (EDSR + CQAR) demo train steps.

Runs a few steps of the real jitted train step (the one `step_efficiency.py` times) under
`jax.profiler.trace`, reads the XSpace the profiler writes with `jax.profiler.ProfileData`
(part of jaxlib, nothing extra to install) and sums the self time of every XLA:CPU thunk
event (each carries the `hlo_op` it executes). Each op is matched to the optimised HLO of
the same compiled step (`.lower().compile().as_text()`) to find

  kind   dot / conv (a bare dot or convolution), fusion(dot) (a fusion containing one),
         elementwise, reduce, copy/transpose, or the HLO opcode otherwise;
  phase  forward / backward / optimizer, from the op's `metadata={op_name=...}`:
         `transpose(jvp(...))` is the backward pass, `jvp(...)` the forward pass, anything
         else (optax update, EMA, non-finite select) counts as optimizer;
  FLOPs  of its dots and convolutions (2 * MACs from the shapes), so a dot op's achieved
         FLOP/s can be set against a float32 1024^3 `jnp.dot` timed in the same run.

Times are self times (a thunk's nested thunks are subtracted) per step; XLA:CPU may run
independent thunks concurrently on its thread pool, so the shares are of the summed op
time, and the traced wall time per step is printed next to them. Convolution thunks run
asynchronously (their events may end before the work does), so no rate is given for them.
For reference each stage also times the loss forward alone (jit, no gradient).

Usage: python -m benchmarks.profile_step [--stages stage2,stage1] [--steps 3] [--top 15]
"""

from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import re
import tempfile
import time

import flax.linen as nn
import jax
from jax.profiler import ProfileData

from benchmarks import common

_CONTAINS_DOT = ("dot", "convolution")
_MOVES = {
    "copy",
    "transpose",
    "bitcast",
    "reshape",
    "parameter",
    "constant",
    "broadcast",
    "slice",
    "dynamic-slice",
    "dynamic-update-slice",
    "concatenate",
    "pad",
    "tuple",
    "get-tuple-element",
    "iota",
    "bitcast-convert",
    "convert",
    "reverse",
    "gather",
    "scatter",
}


# ---------------------------------------------------------------------------- HLO text


class Instr:
  __slots__ = ("name", "shape", "opcode", "operands", "attrs", "calls", "op_name")

  def __init__(self, name, shape, opcode, operands, attrs):
    self.name, self.shape, self.opcode = name, shape, opcode
    self.operands, self.attrs = operands, attrs
    self.calls = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", attrs)
    for group in re.findall(r"branch_computations=\{([^}]*)\}", attrs):
      self.calls += [c.strip().lstrip("%") for c in group.split(",")]
    m = re.search(r'op_name="([^"]*)"', attrs)
    self.op_name = m.group(1) if m else ""


def _matching(s: str, i: int) -> int:
  """Index just past the bracket that closes s[i]."""
  pairs = {"(": ")", "[": "]", "{": "}"}
  depth, open_c, close_c = 0, s[i], pairs[s[i]]
  for j in range(i, len(s)):
    if s[j] == open_c:
      depth += 1
    elif s[j] == close_c:
      depth -= 1
      if depth == 0:
        return j + 1
  return len(s)


def parse_hlo(text: str):
  """(module name, {computation: [Instr]}, {instr name: Instr}) of optimised HLO text."""
  module = re.match(r"HloModule\s+([\w.\-]+)", text).group(1)
  comps, by_name, cur = {}, {}, None
  for line in text.splitlines():
    s = line.strip()
    if s.endswith("{") and " = " not in s.split("(")[0] and not s.startswith("HloModule"):
      cur = s.removeprefix("ENTRY ").split()[0].lstrip("%")
      comps[cur] = []
      continue
    if cur is None or " = " not in s:
      continue
    lhs, rhs = s.removeprefix("ROOT ").split(" = ", 1)
    name = lhs.strip().lstrip("%")
    if rhs.startswith("("):  # tuple shape
      end = _matching(rhs, 0)
    else:
      end = rhs.find(" ")
    shape, rest = rhs[:end], rhs[end:].strip()
    m = re.match(r"([\w\-]+)\(", rest)
    if not m:
      continue
    p = m.end() - 1
    close = _matching(rest, p)
    operands = re.findall(r"%([\w.\-]+)", rest[p:close])
    ins = Instr(name, shape, m.group(1), operands, rest[close:])
    comps[cur].append(ins)
    by_name[name] = ins
  return module, comps, by_name


def _dims(shape: str) -> list[int]:
  m = re.match(r"\w+\[([\d,]*)\]", shape)
  if not m or not m.group(1):
    return []
  return [int(d) for d in m.group(1).split(",")]


_DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}


def _bytes(ins: Instr) -> float:
  """Bytes of the op's output(s)."""
  return float(
      sum(
          _DTYPE_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
          for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", ins.shape)
      )
  )


def _dot_flops(ins: Instr, by_name) -> float:
  out = math.prod(_dims(ins.shape))
  if ins.opcode == "dot":
    lhs = _dims(by_name[ins.operands[0]].shape)
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
    idx = [int(i) for i in m.group(1).split(",")] if m and m.group(1) else []
    return 2.0 * out * math.prod(lhs[i] for i in idx)
  if ins.opcode == "convolution":
    kernel = _dims(by_name[ins.operands[1]].shape)
    labels = re.search(r"dim_labels=\w+_(\w+)->", ins.attrs).group(1)
    return 2.0 * out * math.prod(kernel) / kernel[labels.index("o")]
  return 0.0


def _inner(ins: Instr, comps, seen=None) -> list[Instr]:
  """The instructions of every computation `ins` calls, recursively."""
  seen = set() if seen is None else seen
  out = []
  for c in ins.calls:
    if c in seen or c not in comps:
      continue
    seen.add(c)
    for sub in comps[c]:
      out.append(sub)
      out += _inner(sub, comps, seen)
  return out


def _phase(op_name: str) -> str:
  if not op_name:
    return "unlabelled"
  if "transpose(" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "optimizer"


def describe(ins: Instr, comps, by_name) -> dict:
  """kind, phase, FLOPs of dots/convs and an op_name sample of a top-level HLO op."""
  # Only fusions are timed as one event; while/call/conditional bodies run as their own
  # thunks (profiled separately), so their work is not attributed to the caller.
  inner = _inner(ins, comps) if ins.opcode == "fusion" else []
  allops = [ins] + inner
  dots = [i for i in allops if i.opcode in _CONTAINS_DOT]
  flops = sum(_dot_flops(d, by_name) for d in dots)
  opcodes = {i.opcode for i in inner}
  if ins.opcode in _CONTAINS_DOT:
    kind = "dot" if ins.opcode == "dot" else "conv"
  elif dots:
    kind = "fusion(" + "+".join(sorted({d.opcode[:4] for d in dots})) + ")"
  elif ins.opcode == "fusion" and opcodes & {"reduce", "reduce-window"}:
    kind = "reduce"
  elif ins.opcode == "fusion" and opcodes <= _MOVES:
    kind = "copy/transpose"
  elif ins.opcode == "fusion":
    kind = "elementwise"
  elif ins.opcode in ("copy", "transpose"):
    kind = "copy/transpose"
  else:
    kind = ins.opcode
  # Phase: the dots' metadata for dot ops; else the op's own metadata (or its root's).
  names = [d.op_name for d in dots if d.op_name] or [ins.op_name]
  if not names[0]:
    names = [i.op_name for i in inner if i.op_name] or [""]
  phases = collections.Counter(_phase(n) for n in names)
  phase = phases.most_common(1)[0][0]
  if len(phases) > 1:
    phase = "+".join(sorted(phases))
  m = re.search(r"jvp\(([\w.]+)\)", names[0])
  model = m.group(1) if m else "(outside the loss)" if names[0] else "(no metadata)"
  return dict(
      kind=kind, phase=phase, flops=flops, op_name=names[0], model=model, mb=_bytes(ins) / 2**20
  )


# ------------------------------------------------------------------------- profile


def op_self_times(xspace_path: str, module: str) -> dict:
  """({hlo_op: summed self time in ns}, {hlo_op: calls}) over all threads, for `module`."""
  pd = ProfileData.from_file(xspace_path)
  totals = collections.defaultdict(float)
  calls = collections.Counter()
  for plane in pd.planes:
    for line in plane.lines:
      evs = []
      for e in line.events:
        st = dict(e.stats)
        if st.get("hlo_module") == module and "hlo_op" in st:
          evs.append((e.start_ns, e.end_ns, st["hlo_op"]))
      evs.sort(key=lambda t: (t[0], -t[1]))
      stack = []  # [end, name, self]
      for start, end, name in evs:
        while stack and stack[-1][0] <= start:
          top = stack.pop()
          totals[top[1]] += top[2]
        if stack:
          stack[-1][2] -= min(end, stack[-1][0]) - start
        stack.append([end, name, end - start])
        calls[name] += 1
      for top in stack:
        totals[top[1]] += top[2]
  return totals, calls


def profile_bench(bench, steps: int, trace_dir: str) -> tuple[dict, float, float]:
  """(op self times per step in s, wall s/step untraced, wall s/step traced)."""
  bench.run(1)  # warm
  untraced = common.median_time(lambda: bench.run(steps), repeats=3, warmup=0) / steps
  with jax.profiler.trace(trace_dir):
    t0 = time.perf_counter()
    bench.run(steps)
    traced = (time.perf_counter() - t0) / steps
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  return files[-1], untraced, traced


def report(name, what, bench, steps, top, trace_dir, mm_rate, fwd=None) -> dict:
  with bench.mesh, nn.logical_axis_rules(bench.rules):
    compiled = bench.step.lower(bench.state, bench.batch, bench.aux).compile()
  module, comps, by_name = parse_hlo(compiled.as_text())
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  step_flops = float(cost["flops"])
  xspace, untraced, traced = profile_bench(bench, steps, trace_dir)
  ns, calls = op_self_times(xspace, module)
  times = {k: v * 1e-9 / steps for k, v in ns.items()}
  total = sum(times.values())
  rows = []
  for op, sec in times.items():
    d = describe(by_name[op], comps, by_name) if op in by_name else None
    d = d or dict(kind="?", phase="?", flops=0.0, op_name="", model="?", mb=0.0)
    rows.append(dict(op=op, sec=sec, per_call=sec * steps / calls[op], **d))
  rows.sort(key=lambda r: -r["sec"])

  print(f"\n--- {name}: {what} ---")
  print(
      f"step: {step_flops / 1e9:.3f} GFLOP (XLA cost analysis), {untraced * 1e3:.1f} ms/step "
      f"untraced ({step_flops / untraced / mm_rate:.2f} of matmul FLOP/s), "
      f"{traced * 1e3:.1f} ms/step traced; {len(times)} distinct ops, summed op self time "
      f"{total * 1e3:.1f} ms/step ({total / traced:.2f}x traced wall), "
      f"{sum(calls.values()) / steps:.0f} op executions per step"
  )
  dot_flops = sum(r["flops"] for r in rows)
  conv = [r for r in rows if r["kind"] == "conv"]
  conv_flops, conv_sec = sum(r["flops"] for r in conv), sum(r["sec"] for r in conv)
  dot_sec = sum(r["sec"] for r in rows if r["flops"] and r["kind"] != "conv")
  print(
      f"dot/conv FLOPs {dot_flops / 1e9:.3f} GFLOP/step ({dot_flops / step_flops:.0%} of the "
      f"step's); ops holding dots take {dot_sec * 1e3:.1f} ms/step ({dot_sec / total:.0%} of "
      f"op time) at {(dot_flops - conv_flops) / max(dot_sec, 1e-12) / mm_rate:.2f} of matmul "
      f"FLOP/s; convolutions ({conv_flops / 1e9:.3f} GFLOP, {conv_sec * 1e3:.1f} ms of events) "
      "run asynchronously on XLA:CPU's Eigen pool, so their events can end before their work "
      "does (some imply impossible rates): no conv rate is given"
  )
  print(
      f"{'#':>3} {'hlo op':<32} {'ms/step':>8} {'share':>6} {'phase':<10} {'kind':<15} "
      f"{'GFLOP':>7} {'vs mm':>6} {'MB out':>7}  op_name"
  )
  for i, r in enumerate(rows[:top]):
    eff = f"{r['flops'] / r['sec'] / mm_rate:6.2f}" if r["flops"] and r["sec"] > 0 else " " * 6
    eff = " async" if r["kind"] == "conv" else eff
    gf = f"{r['flops'] / 1e9:7.3f}" if r["flops"] else " " * 7
    on = r["op_name"]
    on = on if len(on) <= 70 else "..." + on[-67:]
    print(
        f"{i + 1:>3} {r['op'][:32]:<32} {r['sec'] * 1e3:8.2f} {r['sec'] / total:6.1%} "
        f"{r['phase'][:10]:<10} {r['kind'][:15]:<15} {gf} {eff} {r['mb']:7.1f}  {on}"
    )
  for r in rows:
    us = r["per_call"] * 1e6
    r["size"] = (
        next(
            f"{lo}"
            for lo, hi in (("a: < 20 us", 20), ("b: 20-100 us", 100), ("c: 0.1-1 ms", 1e3))
            if us < hi
        )
        if us < 1e3
        else "d: >= 1 ms"
    )
  for label, key in (
      ("by phase", "phase"),
      ("by kind", "kind"),
      ("by model (jvp scope of the op's metadata)", "model"),
      ("by time per execution", "size"),
  ):
    groups = collections.defaultdict(lambda: [0.0, 0.0, 0, 0.0, 0.0])
    for r in rows:
      g = groups[r[key]]
      g[0] += r["sec"]
      g[1] += r["flops"]
      g[2] += 1
      if r["flops"] and r["kind"] != "conv":  # conv thunks are asynchronous, see above
        g[3] += r["sec"]
        g[4] += r["flops"]
    print(f"{label}:")
    for k, (sec, fl, n, dsec, dfl) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
      eff = ""
      if dfl and dsec:
        eff = f"; dot ops {dsec * 1e3:.1f} ms at {dfl / dsec / mm_rate:.2f} of matmul FLOP/s"
      print(
          f"  {k:<26} {sec * 1e3:8.2f} ms/step {sec / total:6.1%}  ({n} ops, "
          f"{fl / 1e9:.3f} dot/conv GFLOP{eff})"
      )
  if fwd is not None:
    fsec, fflops = fwd
    fw = sum(r["sec"] for r in rows if r["phase"] == "forward")
    print(
        f"the loss forward alone (jit, no grad): {fsec * 1e3:.1f} ms, {fflops / 1e9:.3f} GFLOP "
        f"({fflops / fsec / mm_rate:.2f} of matmul FLOP/s); the step is "
        f"{untraced / fsec:.1f}x its time for {step_flops / fflops:.1f}x its FLOPs; ops "
        f"labelled forward inside the step take {fw * 1e3:.1f} ms/step"
    )
  return dict(rows=rows, total=total, traced=traced, untraced=untraced)


def forward_alone(method, bench) -> tuple[float, float]:
  """(median seconds, XLA FLOPs) of the step's losses evaluated without gradients."""

  def losses(state, batch, aux):
    rng = jax.random.fold_in(state.rng, state.step)
    params = dict(state.params)
    out = 0.0
    for i, g in enumerate(method.groups):
      loss, _ = method.loss(g, params, aux, batch, jax.random.fold_in(rng, i), state.step)
      out = out + loss
    return out

  with bench.mesh, nn.logical_axis_rules(bench.rules):
    f = jax.jit(losses)
    flops = common.compiled_flops(f, bench.state, bench.batch, bench.aux)
    sec = common.median_time(
        lambda: jax.block_until_ready(f(bench.state, bench.batch, bench.aux)), repeats=5
    )
  return sec, flops


def main(argv=None, config=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--stages", default="stage2,stage1", help="train steps to profile")
  ap.add_argument("--steps", type=int, default=3, help="traced steps per stage")
  ap.add_argument("--top", type=int, default=15, help="ops listed per stage")
  args = ap.parse_args(argv)
  stages = args.stages.split(",")
  common.header("per-op profile of the demo train steps (jax.profiler trace, XLA:CPU thunks)")
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    config, s1, m2 = common.demo_runs(tmp, config, stage1_step="stage1" in stages)
    c1, c2 = config.rapd_stage1, config.rapd_stage2
    s2 = common.StepBench(m2, config, common.stage2_batch(m2)) if "stage2" in stages else None
    mm, mm_flops = common.matmul_bench()
    m1 = common.stage1_method(config, tmp)
    benches = {
        "stage2": (
            s2,
            m2,
            f"DiT p{c2.dit.patch} w{c2.dit.width} d{c2.dit.depth} on "
            f"{c1.enc_size}^2x{c1.encoder.latent_channels} B={c2.batch_size}",
        ),
        "stage1": (
            s1,
            m1,
            f"EDSR+CQAR{c1.renderer.dim} r={c1.enc_size} P={c1.target_window} "
            f"B={c1.batch_size}",
        ),
    }
    for name in stages:
      bench, method, what = benches[name]
      fwd = forward_alone(method, bench)
      mm_rate = mm_flops / common.median_time(mm, repeats=5, warmup=1)
      print(f"\nmatmul (float32 1024^3 jnp.dot) before {name}: {mm_rate / 1e9:.1f} GFLOP/s")
      out[name] = report(
          name, what, bench, args.steps, args.top, os.path.join(tmp, f"trace_{name}"), mm_rate, fwd
      )
  return out


if __name__ == "__main__":
  main()
