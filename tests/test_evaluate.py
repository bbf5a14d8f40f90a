"""Metric functions against hand-computed cases, and the baselines on constructed data."""

import numpy as np
import pytest

from astra_jax import baselines
from astra_jax import evaluate
from astra_jax import grid


def test_redshift_metrics_by_hand():
  z_true = np.array([0.0, 0.0, 0.0, 1.0])
  z_pred = np.array([0.01, -0.01, 0.02, 1.2])           # dz = 0.01, -0.01, 0.02, 0.1
  m = evaluate.redshift_metrics(z_pred, z_true)
  # median(dz) = 0.015; |dz - 0.015| = 0.005, 0.025, 0.005, 0.085 -> median 0.015.
  assert m["bias"] == pytest.approx(0.015)
  assert m["sigma_mad"] == pytest.approx(1.4826 * 0.015)
  assert m["outlier_fraction"] == 0.25 and m["n"] == 4


def test_crps_and_pit_of_a_one_bin_pdf():
  edges = np.array([0.0, 0.1, 0.2, 0.3])
  pdf = np.array([[0.0, 1.0, 0.0]] * 3)                  # Uniform on [0.1, 0.2].
  z = np.array([0.15, 0.12, 0.35])
  # Uniform U(a, b) and truth y inside: ((y-a)^3 + (b-y)^3) / (3 (b-a)^2); beyond b: w/3 + y - b.
  expected = [0.1 / 12, (0.02**3 + 0.08**3) / (3 * 0.01), 0.1 / 3 + 0.15]
  np.testing.assert_allclose(evaluate.crps(pdf, edges, z), expected, rtol=1e-9)
  np.testing.assert_allclose(evaluate.pit(pdf, edges, z), [0.5, 0.2, 1.0])


