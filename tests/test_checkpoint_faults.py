"""Checkpoint faults: unreadable newest steps, failed and interrupted saves, the check CLI."""

import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import pytest
import tiny

from infdiff import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [*tiny.STAGE1_ONLY, "--config.log_every=2", "--config.checkpoint_every=2"]
TINY += ["--config.keep_checkpoints=5"]
STAGE = "rapd_stage1"


def run_main(workdir, steps, check=True, env=None):
  cmd = [sys.executable, "-m", "infdiff.main", "--config=configs/rapd.py:demo"]
  cmd += [f"--workdir={workdir}", *TINY, *tiny.steps(steps)]
  proc = subprocess.run(
      cmd, cwd=ROOT, env=env or tiny.subprocess_env(), capture_output=True, text=True
  )
  if check and proc.returncode != 0:
    raise AssertionError(f"main failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def ckdir(workdir):
  return os.path.join(workdir, STAGE, "checkpoints")


def steps_in(workdir):
  return sorted(int(s) for s in os.listdir(ckdir(workdir)) if s.isdigit())


def final_params(workdir):
  state, step = ckpt_lib.restore_params_only(ckdir(workdir))
  return state["params"], step


def array_file(workdir, step):
  """The largest array data file of a step (OCDBT data under state/ocdbt.process_0/d/)."""
  d = os.path.join(ckdir(workdir), str(step), "state", "ocdbt.process_0", "d")
  return max((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize)


def corrupt(workdir, step, how):
  if how == "flip":  # the first bytes: the compressed chunk no longer decodes
    path = array_file(workdir, step)
    data = bytearray(open(path, "rb").read())
    for i in range(8):
      data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))
  elif how == "truncate":
    path = array_file(workdir, step)
    os.truncate(path, os.path.getsize(path) // 2)
  elif how == "metadata":
    os.remove(os.path.join(ckdir(workdir), str(step), "state", "_METADATA"))
  else:
    raise ValueError(how)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted 8-step run (the reference) and a copy as if stopped at step 6."""
  base = tmp_path_factory.mktemp("runs")
  run_main(base / "ref", 8)
  assert steps_in(base / "ref") == [2, 4, 6, 8]
  shutil.copytree(base / "ref", base / "six")
  shutil.rmtree(os.path.join(ckdir(base / "six"), "8"))
  return base / "six", final_params(base / "ref")


def assert_no_traceback(proc):
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("how", ["flip", "truncate", "metadata"])
def test_resume_skips_unreadable_newest_step(runs, tmp_path, how):
  six, (ref_params, ref_step) = runs
  w = tmp_path / "w"
  shutil.copytree(six, w)
  corrupt(w, 6, how)
  proc = run_main(w, 8)
  assert_no_traceback(proc)
  warnings = [x for x in proc.stderr.splitlines() if "checkpoint step 6 is unreadable" in x]
  assert len(warnings) == 1, proc.stderr[-3000:]
  assert "6.unreadable" in warnings[0] and "resumed from step 4" in warnings[0]
  assert os.path.isdir(os.path.join(ckdir(w), "6.unreadable"))  # moved aside, not deleted
  params, step = final_params(w)
  assert step == ref_step == 8
  chex.assert_trees_all_equal(params, ref_params)


def test_no_readable_step_is_one_line_and_moves_nothing(runs, tmp_path):
  six, _ = runs
  w = tmp_path / "w"
  shutil.copytree(six, w)
  for step in (2, 4, 6):
    corrupt(w, step, "metadata")
  proc = run_main(w, 8, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert_no_traceback(proc)
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: no readable checkpoint"), last
  assert all(f"step {s}:" in last for s in (2, 4, 6)), last
  assert steps_in(w) == [2, 4, 6]  # nothing is moved when no step is readable


def test_params_only_skips_unreadable_newest_without_moving(runs, tmp_path):
  six, _ = runs
  w = tmp_path / "w"
  shutil.copytree(six, w)
  corrupt(w, 6, "truncate")
  _, step = ckpt_lib.restore_params_only(ckdir(w))
  assert step == 4
  assert steps_in(w) == [2, 4, 6]
  _, step = ckpt_lib.restore_params_only(ckdir(w), step=2)
  assert step == 2
  with pytest.raises(ckpt_lib.CheckpointError, match="cannot read checkpoint step 6"):
    ckpt_lib.restore_params_only(ckdir(w), step=6)
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint step 5"):
    ckpt_lib.restore_params_only(ckdir(w), step=5)


def evaluate(workdir, *extra):
  cmd = [sys.executable, "-m", "infdiff.evaluate", f"--workdir={workdir}", "--metric=recon"]
  cmd += ["--num=1", *extra]
  return subprocess.run(cmd, cwd=ROOT, env=tiny.subprocess_env(), capture_output=True, text=True)


def test_evaluate_reads_newest_readable_or_the_given_step(runs, tmp_path):
  six, _ = runs
  w = tmp_path / "w"
  shutil.copytree(six, w)
  corrupt(w, 6, "flip")
  proc = evaluate(w)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert_no_traceback(proc)
  assert "checkpoint step 6" in proc.stderr and "read step 4 instead" in proc.stderr
  assert steps_in(w) == [2, 4, 6]  # inference moves nothing
  proc = evaluate(w, "--step=6")
  assert proc.returncode == 2
  assert_no_traceback(proc)
  err = [x for x in proc.stderr.splitlines() if x.strip()]
  assert len(err) == 1 and err[0].startswith("error: cannot read checkpoint step 6"), proc.stderr


def test_evaluate_failed_read_noise_is_silenced(runs, tmp_path):
  """Other reads of a failed restore end after the error: no stray tracebacks."""
  six, _ = runs
  w = tmp_path / "w"
  shutil.copytree(six, w)
  corrupt(w, 6, "truncate")
  code = (
      "import gc, sys, time\n"
      "from infdiff import checkpoint as c\n"
      "for _ in range(3):\n"
      "  try:\n"
      f"    c.restore_params_only({ckdir(w)!r}, step=6)\n"
      "  except c.CheckpointError as e:\n"
      "    print('error:', e)\n"
      "  gc.collect()\n"
      "time.sleep(1)\n"
  )
  proc = subprocess.run(
      [sys.executable, "-c", code],
      cwd=ROOT,
      env=tiny.subprocess_env(),
      capture_output=True,
      text=True,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("error: cannot read checkpoint step 6") == 3
  assert_no_traceback(proc)
  assert "never retrieved" not in proc.stderr


def run_faulty(workdir, steps, mode, nth, **kw):
  """infdiff.main with the nth state write failing (tests/save_faults.py)."""
  cmd = [sys.executable, os.path.join(ROOT, "tests", "save_faults.py"), mode, str(nth)]
  cmd += ["--config=configs/rapd.py:demo", f"--workdir={workdir}", *TINY, *tiny.steps(steps)]
  env = tiny.subprocess_env()
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
  return subprocess.Popen(
      cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw
  )


def test_failed_save_keeps_previous_steps_and_rerun_resumes(runs, tmp_path):
  _, (ref_params, _) = runs
  w = tmp_path / "w"
  proc = run_faulty(w, 8, "enospc", 3)  # the save of step 6 fails
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith(f"error: cannot save checkpoint in {ckdir(w)}"), last
  assert "No space left on device" in last
  assert steps_in(w) == [2, 4]
  _, step = final_params(w)
  assert step == 4  # the previous step is intact and readable
  proc = run_main(w, 8)
  assert "resumed from step 4" in proc.stderr
  params, step = final_params(w)
  assert step == 8
  chex.assert_trees_all_equal(params, ref_params)


def test_kill_during_save_leaves_a_partial_step_that_resume_ignores(runs, tmp_path):
  _, (ref_params, _) = runs
  w = tmp_path / "w"
  proc = run_faulty(w, 8, "hang", 3)  # hangs in the save of step 6
  hang = os.path.join(ckdir(w), "HANG")
  deadline = time.time() + 240
  while not os.path.exists(hang) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.1)
  assert os.path.exists(hang), proc.stderr.read()[-3000:] if proc.poll() is not None else ""
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  os.remove(hang)
  assert any(".orbax-checkpoint-tmp" in p for p in os.listdir(ckdir(w)))
  assert steps_in(w) == [2, 4]
  proc = run_main(w, 8)
  assert "resumed from step 4" in proc.stderr
  assert not any(".orbax-checkpoint-tmp" in p for p in os.listdir(ckdir(w)))
  params, step = final_params(w)
  assert step == 8
  chex.assert_trees_all_equal(params, ref_params)


def test_checkpoint_check_reports_each_step(runs, tmp_path):
  from infdiff import checkpoint_check

  six, _ = runs
  w = tmp_path / "w"
  shutil.copytree(six, w)
  corrupt(w, 2, "metadata")
  lines, ok = checkpoint_check.check(str(w))
  assert ok  # only an older step is unreadable
  assert lines[:2] == [f"{STAGE} step 6: readable", f"{STAGE} step 4: readable"]
  assert lines[2].startswith(f"{STAGE} step 2: unreadable: ") and "_METADATA" in lines[2]
  corrupt(w, 6, "flip")
  cmd = [sys.executable, "-m", "infdiff.checkpoint_check", f"--workdir={w}"]
  proc = subprocess.run(cmd, cwd=ROOT, env=tiny.subprocess_env(), capture_output=True, text=True)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert_no_traceback(proc)
  out = proc.stdout.splitlines()
  assert out[0].startswith(f"{STAGE} step 6: unreadable: "), out
  assert out[1] == f"{STAGE} step 4: readable", out
  proc = subprocess.run(
      [sys.executable, "-m", "infdiff.checkpoint_check", f"--workdir={tmp_path / 'none'}"],
      cwd=ROOT,
      env=tiny.subprocess_env(),
      capture_output=True,
      text=True,
  )
  assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
  assert "Traceback" not in proc.stderr


def test_forced_save_of_a_written_step_keeps_it(tmp_path):
  """A preemption signal on a step the periodic save just wrote: no StepAlreadyExistsError,
  and the written checkpoint stays as it was."""
  import numpy as np

  mngr = ckpt_lib.manager(str(tmp_path / "ck"), keep=3, save_every=1)
  first = {"w": np.arange(4, dtype=np.float32)}
  assert ckpt_lib.save(mngr, 7, first, {"pos": 1})
  assert ckpt_lib.save(mngr, 7, {"w": np.zeros(4, np.float32)}, {"pos": 2}, force=True) is False
  assert ckpt_lib.save(mngr, 8, first, {"pos": 3}, force=True)
  ckpt_lib.wait(mngr)
  assert mngr.all_steps() == [7, 8]
  state, step = ckpt_lib.restore_params_only(str(tmp_path / "ck"), step=7)
  assert step == 7
  np.testing.assert_array_equal(state["w"], first["w"])
  ckpt_lib.close(mngr)
