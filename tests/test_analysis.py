"""Restoring a run without its data, predicting, and the analysis script's table and figures.

One tiny run's workdir (checkpoints at steps 1 and 2, best at 2) is written once for the module.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import matplotlib.image
import numpy as np
import pytest

from astra_jax import analysis
from astra_jax import evaluate
from astra_jax import grid
from astra_jax import sharding
from astra_jax import train
from astra_jax.data import pipeline
from experiments import analyze

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def run(tiny_run):
  """conftest's `tiny_run`: (workdir, config, params at step 2) of a tiny run as training leaves
  it (states drawn on the host; what is tested here is reading them back)."""
  return tiny_run


@pytest.fixture(scope="module")
def test_split(run):
  """Every galaxy of the tiny test split (5) as eval_dataset gives it, one padded batch."""
  _, config, _ = run
  batches = list(pipeline.as_numpy(pipeline.eval_dataset(
      config.data_dir, "test", global_batch=8, extra_keys=("specobj_id", "ra", "dec"))))
  assert len(batches) == 1 and batches[0]["mask"].sum() == 5
  return batches


def test_restore_in_a_fresh_process_gives_the_saved_params(run, tmp_path):
  workdir, _, params = run
  # Two devices there (four here): restoring must not depend on the training topology.
  script = textwrap.dedent(f"""
      import os
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
      import jax, numpy as np
      from astra_jax import analysis
      out = {{}}
      for best in (False, True):
        config, model, params = analysis.restore({workdir!r}, best=best)
        assert jax.tree.leaves(params)[0].sharding.is_fully_replicated
        assert len(jax.tree.leaves(params)[0].sharding.device_set) == 2
        out.update({{f"{{best}}/{{jax.tree_util.keystr(k)}}": np.asarray(v)
                    for k, v in jax.tree_util.tree_leaves_with_path(params)}})
      _, _, first = analysis.restore({workdir!r}, step=1)
      out.update({{f"step1/{{jax.tree_util.keystr(k)}}": np.asarray(v)
                  for k, v in jax.tree_util.tree_leaves_with_path(first)}})
      np.savez({str(tmp_path / "restored.npz")!r}, **out)
  """)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, env=env, timeout=300)
  restored = np.load(tmp_path / "restored.npz")
  expected = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
  assert len(expected) > 10
  for best in ("False", "True"):
    assert {n.split("/", 1)[1] for n in restored.files if n.startswith(best)} == set(expected)
    for name, value in expected.items():
      np.testing.assert_array_equal(restored[f"{best}/{name}"], value, err_msg=name)
      assert restored[f"{best}/{name}"].dtype == value.dtype
  # Step 1 is another checkpoint: some parameter differs (the comparisons above can fail).
  assert any(not np.array_equal(restored[f"step1/{n}"], v) for n, v in expected.items())


def test_restore_errors_name_the_workdir(run, tmp_path):
  workdir, _, _ = run
  with pytest.raises(FileNotFoundError, match=r"no latest checkpoint at step 7.*\[1, 2\]"):
    analysis.restore(workdir, step=7)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=f"{re.escape(str(empty))}: no config.json"):
    analysis.restore(str(empty))
  (empty / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
  with pytest.raises(FileNotFoundError, match=f"{re.escape(str(empty))}: no best checkpoint"):
    analysis.restore(str(empty), best=True)
  assert sorted(os.listdir(empty)) == ["config.json"]  # Nothing was created.


def test_predict_matches_collect_predictions(run, test_split):
  workdir, config, _ = run
  _, model, params = analysis.restore(workdir)
  mesh = sharding.create_mesh()
  want = evaluate.collect_predictions(train.make_eval_step(config, model, mesh), params,
                                      test_split, mesh, model)
  images = test_split[0]["image"][test_split[0]["mask"]]
  fluxes = test_split[0]["aperture_fluxes"][test_split[0]["mask"]]
  fibers = test_split[0]["fiber_diameter"][test_split[0]["mask"]]
  # batch_size 3 on 4 devices -> batches of 4: one full batch and one padded with 3 zeros.
  got = analysis.predict(model, params, images, fluxes, batch_size=3, return_attention=True,
                         fiber_diameter=fibers)
  # The fiber is the spectrum's, asked for: never guessed, and only one the model learnt.
  with pytest.raises(ValueError, match="pass fiber_diameter"):
    analysis.predict(model, params, images, fluxes)
  with pytest.raises(ValueError, match=r"fiber_diameter \[1.5\]"):
    analysis.predict(model, params, images, fluxes, fiber_diameter=1.5)
  n, num_bins = len(images), model.num_z_bins
  grid_size = config.image_size // config.model.patch_size
  shapes = dict(flux=(n, grid.NUM_PIXELS), spectrum=(n, grid.NUM_PIXELS), log_norm=(n,),
                z_pdf=(n, num_bins), z_mean=(n,), z_mode=(n,), z_median=(n,), z_lo=(n,),
                z_hi=(n,),
                attention=(n, grid_size, grid_size))
  if model.amplitude_bins:  # The binned amplitude's PDF and the anchor its bins correct.
    shapes.update(log_norm_pdf=(n, model.amplitude_bins), log_norm_anchor=(n,))
  assert {k: v.shape for k, v in got.items()} == shapes
  # float32 round-off of different batch shapes, in the normalised spectrum times the norm: the
  # flux reaches ~3000 here, so a pixel near 0 can be off by ~1e-6 of the largest flux.
  np.testing.assert_allclose(got["flux"], want["pred_flux"], rtol=1e-5,
                             atol=1e-6 * np.abs(want["pred_flux"]).max())
  for key in ("spectrum", "log_norm", "z_pdf", "z_mean", "z_mode", "z_median"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)
  if model.amplitude_bins:
    np.testing.assert_allclose(got["log_norm_pdf"].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(got["log_norm_anchor"], want["log_norm_anchor"], rtol=1e-5,
                               atol=1e-5)
  # Each head's map sums to 1 minus the summary token's self-weight.
  total = got["attention"].sum(axis=(1, 2))
  assert np.all((total > 0) & (total <= 1 + 1e-5))

  # The 68 % interval lies inside the bins and, for these broad PDFs, brackets the mean. (The
  # mode need not be inside it: a skewed PDF can peak in a bin holding under 16 % of the mass.)
  assert np.all((0 <= got["z_lo"]) & (got["z_lo"] < got["z_hi"]) & (got["z_hi"] <= model.z_max))
  assert np.all((got["z_lo"] <= got["z_mean"]) & (got["z_mean"] <= got["z_hi"]))
  # ... and its CDF values are 0.16 and 0.84 exactly (histogram CDF, linear within a bin).
  edges = analysis.z_edges(model)
  np.testing.assert_allclose(evaluate.pit(got["z_pdf"], edges, got["z_lo"]), 0.16, atol=1e-5)
  np.testing.assert_allclose(evaluate.pit(got["z_pdf"], edges, got["z_hi"]), 0.84, atol=1e-5)


def test_z_interval_of_known_pdfs():
  edges = np.linspace(0.0, 0.6, 7)  # Bins 0.1 wide.
  uniform = np.full(6, 1 / 6)
  delta = np.eye(6)[2] * 1.0       # All mass in [0.2, 0.3].
  halves = np.array([0.5, 0, 0, 0, 0, 0.5])
  lo, hi = analysis.z_interval(np.stack([uniform, delta, halves]), edges)
  np.testing.assert_allclose(lo, [0.16 * 0.6, 0.2 + 0.016, 0.032], atol=1e-12)
  np.testing.assert_allclose(hi, [0.84 * 0.6, 0.2 + 0.084, 0.5 + 0.068], atol=1e-12)


def test_read_metrics_keeps_the_last_record_of_a_step(tmp_path):
  records = [dict(step=1, split="train", loss=3.0, loss_spectrum=1.0),
             dict(step=2, split="train", loss=2.0, loss_spectrum=0.9),
             dict(step=2, split="validation", loss=2.5, spectrum=1.1),
             dict(step=2, split="train", loss=1.5, loss_spectrum=0.8)]  # Resumed from step 1.
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  m = analysis.read_metrics(str(tmp_path))
  np.testing.assert_array_equal(m["train"]["step"], [1, 2])
  np.testing.assert_array_equal(m["train"]["loss"], [3.0, 1.5])
  np.testing.assert_array_equal(m["validation"]["loss_spectrum"], [1.1])


@pytest.mark.filterwarnings("error::astropy.io.fits.verify.VerifyWarning")  # Truncated cards.
def test_analyze_writes_the_table_and_figures(run, test_split, tmp_path):
  from astropy.io import fits  # pylint: disable=g-import-not-at-top
  workdir, config, _ = run
  out_dir = str(tmp_path / "analysis")
  paths = analyze.analyze(workdir, split="test", num=3, out_dir=out_dir, batch_size=4)
  names = ("predictions.fits", "spectra.png", "redshift.png", "loss.png", "attention.png")
  assert sorted(os.listdir(out_dir)) == sorted(names)
  assert sorted(os.path.basename(p) for p in paths.values()) == sorted(names)

  truth = {k: v[test_split[0]["mask"]] for k, v in test_split[0].items()}
  n, num_bins = 5, config.model.num_z_bins
  with fits.open(os.path.join(out_dir, "predictions.fits")) as hdus:
    assert [h.name for h in hdus] == ["PRIMARY", "PREDICTIONS", "Z_EDGES"]
    table, header = hdus["PREDICTIONS"].data, hdus["PREDICTIONS"].header
    assert table.columns.names == ["specobj_id", "ra", "dec", "z_true", "z_mean", "z_mode",
                                   "z_lo", "z_hi", "z_pdf", "flux_pred", "flux_true", "weight"]
    assert len(table) == n
    for name in ("flux_pred", "flux_true", "weight"):
      assert table[name].shape == (n, grid.NUM_PIXELS)
    assert table["z_pdf"].shape == (n, num_bins)
    units = {c.name: c.unit for c in table.columns}
    assert units["flux_pred"] == units["flux_true"] == "1e-17 erg/s/cm^2/Angstrom"
    assert units["ra"] == units["dec"] == "deg"
    assert (header["LOGLAM0"], header["DLOGLAM"], header["NPIX"]) == (3.58, 1e-4, 4000)
    assert "vacuum" in header.comments["LOGLAM0"] and header["SPLIT"] == "test"
    np.testing.assert_allclose(hdus["Z_EDGES"].data, np.linspace(0, config.model.z_max,
                                                                 num_bins + 1))
    # The rows are the split's galaxies in order, with their truth.
    assert list(table["specobj_id"]) == [s.decode() for s in truth["specobj_id"]]
    np.testing.assert_array_equal(table["ra"], truth["ra"])
    np.testing.assert_array_equal(table["z_true"], truth["z"])
    np.testing.assert_array_equal(table["flux_true"], truth["flux"])
    np.testing.assert_array_equal(table["weight"], truth["weight"])
    np.testing.assert_allclose(table["z_pdf"].sum(axis=1), 1.0, rtol=1e-5)
    assert np.all((table["z_lo"] <= table["z_mean"]) & (table["z_mean"] <= table["z_hi"]))
  for name in names[1:]:
    path = os.path.join(out_dir, name)
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 200, name
    assert image[..., :3].std() > 0.05, name  # Not a blank canvas.


def test_has_run_needs_config_and_a_checkpoint(run, tmp_path):
  workdir, _, _ = run
  assert analysis.has_run(workdir)
  assert not analysis.has_run(str(tmp_path / "missing"))
  (tmp_path / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
  assert not analysis.has_run(str(tmp_path))      # config.json alone: training never saved.
  (tmp_path / "checkpoints").mkdir()
  assert not analysis.has_run(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["checkpoints", "config.json"]  # Nothing was created.


def test_read_results_gives_back_what_training_wrote(tmp_path):
  results = {"ASTRA": {"spectrum_r2": 0.5, "z_median_sigma_mad": 0.02, "z_median_n": 7.0},
             "colour kNN": {"spectrum_r2": 0.6, "z_median_sigma_mad": 0.03}}
  table = evaluate.write_results(str(tmp_path), results)
  split, read = analysis.read_results(str(tmp_path))
  assert (split, read) == ("test", results)
  assert evaluate.results_markdown(read, split) == table
  assert "| test split (7 galaxies) |" in table
  with pytest.raises(FileNotFoundError, match="no results.json"):
    analysis.read_results(str(tmp_path / "none"))


def test_imaged_only_mock_keeps_images_and_truth(tmp_path):
  from astra_jax import predict  # pylint: disable=g-import-not-at-top
  out = analysis.imaged_only_mock(str(tmp_path / "cutouts"), 2, seed=11)
  galaxies = sorted(n for n in os.listdir(out) if n.startswith("Galaxy_"))
  assert len(galaxies) == 2 and sorted(set(os.listdir(out)) - set(galaxies)) == ["truth.csv"]
  for name in galaxies:
    specobj_id = name[len("Galaxy_"):]
    assert os.listdir(os.path.join(out, name)) == ["images"]
    assert sorted(os.listdir(os.path.join(out, name, "images"))) == sorted(
        f"{specobj_id}_{b}.fits" for b in "grizy")
  jobs, rejected = predict.find_galaxies(out, ("g", "r", "i", "z", "y"))
  assert len(jobs) == 2 and not rejected
  truth = predict.read_truth(predict.find_truth(out))
  assert sorted(truth) == sorted(n[len("Galaxy_"):] for n in galaxies)
  assert all(0 < z < 1 for z in truth.values())


def test_a_run_read_from_a_url(run, ram_copy, tmp_path):
  # A notebook pointed at a bucket: the run copied to ram:// (read through epath, as gs:// is)
  # reads as the local workdir does. Orbax lists its steps there too; restoring cannot be tried
  # (TensorStore knows no ram://).
  workdir, _, _ = run
  url = ram_copy(workdir, "run")
  assert analysis.load_config(url) == analysis.load_config(workdir)
  assert analysis.read_results(url) == analysis.read_results(workdir)
  got, want = analysis.read_metrics(url), analysis.read_metrics(workdir)
  assert got.keys() == want.keys()
  for split in want:
    assert got[split].keys() == want[split].keys()
    for key in want[split]:
      np.testing.assert_array_equal(got[split][key], want[split][key])
  assert analysis.has_run(url)
  # Its JSON files alone: no checkpoint, no run.
  (tmp_path / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
  assert not analysis.has_run(ram_copy(tmp_path, "json_only"))
  assert not analysis.has_run(f"{url}/missing")
  with pytest.raises(FileNotFoundError, match="no results.json"):
    analysis.read_results(f"{url}/missing")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    analysis.load_config(f"{url}/missing")
