"""notebooks/analysis.ipynb runs top to bottom against a tiny run and draws its figures.

The notebook is executed as `notebooks/run.py` executes it (a fresh python3 kernel, the cell
tagged "parameters" rewritten): with no run at its workdir, it trains the `tiny` config on the
tiny dataset first. The kernel inherits this process's environment: the 4 fake CPU devices and
the tests' persistent compilation cache.
"""

import base64
import importlib.util
import io
import os
import re

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


@pytest.mark.slow
def test_notebook_trains_a_tiny_run_and_draws_its_figures(tiny_dataset, tmp_path):
  runner = load_runner()
  workdir = tmp_path / "run"
  out = tmp_path / "executed.ipynb"
  before = open(NOTEBOOK).read()
  nb = runner.run(str(workdir), out=str(out), num=2, figures_dir=str(tmp_path / "figures"),
                  figure_names=None, timeout=600, DATA_DIR=tiny_dataset, NUM_IMAGED=3)

  assert open(NOTEBOOK).read() == before  # Executed into `out`, not in place.
  assert nbformat.read(str(out), as_version=4) == nb
  cells = code_cells(nb)
  assert all(c.execution_count is not None for c in cells)
  assert not [o for c in cells for o in c.outputs if o.output_type == "error"]
  # No run was there: the notebook trained one and restored it.
  assert analysis.has_run(str(workdir))
  assert os.path.exists(workdir / "results.json")

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
