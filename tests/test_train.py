"""The trainer end to end: resume, preemption, cross-mesh restore, sharded step, CLI misuse."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
import tiny

from infdiff import checkpoint as ckpt_lib
from infdiff import sharding as shard_lib
from infdiff import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [*tiny.STAGE1_ONLY, "--config.log_every=5"]


_env = tiny.subprocess_env


def run_main(workdir, *extra, config="configs/rapd.py:demo", check=True, **kw):
  cmd = [sys.executable, "-m", "infdiff.main", f"--config={config}", f"--workdir={workdir}"]
  cmd += TINY + list(extra)
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, **kw)
  if check and proc.returncode != 0:
    raise AssertionError(f"main failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def final_params(workdir, stage="rapd_stage1"):
  state, step = ckpt_lib.restore_params_only(os.path.join(workdir, stage, "checkpoints"))
  return state["params"], step


def test_demo_trains_writes_events_and_checkpoints(tmp_path):
  w = tmp_path / "w"
  run_main(w, *tiny.steps(10), "--config.checkpoint_every=5")
  stage = w / "rapd_stage1"
  assert max(int(s) for s in os.listdir(stage / "checkpoints") if s.isdigit()) == 10
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(stage))
  stats = json.loads((stage / "latent_stats.json").read_text())
  assert len(stats["mean"]) == len(stats["std"]) > 0 and stats["count"] > 0
  log = (w / "train.log").read_text()
  assert "steps/s" in log and "ETA" in log


def test_resume_after_sigkill_is_bit_identical(tmp_path):
  n = 10
  ref = tmp_path / "ref"
  run_main(ref, *tiny.steps(2 * n), f"--config.checkpoint_every={n}")
  ref_params, ref_step = final_params(ref)
  assert ref_step == 2 * n

  killed = tmp_path / "killed"
  ckdir = killed / "rapd_stage1" / "checkpoints"
  cmd = [
      sys.executable,
      "-m",
      "infdiff.main",
      "--config=configs/rapd.py:demo",
      f"--workdir={killed}",
  ]
  cmd += TINY + [*tiny.steps(2 * n), f"--config.checkpoint_every={n}"]
  rc, steps = tiny.kill_after_checkpoint(cmd, ckdir, n, ROOT)
  if 2 * n in steps:
    pytest.skip("the run finished before it could be killed; nothing to resume")
  assert rc == -signal.SIGKILL
  assert steps == [n]
  run_main(killed, *tiny.steps(2 * n), f"--config.checkpoint_every={n}")
  params, step = final_params(killed)
  assert step == 2 * n
  chex.assert_trees_all_equal(params, ref_params)


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
  w = tmp_path / "w"
  cmd = [sys.executable, "-m", "infdiff.main", "--config=configs/rapd.py:demo", f"--workdir={w}"]
  cmd += TINY + [*tiny.steps(100000), "--config.checkpoint_every=100000"]
  proc = subprocess.Popen(
      cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  log = w / "train.log"
  deadline = time.time() + 240
  while time.time() < deadline:
    if log.exists() and "steps/s" in log.read_text():
      break
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  rc = proc.wait(timeout=60)  # the contract: checkpoint and exit within 60 s (else TimeoutExpired)
  assert rc == 0, proc.stderr.read().decode()[-2000:]
  steps = [int(s) for s in os.listdir(w / "rapd_stage1" / "checkpoints") if s.isdigit()]
  assert steps and max(steps) >= 5


@pytest.mark.parametrize(
    "args,expect",
    [
        (
            ["--config=configs/rapd.py:demo", "--workdir={w}", "--config.no_such_field=1"],
            "no_such_field",
        ),
        (["--config=configs/rapd.py:dmeo", "--workdir={w}"], "dmeo"),
        (["--config=configs/rapd.py:demo"], "workdir"),
        (
            [
                "--config=configs/rapd.py:demo",
                "--workdir={w}",
                "--config.data.source=folder:{w}/none",
            ],
            "none",
        ),
    ],
)
def test_cli_misuse_is_one_line(tmp_path, args, expect):
  args = [a.format(w=tmp_path) for a in args]
  proc = subprocess.run(
      [sys.executable, "-m", "infdiff.main", *args],
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
  )
  assert proc.returncode != 0
  err = [line for line in proc.stderr.strip().splitlines() if line.strip()]
  assert "Traceback" not in proc.stderr
  assert len(err) == 1, proc.stderr
  assert expect in err[0]


# --- in-process: sharding ----------------------------------------------------------


def _tiny_config():
  import importlib.util

  spec = importlib.util.spec_from_file_location("rapd_cfg", os.path.join(ROOT, "configs/rapd.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("demo")
  c.rapd_stage1.enc_size = 16
  c.rapd_stage1.target_window = 16
  c.rapd_stage1.renderer.dim = 16
  c.rapd_stage1.encoder.n_resblocks = 1
  c.rapd_stage1.batch_size = 8
  # Some gradients are zero up to round-off (e.g. attention key biases); Adam with a tiny
  # eps turns that noise into +-lr updates, which differ between reduction orders. A
  # larger eps compares the real updates.
  c.rapd_stage1.optim.eps = 1e-3
  return c


def _batch(c, seed=0):
  from infdiff import fields

  rng = np.random.default_rng(seed)
  b, r, p = c.rapd_stage1.batch_size, c.rapd_stage1.enc_size, c.rapd_stage1.target_window
  coord = np.broadcast_to(fields.crop_grid(2 * r, 2 * r, 3, 5, p, p), (b, p, p, 2))
  return {
      "image": rng.random((b, r, r, 3), np.float32),
      "target": rng.random((b, p, p, 3), np.float32),
      "coord": np.ascontiguousarray(coord),
      "cell": np.full((b, 2), 1.0 / r, np.float32),
  }


def _run_steps(c, mesh, batches, tmp_path):
  from infdiff.methods import get_method_class

  chex.clear_trace_counter()  # each call builds a new step; it must trace once for all batches
  method = get_method_class("rapd_stage1")(c, "rapd_stage1", str(tmp_path))
  rules = shard_lib.rules_from_config(c.logical_axis_rules)
  state, shardings, txs = train.build_state(method, c, mesh, rules, batches[0])
  bsh = {k: shard_lib.batch_sharding(mesh, v.ndim) for k, v in batches[0].items()}
  step = chex.assert_max_traces(train.make_train_step(method, txs, c), n=1)
  step_fn = jax.jit(
      step,
      in_shardings=(shardings, bsh, None),
      out_shardings=(shardings, None),
      donate_argnums=(0,),
  )
  import flax.linen as nn

  with mesh, nn.logical_axis_rules(rules):
    for b in batches:
      state, metrics = step_fn(state, shard_lib.host_batch_to_global(b, mesh), {})
  return state, shardings, method, rules


def test_sharded_step_matches_single_device_and_compiles_once(tmp_path):
  c = _tiny_config()
  batches = [_batch(c, s) for s in range(3)]
  mesh8 = shard_lib.make_mesh((2, 4, 1))
  mesh1 = shard_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  s8, _, _, _ = _run_steps(c, mesh8, batches, tmp_path / "a")
  s1, _, _, _ = _run_steps(c, mesh1, batches, tmp_path / "b")
  p8, p1 = jax.device_get(s8.params), jax.device_get(s1.params)
  chex.assert_trees_all_close(p8, p1, atol=2e-5, rtol=2e-4)
  # The fsdp axis really splits some parameter.
  specs = [s.spec for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, s8.params))]
  assert any("fsdp" in str(sp) for sp in specs)


def test_checkpoint_restores_across_device_counts(tmp_path):
  c = _tiny_config()
  batches = [_batch(c, 0)]
  mesh8 = shard_lib.make_mesh((2, 4, 1))
  mesh1 = shard_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  s8, sh8, method, rules = _run_steps(c, mesh8, batches, tmp_path / "a")
  _, sh1, _, _ = _run_steps(c, mesh1, batches, tmp_path / "b")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), s8)

  m = ckpt_lib.manager(tmp_path / "ck8")
  ckpt_lib.save(m, 1, s8, {"pos": 3})
  m.wait_until_finished()
  r1, data = ckpt_lib.restore(m, 1, ckpt_lib.abstract_with_shardings(abstract, sh1))
  assert data == {"pos": 3}
  assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(r1))
  chex.assert_trees_all_equal(jax.device_get(r1), jax.device_get(s8))

  m1 = ckpt_lib.manager(tmp_path / "ck1")
  ckpt_lib.save(m1, 1, r1)
  m1.wait_until_finished()
  r8, _ = ckpt_lib.restore(m1, 1, ckpt_lib.abstract_with_shardings(abstract, sh8))
  assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(r8))
  chex.assert_trees_all_equal(jax.device_get(r8), jax.device_get(s8))


def test_training_on_messy_folder_counts_skipped_files(tmp_path):
  from data_fixtures import write_messy_folder

  folder = tmp_path / "imgs"
  expected = write_messy_folder(str(folder))
  w = tmp_path / "w"
  run_main(
      w,
      f"--config.data.source=folder:{folder}",
      "--config.data.max_pixels=10000",
      "--config.data.eval_fraction=0.0",
      "--config.rapd_stage1.stats_batch_size=16",
      "--config.rapd_stage1.stats_images=20",
      *tiny.steps(4),
      "--config.log_every=4",
      "--config.rapd_stage1.ema_decay=0",  # also the no-EMA path: stats from the params
  )
  saved, _ = ckpt_lib.restore_params_only(str(w / "rapd_stage1" / "checkpoints"))
  assert saved["ema"] == {} and saved["params"]["model"]
  # Fewer valid images than one statistics batch: the pass repeats the set (new crops).
  stats = json.loads((w / "rapd_stage1" / "latent_stats.json").read_text())
  assert stats["count"] == 20 * 16 * 16  # stats_images x enc_size^2 latents
  line = [x for x in (w / "train.log").read_text().splitlines() if "step 4/4" in x][-1]
  for reason, n in {**expected["scan_skips"], **expected["decode_skips"]}.items():
    assert f"{reason}={n}" in line, line


def test_nonfinite_loss_is_skipped_then_one_line_error(tmp_path):
  proc = run_main(
      tmp_path / "w",
      "--config.rapd_stage1.optim.lr=1e30",
      "--config.rapd_stage1.optim.grad_clip=0",
      *tiny.steps(60),
      "--config.max_nonfinite_steps=5",
      check=False,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and "NaN/inf" in last
  log = (tmp_path / "w" / "train.log").read_text()
  skipped = [float(x) for x in re.findall(r"nonfinite_skipped ([0-9.]+)", log)]
  assert skipped and skipped[-1] > 0  # steps were skipped (counted) before the error


def test_uneven_dimensions_are_replicated_not_refused():
  import flax.linen as nn
  from jax.sharding import PartitionSpec as P

  mesh = shard_lib.make_mesh((1, 4, 2))
  assert shard_lib.divisible_spec(P("fsdp", "tensor"), (8, 6), mesh) == P("fsdp", "tensor")
  assert shard_lib.divisible_spec(P("fsdp", "tensor"), (3, 5), mesh) == P(None, None)
  assert shard_lib.divisible_spec(P(("data", "fsdp")), (6, 2), mesh) == P(None, None)
  rules = (("embed", "fsdp"), ("mlp", "tensor"))
  box = lambda shape, names: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, "f4"), names)
  tree = {"rgb": box((3,), ("embed",)), "w": box((8, 6), ("embed", "mlp"))}
  specs = jax.tree.map(lambda s: s.spec, shard_lib.logical_shardings(tree, mesh, rules))
  assert specs == {"rgb": P(None), "w": P("fsdp", "tensor")}
  _, aux = shard_lib.logical_placement(tree, mesh, rules)
  assert jax.tree.map(lambda s: s.spec, aux) == specs


def test_abstract_run_gives_the_parameter_shapes_without_a_checkpoint(tmp_path):
  from infdiff import runs

  c = _tiny_config()
  c.stages = ("rapd_stage1",)
  c.data.num_threads = 1
  stage_dir = tmp_path / "run" / "rapd_stage1"
  stage_dir.mkdir(parents=True)
  (stage_dir / "config.json").write_text(c.to_json_best_effort())
  with pytest.raises(ckpt_lib.CheckpointError):
    runs.load_run(str(stage_dir))
  with runs.abstract():
    run = runs.load_run(str(tmp_path / "run"))
  assert run.stage == "rapd_stage1" and run.step == 0
  leaves = jax.tree.leaves(run.params)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  # The shapes the trainer initialises from a real batch.
  mesh = shard_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = shard_lib.rules_from_config(c.logical_axis_rules)
  batch = train.example_batch(run.method, 2)
  assert batch["image"].shape == (2, 16, 16, 3) and "index" in batch
  state, _, _ = train.build_state(run.method, c, mesh, rules, batch, materialize=False)
  same = lambda x: (x.shape, x.dtype)
  assert jax.tree.map(same, run.params) == jax.tree.map(same, state.params)


def test_stage_steps_follow_the_stage_config():
  import importlib.util

  spec = importlib.util.spec_from_file_location("rapd_cfg", os.path.join(ROOT, "configs/rapd.py"))
  rapd = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(rapd)
  c = rapd.get_config("demo")
  c.total_steps = 40
  assert train.stage_steps(c, "rapd_stage1") == 120  # the demo: 3x steps
  assert train.stage_steps(c, "rapd_stage2") == 40
  assert c.rapd_stage1.optim.decay_steps == 120  # the cosine ends with the stage
  c.rapd_stage1.total_steps = 7
  assert train.stage_steps(c, "rapd_stage1") == 7 and c.rapd_stage1.optim.decay_steps == 7
  assert train.stage_steps(rapd.get_config(""), "rapd_stage1") == 10_000


def test_stage_ema_follows_table5():
  import importlib.util

  spec = importlib.util.spec_from_file_location("rapd_cfg", os.path.join(ROOT, "configs/rapd.py"))
  rapd = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(rapd)
  paper, demo = rapd.get_config(""), rapd.get_config("demo")
  assert train.stage_ema_decay(paper, "rapd_stage1") == 0.0  # Table 5: EMA in stage 2 only
  assert train.stage_ema_decay(paper, "rapd_stage2") == 0.9999
  assert train.stage_ema_decay(demo, "rapd_stage1") == train.stage_ema_decay(demo, "rapd_stage2")
  assert train.stage_ema_decay(demo, "rapd_stage1") == 0.999


def test_checkpoint_without_model_state_restores(tmp_path):
  """A checkpoint from before TrainState.model_state restores into an empty model_state."""
  import flax

  @flax.struct.dataclass
  class OldTrainState:  # TrainState as it was, without model_state
    step: jax.Array
    params: dict
    opt_state: dict
    ema: dict
    rng: jax.Array
    nonfinite: jax.Array

  import optax

  params = {"model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
  opt = {"model": optax.adam(1e-3).init(params["model"])}
  old = OldTrainState(np.int32(4), params, opt, {}, np.zeros(2, np.uint32), np.int32(0))
  m = ckpt_lib.manager(tmp_path / "ck")
  ckpt_lib.save(m, 4, old, {"pos": 1})
  m.wait_until_finished()
  new = train.TrainState(**{f: getattr(old, f) for f in old.__dataclass_fields__})
  assert new.model_state == {}
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), new)
  restored, data = ckpt_lib.restore(m, 4, target)
  assert isinstance(restored, train.TrainState) and restored.model_state == {}
  assert data == {"pos": 1} and int(restored.step) == 4
  chex.assert_trees_all_equal(jax.device_get(restored.opt_state), opt)
  # A real mismatch is still a one-line CheckpointError.
  extra = jax.ShapeDtypeStruct((3,), np.float32, sharding=device)
  bad = target.replace(params={"model": {**target.params["model"], "b": extra}})
  with pytest.raises(ckpt_lib.CheckpointError, match="cannot restore step 4"):
    ckpt_lib.restore(m, 4, bad)
  m.close()
