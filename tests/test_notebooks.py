"""The notebooks in colabs/ run top to bottom (nbclient) for every method, on tiny settings.

Each notebook's `parameters` cell is kept and followed by assignments that shrink the
run (as papermill injects parameters): the method's tiny config overrides from its own
end-to-end test, and small sizes. The first notebook run of a method trains its demo
preset inside the notebook; later ones reuse that run directory.
"""

import json
import os

import pytest
import test_infd
import test_infgen
import test_infty_diff
import test_patch_dm
import test_stage2
import tiny

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(ROOT, "colabs")
NOTEBOOKS = sorted(n for n in os.listdir(COLABS) if n.endswith(".ipynb"))

# method -> --config overrides of its demo preset (two training steps per stage)
TINY = {
    "rapd": [*test_stage2.TINY, *tiny.steps(2)],
    "infd": [*test_infd.TINY, *test_infd.steps(2)],
    # the demo is unconditional (one stage); the tiny list conditions on a latent z
    "infty_diff": [*test_infty_diff.TINY, *test_infty_diff.steps(2), "infty_diff.z_dim=0"],
    "patch_dm": [*test_patch_dm.TINY, *test_patch_dm.steps(2)],
    "infgen": [*test_infgen.TINY, *test_infgen.steps(2)],
}
EXPECTED_METRICS = {
    "rapd": ("recon", "shapes_eval"),
    "infd": ("recon", "swd"),
    "infty_diff": ("swd",),
    "patch_dm": ("seams",),
    "infgen": ("recon", "swd"),
}
GUIDABLE = ("infd", "infty_diff", "patch_dm")  # RaPD's generator is not a guidable prior
SIZES = {"patch_dm": "[(16, 16), (32, 16)]"}  # Patch-DM: multiples of its tiny patch


def _read(name):
  with open(os.path.join(COLABS, name)) as f:
    return nbformat.read(f, as_version=4)


def test_committed_notebooks_carry_no_outputs():
  assert set(NOTEBOOKS) >= {"sample.ipynb", "zoom.ipynb", "guide.ipynb", "evaluate.ipynb"}
  for name in NOTEBOOKS:
    nb = _read(name)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: one cell tagged 'parameters'"
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert cell.outputs == [] and cell.execution_count is None, f"{name} has outputs"


def _execute(name, params: dict, cwd):
  nb = _read(name)
  cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
  cell.source += "\n# injected by tests/test_notebooks.py\n" + "\n".join(
      f"{k} = {v}" for k, v in params.items()
  )
  env_setup = nbformat.v4.new_code_cell(
      "import os\nos.environ['JAX_PLATFORMS'] = 'cpu'\nos.environ.pop('XLA_FLAGS', None)"
  )
  nb.cells.insert(0, env_setup)
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
  )
  client.execute()
  return nb


def _text(nb) -> str:
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      out.append(o.get("text", "") or json.dumps(o.get("data", {}).get("text/plain", "")))
  return "\n".join(out)


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("notebook_runs")


@pytest.mark.parametrize("method", sorted(TINY))
def test_notebooks_run_for_every_method(method, train_dir):
  sizes = SIZES.get(method, "[(16, 16), (32, 32)]")
  common = {
      "METHOD": repr(method),
      "TRAIN_DIR": repr(str(train_dir)),
      "OVERRIDES": repr(TINY[method]),
      "SEED": "1",
      "STEPS": "2",
  }
  nb = _execute("sample.ipynb", {**common, "SIZES": sizes, "NUM": "1"}, train_dir)
  assert "identical: True" in _text(nb)
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert images, "sample.ipynb showed no picture"
  run = os.path.join(str(train_dir), method)
  assert os.path.isdir(run)
  nb = _execute(
      "zoom.ipynb",
      {**common, "WORKDIR": repr(run), "SCALES": "[1, 2]", "RECON_IMAGES": "2"},
      train_dir,
  )
  text = _text(nb)
  assert "Error" not in text, text[-2000:]
  if method in GUIDABLE:
    nb = _execute("guide.ipynb", {**common, "WORKDIR": repr(run), "NUM": "1"}, train_dir)
    text = _text(nb)
    for task in ("superres", "inpaint", "hole", "outpaint", "colours"):
      assert f"{task} (" in text and "guided" in text, text[-2000:]
  nb = _execute("evaluate.ipynb", {**common, "WORKDIR": repr(run), "NUM": "2"}, train_dir)
  text = _text(nb)
  # the metrics that apply to the run were written and shown as tables
  shown = {m for m in ("recon", "shapes_eval", "seams", "swd") if f"{m}:\n" in text}
  assert shown == set(EXPECTED_METRICS[method]), text[-2000:]
  assert {n[:-5] for n in os.listdir(os.path.join(run, "eval"))} >= shown
