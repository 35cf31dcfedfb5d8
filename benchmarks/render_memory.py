"""Peak resident memory of tiled rendering at 1024^2, 2048^2 and 4096^2.

Each measurement runs in a fresh subprocess that imports jax, builds the renderer and
its (freshly initialised) parameters, renders one latent with
`infdiff.render.render_image` into a preallocated float32 output, and reports its peak
RSS (VmHWM). A baseline subprocess does everything but the render (imports, model,
parameters, the output array not included), so the ratio shows what rendering adds.
Target: peak RSS at 4096^2 <= 3 GiB with the demo renderer.

The paper-size CQAR (dim 256, 4 blocks, latent 256^2 x 16, tile 512) is measured at
1024^2 on its top-left tile only (`--paper_tiles 1`, the default; 0 renders all four):
the peak of tiled rendering is set by one tile's activations plus the output, and the
full render takes minutes on a CPU.

Usage: python -m benchmarks.render_memory [--quick] [--sizes 1024,2048,4096]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TARGET_GIB = 3.0


def _peak_rss_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  import resource

  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _renderer(kind: str):
  """(module, latent shape, tile) of the demo or paper-size CQAR from configs/rapd.py."""
  from benchmarks import common
  from infdiff.models.renderers import make_renderer

  c = common.load_config("demo" if kind == "demo" else None)
  s1, s2 = c.rapd_stage1, c.rapd_stage2
  kw = s1.renderer.to_dict()
  module = make_renderer(kw.pop("name"), **kw)  # float32 compute on CPU
  latent = (1, s1.enc_size, s1.enc_size, s1.encoder.latent_channels)
  return module, latent, int(s2.sample.tile)


def child(kind: str, size: int, tiles: int) -> dict:
  """Runs in the subprocess: build, (render), report peak RSS and render seconds."""
  import jax
  import numpy as np

  from infdiff import fields
  from infdiff import render as render_lib

  module, latent_shape, tile = _renderer(kind)
  latent = jax.random.normal(jax.random.PRNGKey(0), latent_shape, jax.numpy.float32)
  q = jax.numpy.asarray(fields.coord_grid(8, 8))[None]
  cells = jax.numpy.asarray(fields.cell_size(8, 8))[None]
  variables = jax.jit(module.init)(jax.random.PRNGKey(1), latent, q, cells)
  jax.block_until_ready(variables)
  result = {"kind": kind, "size": size, "tile": tile, "rss_bytes": 0, "seconds": 0.0}
  if size:
    fn = render_lib.RendererFn(module)
    crop = None
    if tiles and tiles * tile < size:  # the top-left tiles x tiles block only
      crop = (0, 0, tiles * tile, tiles * tile)
    h, w = (size, size) if crop is None else crop[2:]
    out = np.zeros((1, h, w, 3), np.float32)  # [1, H, W, 3]
    t0 = time.perf_counter()
    render_lib.render_image(fn, variables, latent, size, size, tile=tile, crop=crop, out=out)
    result["seconds"] = time.perf_counter() - t0
    result["rendered"] = f"{h}x{w}"
    result["out_bytes"] = out.nbytes
  result["rss_bytes"] = _peak_rss_bytes()
  return result


def _run_child(kind: str, size: int, tiles: int = 0) -> dict:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, as sampling runs
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "benchmarks.render_memory", "--child", kind, str(size), str(tiles)]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"render_memory child {kind} {size} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
  """Runs the subprocesses and prints the table; returns {size: peak RSS bytes}."""
  from benchmarks import common

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
  ap.add_argument("--sizes", default="1024,2048,4096", help="output sides, comma-separated")
  ap.add_argument("--paper", type=int, default=1024, help="paper-size CQAR side; 0 = skip")
  ap.add_argument(
      "--paper_tiles", type=int, default=1, help="render the top-left k x k paper tiles; 0 = all"
  )
  ap.add_argument("--child", nargs=3, metavar=("KIND", "SIZE", "TILES"), help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    kind, size, tiles = args.child
    print(json.dumps(child(kind, int(size), int(tiles))))
    return {}

  sizes = [256, 512] if args.quick else [int(s) for s in args.sizes.split(",")]
  common.header("peak RSS of tiled rendering (fresh subprocess per size)")
  base = _run_child("demo", 0)
  rows = [(f"demo {s}^2", _run_child("demo", s), base) for s in sizes]
  if args.paper and not args.quick:
    pbase = _run_child("paper", 0)
    rows.append((f"paper {args.paper}^2", _run_child("paper", args.paper, args.paper_tiles), pbase))
  print(
      f"{'render':<16} {'tile':>5} {'output':>9} {'peak RSS':>10} {'baseline':>10} "
      f"{'ratio':>6} {'seconds':>8}"
  )
  out = {}
  for name, r, b in rows:
    note = ""
    if r.get("rendered", "") != f"{r['size']}x{r['size']}":
      note = f"  (only the top-left {r['rendered']} tile block of the {r['size']}^2 render)"
    print(
        f"{name:<16} {r['tile']:>5} {common.fmt_bytes(r['out_bytes']):>9} "
        f"{common.fmt_bytes(r['rss_bytes']):>10} {common.fmt_bytes(b['rss_bytes']):>10} "
        f"{r['rss_bytes'] / b['rss_bytes']:6.2f} {r['seconds']:8.1f}{note}"
    )
    out[name] = r["rss_bytes"]
  big = f"demo {max(sizes)}^2"
  gib = out[big] / 2**30
  print(f"peak RSS at {max(sizes)}^2 (demo): {gib:.2f} GiB (target <= {TARGET_GIB} GiB at 4096^2)")
  return out


if __name__ == "__main__":
  main()
