"""notebooks/analysis.ipynb runs top to bottom against a tiny run and draws its figures.

The notebook is executed as `notebooks/run.py` executes it (a fresh python3 kernel, the cell
tagged "parameters" rewritten) against conftest's `tiny_run`, a `tiny` run's workdir as training
leaves it (its states drawn, not trained): it restores that run and trains nothing. (With no run at its workdir it would train
the `tiny` config first; `analysis.has_run`, which decides that, is tested here.) The kernel
inherits this process's environment: the 4 fake CPU devices and the tests' persistent
compilation cache.
"""

import base64
import importlib.util
import io
import os
import re
import shutil

import matplotlib.image
import nbformat
import pytest

from astra_jax import analysis

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "analysis.ipynb")
FIGURES = {"loss", "spectra", "pdfs", "redshift", "attention"}


def load_runner():
  """notebooks/run.py as a module (notebooks/ is not a package)."""
  spec = importlib.util.spec_from_file_location("notebook_run",
                                                os.path.join(REPO, "notebooks", "run.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def test_every_code_cell_says_why_and_calls_only_public_api():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for before, cell in zip(nb.cells, nb.cells[1:]):
    if cell.cell_type == "code":
      assert before.cell_type == "markdown" and before.source.strip(), cell.source
      assert len(cell.source.splitlines()) <= 10, cell.source  # Longer belongs in the library.
  source = "\n".join(c.source for c in code_cells(nb))
  assert not re.search(r"\b\w+\._\w", source)  # No module._private or object._private.
  assert re.findall(r"from (\S+) import", source) == [
      "absl", "astropy.table", "IPython.display", "astra_jax", "experiments.configs"]
  tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", ())]
  assert len(tagged) == 1


def test_set_parameters_rewrites_values_and_keeps_comments():
  runner = load_runner()
  nb = nbformat.read(NOTEBOOK, as_version=4)
  runner.set_parameters(nb, WORKDIR="/x/run", NUM_GALAXIES=2, DATA_DIR=None)
  cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", ()))
  lines = cell.source.splitlines()
  assert re.match(r"WORKDIR = '/x/run'\s+# Training workdir", lines[0])
  assert re.match(r"NUM_GALAXIES = 2\s+# Test galaxies", lines[1])
  assert re.match(r"DATA_DIR = None\s+# Prepared dataset", lines[2])
  namespace = {}
  exec(cell.source, namespace)  # pylint: disable=exec-used
  assert (namespace["WORKDIR"], namespace["NUM_GALAXIES"]) == ("/x/run", 2)
  with pytest.raises(KeyError, match="NUM_GALAXY"):
    runner.set_parameters(nb, NUM_GALAXY=3)


def test_has_run_decides_whether_the_notebook_trains(tiny_run, tmp_path):
  """The notebook trains the `tiny` config first exactly when `analysis.has_run` is False."""
  workdir, _, _ = tiny_run
  assert analysis.has_run(workdir)
  assert not analysis.has_run(str(tmp_path / "missing"))
  # A save that never finished (Orbax's temporary folder) is no run: the notebook trains.
  unfinished = tmp_path / "unfinished"
  shutil.copytree(os.path.join(workdir, "checkpoints", "1"),
                  unfinished / "checkpoints" / "1.orbax-checkpoint-tmp-1700000000000000")
  shutil.copy(os.path.join(workdir, "config.json"), unfinished)
  assert not analysis.has_run(str(unfinished))
  shutil.copytree(os.path.join(workdir, "checkpoints", "1"), unfinished / "checkpoints" / "1")
  assert analysis.has_run(str(unfinished))
  source = "\n".join(c.source for c in code_cells(nbformat.read(NOTEBOOK, as_version=4)))
  assert "if not analysis.has_run(WORKDIR):\n    tiny = baseline.get_config(\"tiny\")" in source


@pytest.mark.slow
def test_notebook_reads_a_tiny_run_and_draws_its_figures(tiny_run, tmp_path):
  runner = load_runner()
  workdir, _, _ = tiny_run
  out = tmp_path / "executed.ipynb"
  before = open(NOTEBOOK).read()
  run_files = {f: open(os.path.join(workdir, f), "rb").read()
               for f in ("config.json", "metrics.jsonl", "results.json")}
  checkpoints = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  # DATA_DIR None: the test split is read from the run's config.json.
  nb = runner.run(workdir, out=str(out), num=2, figures_dir=str(tmp_path / "figures"),
                  figure_names=None, timeout=600, NUM_IMAGED=3)

  assert open(NOTEBOOK).read() == before  # Executed into `out`, not in place.
  assert nbformat.read(str(out), as_version=4) == nb
  cells = code_cells(nb)
  assert all(c.execution_count is not None for c in cells)
  assert not [o for c in cells for o in c.outputs if o.output_type == "error"]
  # A run was there: the notebook read it and trained nothing (the run is the session's, shared).
  assert {f: open(os.path.join(workdir, f), "rb").read() for f in run_files} == run_files
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == checkpoints

  figures = runner.figures(nb)
  assert set(figures) == FIGURES
  for name, pngs in figures.items():
    assert len(pngs) == 1, name  # Shown once under its cell.
    image = matplotlib.image.imread(io.BytesIO(pngs[0]))
    assert min(image.shape[:2]) > 150 and image[..., :3].std() > 0.05, name
  assert sorted(os.listdir(tmp_path / "figures")) == sorted(f"notebook_{n}.png" for n in FIGURES)
  assert runner.write_figures(nb, str(tmp_path / "one"), ["spectra"]) == [
      str(tmp_path / "one" / "notebook_spectra.png")]
  with pytest.raises(KeyError, match="spectrum"):
    runner.write_figures(nb, str(tmp_path / "one"), ["spectrum"])
  # Only the figure cells draw.
  drawn = [c for c in cells if any("image/png" in o.get("data", {}) for o in c.outputs)]
  assert len(drawn) == len(FIGURES)

  # The results table beside the baselines, and the FITS table read back: 3 imaged-only galaxies.
  outputs = [o for c in cells for o in c.outputs if "data" in o]
  markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o["data"]]
  assert len(markdown) == 1 and "| test split (5 galaxies) |" in markdown[0]
  assert "colour kNN" in markdown[0]
  table_cell = next(c for c in cells if "fits-table" in c.metadata.get("tags", ()))
  text = table_cell.outputs[-1]["data"]["text/plain"]
  assert "<Table length=3>" in text and "z_mean" in text
  assert not [o for o in table_cell.outputs if o.output_type == "stream"]  # No warnings.
  # The PNGs decode from the saved notebook as they were drawn.
  spectra = next(c for c in cells if "figure-spectra" in c.metadata.get("tags", ()))
  saved = [o for o in spectra.outputs if "image/png" in o.get("data", {})][0]
  assert base64.b64decode(saved["data"]["image/png"]) == figures["spectra"][0]
