"""configs/rapd.py: paper numbers, the start-up check of checkpoint directories, CLI errors."""

import importlib.util
import os
import subprocess
import sys

import pytest
import tiny

from infdiff import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rapd(arg=""):
  spec = importlib.util.spec_from_file_location("rapd_cfg", os.path.join(ROOT, "configs/rapd.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _main(*args):
  """`python -m infdiff.main ARGS` -> (return code, non-empty stderr lines, stderr)."""
  proc = subprocess.run(
      [sys.executable, "-m", "infdiff.main", *args],
      cwd=ROOT,
      env=tiny.subprocess_env(),
      capture_output=True,
      text=True,
      timeout=300,
  )
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  return proc.returncode, lines, proc.stderr


def test_paper_stage2_models_1024_tokens_of_the_stage1_latent():
  s1, s2 = _rapd("").rapd_stage1, _rapd("stage2").rapd_stage2
  # Stage 2 reads the latent side from stage 1's enc_size (EDSR keeps the resolution).
  assert (s1.enc_size // s2.dit.patch) ** 2 == 1024  # App. B.5
  assert s2.dit.patch == 16 and s1.encoder.latent_channels == 16
  assert 0 < s1.target_window <= s1.enc_size  # MultiResCrop's constraint
  demo = _rapd("demo")
  assert demo.rapd_stage1.enc_size % demo.rapd_stage2.dit.patch == 0


def test_long_preset_is_the_demo_with_a_larger_longer_stage2():
  demo, long = _rapd("demo"), _rapd("long")
  assert _rapd("demo,long").to_dict() == long.to_dict()
  assert long.stages == demo.stages and long.data.source == demo.data.source == "shapes"
  # Stage 1 is the demo's but distilled from the scenes' class map (no weights needed).
  s1_long, s1_demo = long.rapd_stage1.to_dict(), demo.rapd_stage1.to_dict()
  assert s1_long.pop("distill") != s1_demo.pop("distill")
  # ... and shorter (the 60-minute budget); its cosine schedule ends with it.
  assert s1_long.pop("total_steps") < s1_demo.pop("total_steps")
  assert s1_long["optim"].pop("decay_steps") == long.rapd_stage1.total_steps
  s1_demo["optim"].pop("decay_steps")
  assert s1_long == s1_demo
  assert long.rapd_stage1.distill.target == "shapes" and long.rapd_stage1.distill.weight > 0
  config_lib.check_required_paths(long)  # the semantic target needs no directory
  d, s1 = long.rapd_stage2.dit, long.rapd_stage1
  # The DiT is wider than a token of the stage-1 latent (p^2 C), the demo's is not.
  assert d.width > d.patch**2 * s1.encoder.latent_channels >= demo.rapd_stage2.dit.width
  assert long.total_steps > 3 * demo.total_steps
  assert long.rapd_stage2.optim.decay_steps == long.total_steps
  assert long.evals.shapes_eval.every == long.checkpoint_every


def test_paper_turns_the_losses_on_and_the_demo_only_with_directories():
  paper, stage2 = _rapd(""), _rapd("stage2")
  assert paper.rapd_stage1.lpips_weight == 1.0 and paper.rapd_stage1.distill.weight == 0.1
  assert stage2.rapd_stage2.repa.weight == 0.5  # Table 5
  off = _rapd("lpips=none,distill=False,repa=False")
  assert off.rapd_stage1.lpips_weight == 0.0 and off.rapd_stage1.distill.weight == 0.0
  assert off.rapd_stage2.repa.weight == 0.0
  demo = _rapd("demo")
  assert demo.rapd_stage1.lpips_weight == 0.0 and demo.rapd_stage1.distill.weight == 0.0
  assert demo.rapd_stage2.repa.weight == 0.0
  assert _rapd("demo,renderer=liif").rapd_stage1.renderer.unfold


def test_paper_config_without_directories_fails_at_start_in_one_line(tmp_path):
  rc, lines, err = _main("--config=configs/rapd.py", f"--workdir={tmp_path / 'w'}")
  assert rc == 2 and "Traceback" not in err
  assert len(lines) == 1, err
  line = lines[0]
  assert line.startswith("error: configs/rapd.py needs checkpoint directories")
  for name in ("rapd_stage1.lpips_path", "rapd_stage1.distill.teacher_path"):
    assert name in line
  assert "lpips=none" in line and "distill=False" in line
  assert not (tmp_path / "w").exists()  # nothing started

  rc, lines, err = _main("--config=configs/rapd.py:stage2", f"--workdir={tmp_path / 'w'}")
  assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
  assert "rapd_stage2.repa.teacher_path" in lines[0] and "rapd_stage2.text.path" in lines[0]
  assert "repa=False" in lines[0] and "lpips_path" not in lines[0]  # stage 1 does not run


def test_command_line_paths_satisfy_the_check(tmp_path):
  lp, dino = tmp_path / "lpips", tmp_path / "dino"
  lp.mkdir()
  dino.mkdir()
  # A path that does not exist is named too; the given one is not.
  rc, lines, err = _main(
      "--config=configs/rapd.py",
      f"--workdir={tmp_path / 'w'}",
      f"--config.rapd_stage1.lpips_path={lp}",
      f"--config.rapd_stage1.distill.teacher_path={tmp_path / 'nope'}",
  )
  assert rc == 2 and len(lines) == 1, err
  assert f"rapd_stage1.distill.teacher_path={tmp_path / 'nope'} is not a directory" in lines[0]
  assert "lpips_path" not in lines[0]
  # Both given on the command line after the preset: the check passes (what fails next is
  # the placeholder data folder, far past the check).
  rc, lines, err = _main(
      "--config=configs/rapd.py",
      f"--workdir={tmp_path / 'w'}",
      f"--config.rapd_stage1.lpips_path={lp}",
      f"--config.rapd_stage1.distill.teacher_path={dino}",
      f"--config.data.source=folder:{tmp_path / 'no_images'}",
  )
  assert rc != 0 and "needs checkpoint directories" not in err
  # The same in-process, on a config with the overrides applied.
  c = _rapd("")
  with pytest.raises(ValueError) as e:
    config_lib.check_required_paths(c, "configs/rapd.py")
  assert "\n" not in str(e.value)
  c.rapd_stage1.lpips_path, c.rapd_stage1.distill.teacher_path = str(lp), str(dino)
  config_lib.check_required_paths(c)


def test_losses_switched_off_explicitly_pass_the_check(tmp_path):
  config_lib.check_required_paths(_rapd("lpips=none,distill=False"))
  config_lib.check_required_paths(
      _rapd("lpips=none,distill=False,stage2,repa=False,text_encoder=/")
  )
  # A loss weight set to 0 on the command line switches its directory off as well.
  c = _rapd("")
  c.rapd_stage1.lpips_weight, c.rapd_stage1.distill.weight = 0.0, 0.0
  config_lib.check_required_paths(c)
  # Only the one switched off is dropped from the message.
  with pytest.raises(ValueError, match="teacher_path") as e:
    config_lib.check_required_paths(_rapd("lpips=none"))
  assert "lpips_path" not in str(e.value)
  # REPA on the built-in scenes' semantic target needs no teacher directory ('&' conditions).
  c = _rapd("lpips=none,distill=False,stage2,text_encoder=/")
  with pytest.raises(ValueError, match="repa.teacher_path"):
    config_lib.check_required_paths(c)
  c.rapd_stage2.repa.target = "shapes"
  assert c.rapd_stage2.repa.weight == 0.5
  config_lib.check_required_paths(c)


def test_demo_passes_the_check_without_directories(tmp_path):
  config_lib.check_required_paths(_rapd("demo"))
  config_lib.check_required_paths(_rapd("demo,renderer=liif"))
  # A directory given to the demo turns its losses on, and must exist.
  with pytest.raises(ValueError, match="distill.teacher_path=.*repa.teacher_path="):
    config_lib.check_required_paths(_rapd(f"demo,teacher={tmp_path / 'nope'}"))
  config_lib.check_required_paths(_rapd(f"demo,teacher={tmp_path}"))


@pytest.mark.parametrize("spec", ["configs/nope.py", "configs/nope.py:demo"])
def test_missing_config_file_is_one_line(tmp_path, spec):
  rc, lines, err = _main(f"--config={spec}", f"--workdir={tmp_path}", "--config.total_steps=3")
  assert rc == 2 and "Traceback" not in err
  assert len(lines) == 1, err
  assert "configs/nope.py" in lines[0] and "not found" in lines[0]


def test_get_config_error_is_one_line_with_its_message(tmp_path):
  rc, lines, err = _main("--config=configs/rapd.py:demo,dmeo", f"--workdir={tmp_path}")
  assert rc == 2 and "Traceback" not in err and len(lines) == 1, err
  assert "unknown preset 'dmeo'" in lines[0]