def test_spectrum_metrics_by_hand():
  true = np.array([[1.0, 2.0, 3.0, 9.0], [2.0, 2.0, 2.0, 2.0]])
  pred = np.array([[1.0, 2.0, 4.0, 0.0], [2.0, 2.0, 2.0, 5.0]])
  weight = np.array([[1.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])   # Galaxy 2: nothing valid.
  m = evaluate.spectrum_metrics(pred, true, weight)
  assert m["mse"] == pytest.approx(2.0 / 4.0)            # sum w r^2 / sum w = 2 / 4.
  assert m["r2"] == pytest.approx(1 - 1.0 / 2.0)         # SS_tot around the mean 2: 1 + 0 + 1.
  ivar = np.array([[4.0, 0.0, 1.0, 0.0]])
  assert evaluate.reduced_chi2(pred[:1], true[:1], ivar) == pytest.approx(1.0 / 2)
  assert not evaluate.weight_is_ivar(np.array([[1.0, 0.0, 1.0]]))
  assert evaluate.weight_is_ivar(ivar)


def test_synthetic_band_errors_of_a_scaled_spectrum():
  wave = grid.wavelength()
  flux = np.tile(1e4 / wave**2, (2, 1)) * 100           # Flat in f_nu, in 1e-17 erg/s/cm^2/A.
  weight = np.ones_like(flux)
  weight[1, wave < 5000] = 0                            # Galaxy 2 does not cover the g filter.
  errors = evaluate.synthetic_band_errors(1.1 * flux, flux, weight)
  assert set(errors) == {"g", "r", "i", "z"}
  for err in errors.values():
    assert err == pytest.approx(0.1, rel=1e-6)
  only_g = evaluate.synthetic_band_errors(1.1 * flux[1:], flux[1:], weight[1:])
  assert np.isnan(only_g["g"]) and only_g["r"] == pytest.approx(0.1, rel=1e-6)


def _fake_split(n, rng):
  z = rng.uniform(0.05, 0.3, n).astype(np.float32)
  shape = np.linspace(1, 2, grid.NUM_PIXELS)
  norm = rng.uniform(1, 10, n)
  # Colours that follow z; the r band (index 1) holds exactly norm / 3.
  aperture = np.tile(norm[:, None] / 3.0, (1, 5)) * 10 ** (-0.4 * z[:, None] * (np.arange(5) - 1))
  return {"flux": (norm[:, None] * shape[None] / shape.mean()).astype(np.float32),
          "weight": np.ones((n, grid.NUM_PIXELS), np.float32),
          "aperture_flux": aperture.astype(np.float32), "z": z, "has_z": np.ones(n, bool),
          "fiber_diameter": np.full(n, 3.0, np.float32)}


def test_mean_spectrum_baseline_scales_by_the_r_aperture():
  rng = np.random.default_rng(0)
  train, test = _fake_split(50, rng), _fake_split(5, rng)
  pred = baselines.MeanSpectrum().fit(train).predict(test)
  # Every spectrum has the same shape and norm = 3 x the r aperture flux: recovered exactly.
  np.testing.assert_allclose(pred["pred_flux"], test["flux"], rtol=1e-5)
  assert np.all(pred["z_mean"] == np.median(train["z"]))
  assert evaluate.scalar_metrics(pred)["spectrum_r2"] == pytest.approx(1.0, abs=1e-6)


def test_colour_knn_finds_the_galaxy_with_the_same_colours():
  rng = np.random.default_rng(1)
  train = _fake_split(200, rng)
  knn = baselines.ColourKNN(k=1).fit(train)
  test = {k: v[:10] for k, v in train.items()}
  np.testing.assert_array_equal(knn.neighbours(test)[:, 0], np.arange(10))
  np.testing.assert_allclose(knn.predict(test)["z_mean"], train["z"][:10])
  # With more neighbours the redshift is their median: close, and no longer exact.
  z = baselines.ColourKNN(k=10).fit(train).predict(test)["z_mean"]
  assert np.max(np.abs(z - train["z"][:10])) < 0.05
  assert np.max(np.abs(z - train["z"][:10])) > 0


def _with_aperture_fluxes(split):
  """`split` with `aperture_fluxes` (N, 5, 5): its 3" fluxes grown outwards like a Gaussian of
  sigma 1.5"."""
  from astra_jax import photometry  # pylint: disable=g-import-not-at-top
  radius = np.array(photometry.DIAMETERS_ARCSEC) / 2
  growth = (1 - np.exp(-0.5 * (radius / 1.5) ** 2)) / (1 - np.exp(-0.5 * (1.5 / 1.5) ** 2))
  fluxes = split["aperture_flux"][:, :, None] * growth[None, None, :]
  return {**split, photometry.KEY: fluxes.astype(np.float32)}


def _compare(monkeypatch, splits):
  monkeypatch.setattr(baselines, "load_split", lambda dataset_dir, split: splits[split])
  return evaluate.compare_with_baselines("unused", {"z_mean_sigma_mad": 0.01, "z_mean_n": 40})


def test_compare_leaves_out_the_photometric_baselines_without_aperture_fluxes(monkeypatch,
                                                                               caplog):
  rng = np.random.default_rng(2)
  splits = {"train": _fake_split(100, rng), "test": _fake_split(40, rng)}
  results = _compare(monkeypatch, splits)
  assert list(results) == ["ASTRA", "mean spectrum", "colour kNN"]
  assert "aperture_fluxes" in caplog.text and "photo trees and photo MLP" in caplog.text
  table = evaluate.results_markdown(results)
  assert table.splitlines()[0].endswith("| ASTRA | mean spectrum | colour kNN |")
  assert "photo" not in table


def test_compare_scores_every_baseline_on_the_same_split(monkeypatch):
  rng = np.random.default_rng(3)
  splits = {"train": _with_aperture_fluxes(_fake_split(200, rng)),
            "test": _with_aperture_fluxes(_fake_split(40, rng))}
  results = _compare(monkeypatch, splits)
  assert list(results) == list(evaluate.PREDICTORS)
  for name in evaluate.PREDICTORS[1:]:
    assert results[name]["z_mean_n"] == 40 and np.isfinite(results[name]["z_median_sigma_mad"])
  # The point estimators' PDF median is their point estimate; the MLP's PDF is scored too.
  knn = results["colour kNN"]
  assert knn["z_median_sigma_mad"] == knn["z_mean_sigma_mad"] and "z_crps" not in knn
  assert np.isfinite(results["photo MLP"]["z_crps"])
  lines = evaluate.results_markdown(results).splitlines()
  assert lines[0] == ("| test split (40 galaxies) | better | ASTRA | mean spectrum | colour kNN "
                      "| photo trees | photo MLP |")
  median_row = next(line for line in lines if "(PDF median)" in line)
  assert median_row.split(" | ")[2] == "–"                 # ASTRA's scalars have no median.
  # The headline outlier fraction and bias are those of each predictor's PDF median.
  eta_row = next(line for line in lines if "outlier fraction" in line)
  assert eta_row.split(" | ")[-1] == f"{results['photo MLP']['z_median_outlier_fraction']:.4g} |"
  assert len(lines) == 2 + sum(1 for key, _, _ in evaluate.TABLE_ROWS
                               if any(key in results[p] for p in results))
