"""Paper-scale train steps, lowered and compiled (never run) on a simulated CPU mesh.

For each method's paper-scale stage (configs/<method>.py without the demo preset) this
builds the trainer's own step, as `infdiff.train._train_stage` does: the abstract state of
`train.build_state(..., materialize=False)` with its logical-axis shardings,
`train.make_train_step` under `jax.jit` with the state, batch and frozen-input (aux)
shardings and the state donated. It lowers and compiles the step for meshes of simulated
CPU devices on `jax.ShapeDtypeStruct` inputs only (nothing is allocated or run) and prints
per (stage, device count):

  params      trainable parameters (`frozen`: the frozen networks and statistics in aux)
  GFLOP       FLOPs of one step over all devices: XLA's cost analysis of the compiled SPMD
              program counts ONE device's partition (measured at start-up: a matmul split
              over 8 devices reports 1/8 of the 1-device count), so this is that times the
              device count, replicated work included
  args/out/temp  GiB per device from `compiled.memory_analysis()`; peak = args + out +
              temp - aliased (the donated state's outputs reuse its buffers)
  80/95       whether the peak fits an 80 GB (H100) / 95 GB (TPU v5p) device, decimal GB
  s/step, days  projected step time = per-device FLOPs / (peak x MFU) at MFU 0.4 and the
              dense bf16 peaks of H100 SXM (989 TFLOP/s) and TPU v5p (459 TFLOP/s), and
              days for the stage's steps (`train.stage_steps` of the paper config)

Mesh: (data 1, fsdp F, tensor N / F) with F = gcd(global batch, N): the batch is split over
fsdp (the trainer needs the batch to divide the data-parallel devices), so fsdp spans all N
devices when the paper's batch allows and the rest go to the tensor axis otherwise (which
shards what the config's logical rules put there: heads, MLP, vocabulary).

Inputs. The per-example batch shapes come from the stage's real data transform run on one
record of the built-in `shapes` source (`train.example_batch`; the paper configs' folders
do not exist here), with the paper's global batch (`<stage>.batch_size`) put in front.
Frozen pretrained networks (Qwen3-1.7B, DINOv2 ViT-B/14, VGG16-LPIPS, the SD1.5 VAE) are
built from their published config.json written to a temporary directory, under
`infdiff.pretrained.abstract()`; an earlier stage (RaPD stage 1 under stage 2, INFD's
autoencoder under its latent DDPM, ...) is a run directory holding only config.json and
latent_stats.json, read under `infdiff.runs.abstract()`. Compute dtypes are the configs'.

Default: the seven main stages (both RaPD stages, INFD's autoencoder and latent DDPM,
∞-Diff's main stage, Patch-DM's main stage, InfGen's decoder) on 8 devices, where every
paper batch splits over fsdp = all devices; two worker processes compile stages in
parallel. About 4.5 minutes on an idle 2-core CPU, mostly compiling (266 s measured,
benchmarks/README.md). `--devices 8,64` adds the 64-device meshes (about twice as long),
`--stages` picks stages (also infty_diff_latent, the DiffAE latent MLP), and `--set
field=value` overrides a config field (e.g. rapd_stage2.dit.remat=False) to price a change.

Usage: python -m benchmarks.paper_scale [--stages rapd_stage1,...] [--devices 8[,64]]
                                        [--set field=value] [--mfu 0.4] [--jobs 2] [--tiny]
--tiny compiles the :demo configs (tiny frozen networks) on 2 devices (the smoke test).
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=64"
  ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import ast  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks import common  # noqa: E402

MFU = 0.4
PEAKS = {"H100": 989e12, "v5p": 459e12}  # dense bf16 FLOP/s per chip
CAPACITY_GB = (80, 95)  # H100 80 GB, TPU v5p 95 GB (decimal, compared with the peak bytes)

# Published config.json contents of the frozen networks the paper configurations use.
QWEN3_1_7B = dict(  # Qwen/Qwen3-1.7B
    model_type="qwen3",
    architectures=["Qwen3ForCausalLM"],
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=40960,
    attention_bias=False,
    hidden_act="silu",
    tie_word_embeddings=True,
    use_sliding_window=False,
)
DINOV2_BASE = dict(  # facebook/dinov2-base (ViT-B/14), the RaPD teacher
    model_type="dinov2",
    architectures=["Dinov2Model"],
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    num_channels=3,
    qkv_bias=True,
    layer_norm_eps=1e-6,
    hidden_act="gelu",
    layerscale_value=1.0,
    use_swiglu_ffn=False,
)
SD15_VAE = dict(  # stable-diffusion-v1-5/stable-diffusion-v1-5 vae/config.json
    _class_name="AutoencoderKL",
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
# XLA:CPU options of the compile (the executable is never run):
# - LLVM code generation at its lowest effort: the HLO passes and buffer assignment, and so
#   the cost and memory analyses, are unchanged (checked: identical FLOPs and bytes); the
#   compile takes about half the time.
# - the memory-optimised scheduler: XLA:CPU's default order runs independent work early for
#   concurrency, e.g. every rematerialised block's forward ahead of the backward pass, which
#   made RaPD stage 2's temporaries 2.2x larger (22.7 vs 10.5 GB at 2 examples per device).
#   GPU and TPU schedule against a memory limit; the memory-optimised order is the closer
#   estimate of their peak. FLOPs are the same under both.
COMPILE_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
}
PATCH_DM_IMAGES = 21443  # Patch-DM Sec. 5.1: the nature training set (one code per image)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One trainable stage: its config file, presets and the earlier stage it reads."""

  config: str  # configs/<config>.py
  preset: str  # the paper-scale preset of this stage ('' = the default)
  tiny: str  # the --tiny preset (demo sizes)
  frozen: str = ""  # presets naming the frozen networks, {kind} = their directories
  previous: str = ""  # the finished stage it reads (written as an abstract run)
  stats_dim: str = ""  # dotted config field: the channels of the previous stage's statistics
  side: str = ""  # dotted config field: side of the shapes images (the encoder input's)
  compile_weight: int = 1  # relative compile time (measured), to schedule the longest first


STAGES = {
    "rapd_stage1": Stage(
        "rapd", "", "demo", "teacher={dinov2},lpips={lpips}", side="rapd_stage1.enc_size"
    ),
    "rapd_stage2": Stage(
        "rapd",
        "stage2",
        "demo",
        "teacher={dinov2},text_encoder={qwen3}",
        previous="rapd_stage1",
        stats_dim="rapd_stage1.encoder.latent_channels",
        side="rapd_stage1.enc_size",
        compile_weight=4,
    ),
    "infd_ae": Stage("infd", "", "demo", "lpips={lpips}", side="infd_ae.enc_size"),
    "infd_ldm": Stage(
        "infd",
        "ldm",
        "demo",
        previous="infd_ae",
        stats_dim="infd_ae.ae.z_channels",
        side="infd_ae.enc_size",
        compile_weight=2,
    ),
    "infty_diff": Stage("infty_diff", "", "demo", side="infty_diff.image_size", compile_weight=4),
    "infty_diff_latent": Stage(
        "infty_diff",
        "latent",
        "demo,z=16",
        previous="infty_diff",
        stats_dim="infty_diff.z_dim",
        side="infty_diff.image_size",
    ),
    "patch_dm": Stage("patch_dm", "", "demo", side="patch_dm.image_height", compile_weight=3),
    "infgen": Stage(
        "infgen", "", "demo", "vae={sd_vae},lpips={lpips}", side="infgen.enc_size", compile_weight=2
    ),
}
# Default: every method's main stage(s); infty_diff_latent (a latent MLP on the main
# stage's encoder) on request. patch_dm_codes is not covered: it normalises its training codes
# with statistics of the concrete code table of its patch_dm run, which an abstract run lacks.
DEFAULT_STAGES = "rapd_stage1,rapd_stage2,infd_ae,infd_ldm,infty_diff,patch_dm,infgen"


def load_config(name: str, arg: str):
  """configs/<name>.py:get_config(arg), loaded by path (configs/ is not a package)."""
  path = os.path.join(common.ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"{name}_cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def write_frozen(root: str, tiny: bool) -> dict[str, str]:
  """{kind: directory} of config-only checkpoints of the frozen networks (tiny: the test
  sizes of `infdiff.pretrained.testing`)."""
  from infdiff.pretrained import testing

  if tiny:
    configs = dict(
        dinov2=testing.tiny_dinov2_config(),
        qwen3=testing.tiny_qwen3_config(vocab_size=64),
        sd_vae=testing.tiny_sd_vae_config(block_out_channels=[8, 16, 16, 16], norm_num_groups=4),
    )
  else:
    configs = dict(dinov2=DINOV2_BASE, qwen3=QWEN3_1_7B, sd_vae=SD15_VAE)
  out = {}
  for kind, cfg in (*configs.items(), ("lpips", None)):  # LPIPS: the full VGG16, no config
    out[kind] = os.path.join(root, kind)
    os.makedirs(out[kind], exist_ok=True)
    if cfg is not None:
      with open(os.path.join(out[kind], "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
  return out


def _field(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def stage_config(name: str, tiny: bool, frozen: dict[str, str], root: str):
  """The stage's config at paper (or demo) scale, reading the built-in shapes, with an
  abstract run of its previous stage under `root` when it has one."""
  s = STAGES[name]
  presets = [s.tiny if tiny else s.preset, s.frozen.format(**frozen)]
  config = load_config(s.config, ",".join(p for p in presets if p))
  config.stages = (name,)
  config.compilation_cache_dir = ""  # no persistent cache: the times are cold compiles
  cfg = config[name]
  # The paper's image folders do not exist here. Every transform gives the same (static)
  # shapes from any image size, so the built-in shapes are rendered at the encoder's input
  # side: resizing a 2048^2 image for RaPD alone takes seconds per example.
  config.data.source = "shapes"
  config.data.shapes_size = int(_field(config, s.side))
  if name == "patch_dm" and not tiny:
    cfg.code.num = PATCH_DM_IMAGES  # the table has one code per training image
  if name == "infgen":
    cfg.vae_source = "sd"  # the frozen SD VAE (the demo trains its own `vae` stage first)
  if s.previous:
    run = os.path.join(root, "run")
    prev_dir = os.path.join(run, s.previous)
    os.makedirs(prev_dir, exist_ok=True)
    with open(os.path.join(prev_dir, "config.json"), "w") as f:
      prev = config.copy_and_resolve_references()
      prev.stages = (s.previous,)
      f.write(prev.to_json_best_effort(indent=1))
    c = int(_field(config, s.stats_dim))
    with open(os.path.join(prev_dir, "latent_stats.json"), "w") as f:
      json.dump({"mean": [0.0] * c, "std": [1.0] * c, "count": 1}, f)
    cfg.stage1_workdir = run
  return config


def _abstract(x, sharding):
  """A leaf of a (partly concrete) tree as a jax.ShapeDtypeStruct with its sharding."""
  dtype = x.dtype if hasattr(x, "dtype") else jax.dtypes.canonicalize_dtype(np.result_type(x))
  return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=sharding)


def _size(tree) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def mesh_spec(batch: int, devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor): fsdp over as many devices as the global batch splits over."""
  fsdp = math.gcd(batch, devices)
  return (1, fsdp, devices // fsdp)


def measure_cost_scope(devices: int) -> float:
  """Cost-analysis FLOPs of a matmul split over `devices` over those of the same matmul on
  one device: 1 / devices if the cost analysis counts one device's partition."""
  n = 512
  flops = []
  for d in (1, devices):
    mesh = jax.make_mesh((d,), ("x",), devices=jax.devices()[:d])
    a = jax.ShapeDtypeStruct((n, n), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    b = jax.ShapeDtypeStruct((n, n), jnp.float32, sharding=NamedSharding(mesh, P()))
    cost = jax.jit(jnp.dot).lower(a, b).compile().cost_analysis()
    flops.append(float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]))
  return flops[1] / flops[0]


def compile_stage(name: str, config, counts: list[int]) -> list[dict]:
  """Lowers and compiles the stage's real train step on each number of simulated devices.

  The Method (with its abstract frozen inputs and earlier stage) and the example batch are
  built once; state, shardings and the step are built per mesh as the trainer does.
  """
  from infdiff import pretrained, runs, train
  from infdiff import sharding as shard_lib
  from infdiff.methods import get_method_class

  t0 = time.perf_counter()
  cfg = config[name]
  rules = shard_lib.rules_from_config(config.logical_axis_rules)
  with tempfile.TemporaryDirectory() as workdir, pretrained.abstract(), runs.abstract():
    method = get_method_class(name)(config, name, os.path.join(workdir, name))
    host = train.example_batch(method, 1)  # one example through the stage's transform
    frozen = method.prepare(None, training=True)  # every method ignores the mesh here
  rows = []
  for devices in counts:
    config.mesh = mesh_spec(int(cfg.batch_size), devices)
    mesh = shard_lib.make_mesh(config.mesh, devices=jax.devices()[:devices])
    batch = {
        k: jax.ShapeDtypeStruct((int(cfg.batch_size), *v.shape[1:]), v.dtype)
        for k, v in host.items()
    }
    state, shardings, txs = train.build_state(method, config, mesh, rules, batch, materialize=False)
    batch_shardings = {k: shard_lib.batch_sharding(mesh, len(v.shape)) for k, v in batch.items()}
    batch = {k: _abstract(v, batch_shardings[k]) for k, v in batch.items()}
    aux, aux_shardings = shard_lib.logical_placement(frozen, mesh, rules)
    aux = jax.tree.map(_abstract, aux, aux_shardings)
    step_fn = jax.jit(
        train.make_train_step(method, txs, config),
        in_shardings=(shardings, batch_shardings, aux_shardings),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )
    t1 = time.perf_counter()
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", ".*with mesh", DeprecationWarning)  # the trainer's form
      with mesh, nn.logical_axis_rules(rules):
        lowered = step_fn.lower(state, batch, aux)
        t2 = time.perf_counter()
        compiled = lowered.compile(compiler_options=COMPILE_OPTIONS)
    t3 = time.perf_counter()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    rows.append(
        dict(
            stage=name,
            devices=devices,
            mesh=tuple(mesh.shape.values()),
            batch=int(cfg.batch_size),
            dtype=str(cfg.get("dtype", "float32")),
            params=_size(state.params),
            frozen=_size(aux),
            device_flops=float(cost["flops"]),
            args=mem.argument_size_in_bytes,
            out=mem.output_size_in_bytes,
            temp=mem.temp_size_in_bytes,
            alias=mem.alias_size_in_bytes,
            peak=peak,
            steps=train.stage_steps(config, name),
            seconds=t3 - t0,  # the first device count includes building the Method
            lower_s=t2 - t1,
            compile_s=t3 - t2,
        )
    )
    t0 = time.perf_counter()
  return rows


def run_stage(name: str, tiny: bool, counts: list[int], frozen: dict, overrides: list) -> list:
  """The rows of one stage (a worker process's task)."""
  with tempfile.TemporaryDirectory() as root:
    config = stage_config(name, tiny, frozen, root)
    for item in overrides:
      apply_override(config, item)
    return compile_stage(name, config, counts)


def apply_override(config, item: str) -> None:
  """`--set field=value` (dotted field, Python literal value) on a stage's config."""
  key, _, value = item.partition("=")
  *path, last = key.split(".")
  node = config
  try:
    for part in path:
      node = node[part]
    node[last] = ast.literal_eval(value)
  except (KeyError, ValueError, SyntaxError) as e:
    raise SystemExit(f"--set {item}: {e}") from None


def project(row: dict, per_device_scope: bool, mfu: float) -> dict:
  """Global FLOPs, fits and projected step times / days of one measured row."""
  n = row["devices"]
  device_flops = row["device_flops"] if per_device_scope else row["device_flops"] / n
  out = dict(global_flops=device_flops * n)
  for chip, peak in PEAKS.items():
    sec = device_flops / (peak * mfu)
    out[f"{chip}_s"] = sec
    out[f"{chip}_days"] = sec * row["steps"] / 86400.0
  for cap in CAPACITY_GB:
    out[f"fits{cap}"] = row["peak"] <= cap * 1e9
  return out


COLUMNS = (
    "stage",
    "dev",
    "mesh d/f/t",
    "B",
    "dtype",
    "params M",
    "frozen M",
    "GFLOP/step",
    "args GiB",
    "out GiB",
    "temp GiB",
    "peak GiB",
    "80 GB",
    "95 GB",
    "steps",
    "H100 s/step",
    "H100 days",
    "v5p s/step",
    "v5p days",
    "time s",
)


def _days(d: float) -> str:
  return f"{d:.2f}" if d >= 0.1 else f"{d:.3f}"


def format_row(r: dict) -> list[str]:
  gib = lambda b: f"{b / 2**30:.2f}"
  yes = lambda b: "yes" if b else "NO"
  return [
      r["stage"],
      str(r["devices"]),
      "x".join(map(str, r["mesh"])),
      str(r["batch"]),
      r["dtype"],
      f"{r['params'] / 1e6:.1f}",
      f"{r['frozen'] / 1e6:.1f}",
      f"{r['global_flops'] / 1e9:,.0f}",
      gib(r["args"]),
      gib(r["out"]),
      gib(r["temp"]),
      gib(r["peak"]),
      yes(r["fits80"]),
      yes(r["fits95"]),
      f"{r['steps']:,}",
      f"{r['H100_s']:.3f}",
      _days(r["H100_days"]),
      f"{r['v5p_s']:.3f}",
      _days(r["v5p_days"]),
      f"{r['seconds']:.0f}",
  ]


def markdown(rows: list[dict]) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(format_row(r)) + " |" for r in rows]
  return "\n".join(lines)


def main(argv=None) -> list[dict]:
  """Compiles the chosen stages on each device count and prints one table; returns rows."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--stages", default=None, help=f"comma list of {', '.join(STAGES)}")
  ap.add_argument("--devices", default=None, help="simulated device counts (default 8)")
  ap.add_argument("--mfu", type=float, default=MFU, help="assumed model FLOPs utilisation")
  ap.add_argument("--jobs", type=int, default=2, help="stages compiled in parallel processes")
  ap.add_argument(
      "--set", action="append", default=[], help="config override field=value (repeatable)"
  )
  ap.add_argument("--tiny", action="store_true", help="demo configs on 2 devices (smoke test)")
  args = ap.parse_args(argv)
  stages = (args.stages or ("rapd_stage1" if args.tiny else DEFAULT_STAGES)).split(",")
  unknown = sorted(set(stages) - set(STAGES))
  if unknown:
    raise SystemExit(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}")
  counts = [int(d) for d in (args.devices or ("2" if args.tiny else "8")).split(",")]
  if max(counts) > jax.device_count():
    raise SystemExit(
        f"{max(counts)} devices asked for, {jax.device_count()} present (XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}); set --xla_force_host_platform_device_count"
    )
  common.header("paper-scale train steps: lowered and compiled on simulated CPU devices")
  t_start = time.perf_counter()
  ratio = measure_cost_scope(max(counts))
  per_device = abs(ratio * max(counts) - 1.0) < 0.05
  print(
      f"XLA cost analysis of a 512^3 matmul split over {max(counts)} devices / on 1 device: "
      f"{ratio:.4f}, so it counts {'one device' if per_device else 'all devices'}; "
      "GFLOP/step = global (per device x devices)",
      flush=True,
  )
  print(
      f"s/step = per-device FLOPs / (peak x MFU {args.mfu}); dense bf16 peaks: H100 "
      f"{PEAKS['H100'] / 1e12:.0f}, TPU v5p {PEAKS['v5p'] / 1e12:.0f} TFLOP/s; days = s/step "
      "x the config's steps; fits = peak <= 80e9 / 95e9 bytes"
      + (f"; overrides: {' '.join(args.set)}" if args.set else ""),
      flush=True,
  )
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    frozen = write_frozen(os.path.join(tmp, "pretrained"), args.tiny)
    # Longest compiles first, so that the two workers finish close together.
    order = sorted(stages, key=lambda n: -STAGES[n].compile_weight)
    tasks = [(name, args.tiny, counts, frozen, args.set) for name in order]
    if args.jobs > 1 and len(tasks) > 1:
      ctx = multiprocessing.get_context("spawn")  # a fresh jax per worker (same XLA_FLAGS)
      with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        futures = [pool.submit(run_stage, *t) for t in tasks]
        done = (f.result() for f in concurrent.futures.as_completed(futures))
        for stage_rows in done:
          rows += _report(stage_rows, per_device, args.mfu, t_start)
    else:
      for t in tasks:
        rows += _report(run_stage(*t), per_device, args.mfu, t_start)
  rows.sort(key=lambda r: (stages.index(r["stage"]), r["devices"]))
  print("\n" + markdown(rows), flush=True)
  print(
      f"\ntotal {time.perf_counter() - t_start:.0f} s ({args.jobs} job(s)); load average "
      f"{os.getloadavg()[0]:.2f}",
      flush=True,
  )
  return rows


def _report(stage_rows, per_device: bool, mfu: float, t_start: float) -> list[dict]:
  """Adds the projections to a stage's rows and prints one progress line per row."""
  for r in stage_rows:
    r.update(project(r, per_device, mfu))
    print(
        f"[{time.perf_counter() - t_start:4.0f} s] {r['stage']} on {r['devices']}: "
        f"{r['global_flops'] / 1e12:.1f} TFLOP/step, peak {r['peak'] / 2**30:.1f} GiB/device, "
        f"lowered in {r['lower_s']:.0f} s, compiled in {r['compile_s']:.0f} s",
        flush=True,
    )
  return stage_rows


if __name__ == "__main__":
  main()
