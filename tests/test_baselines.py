"""The photometric baselines on a synthetic survey whose redshift follows its colours."""

import numpy as np
import pytest

from astra_jax import baselines
from astra_jax import evaluate
from astra_jax import grid
from astra_jax import photometry

#: Magnitudes per unit redshift in g,r,i,z,y: galaxies redden with z, so colours measure it.
_SLOPE = np.array([6.0, 3.0, 1.5, 0.8, 0.0])
#: Spectrum norm / r-band 3 arcsec aperture flux through a 3 arcsec fiber.
_RATIO = 3.0


def _survey(n, seed):
  """A split of `n` galaxies: grizy colours linear in z (+ 0.01 mag noise per band), Gaussian
  profiles of random size, spectra whose shape follows z and whose norm is 3 x the r 3" flux
  through a 3 arcsec fiber, 0.6 x that through a 2 arcsec one (a third of the galaxies)."""
  rng = np.random.default_rng(seed)
  z = rng.uniform(0.02, 0.3, n)
  r_total = rng.uniform(16.0, 18.0, n)
  mags = r_total[:, None] + (_SLOPE - _SLOPE[1]) * z[:, None] + rng.normal(0, 0.01, (n, 5))
  size = rng.uniform(0.8, 3.0, n)                                    # Gaussian sigma, arcsec.
  radius = np.array(photometry.DIAMETERS_ARCSEC) / 2
  enclosed = 1 - np.exp(-0.5 * (radius[None, :] / size[:, None]) ** 2)  # (n, apertures)
  fluxes = 10 ** (-0.4 * (mags[:, :, None] - 22.5)) * enclosed[:, None, :]
  aperture_r = fluxes[:, baselines.R_BAND, photometry.DIAMETERS_ARCSEC.index(3.0)]
  x = np.linspace(0, 1, grid.NUM_PIXELS)
  shape = 1 + x[None, :] * (1 + 5 * z[:, None])
  fiber = np.where(rng.uniform(size=n) < 1 / 3, 2.0, 3.0)
  ratio = np.where(fiber == 2.0, 0.6 * _RATIO, _RATIO)
  flux = ratio[:, None] * aperture_r[:, None] * shape / shape.mean(axis=1, keepdims=True)
  return {"flux": flux.astype(np.float32), "weight": np.ones_like(flux, np.float32),
          "aperture_flux": fluxes[:, :, 1].astype(np.float32),
          photometry.KEY: fluxes.astype(np.float32), "z": z.astype(np.float32),
          "has_z": np.ones(n, bool), "fiber_diameter": fiber.astype(np.float32)}


@pytest.fixture(scope="module")
def survey():
  return _survey(500, 0), _survey(100, 1)


@pytest.fixture(scope="module")
def mlp(survey):
  return baselines.PhotoMLP(seed=3).fit(survey[0])


def _sigma_mad(pred, estimator="median"):
  return evaluate.redshift_metrics(pred[f"z_{estimator}"], pred["z"])["sigma_mad"]


def test_photo_trees_beat_the_mean_spectrum_baseline(survey):
  train, test = survey
  floor = _sigma_mad(baselines.MeanSpectrum().fit(train).predict(test))
  pred = baselines.PhotoTrees().fit(train).predict(test)
  assert _sigma_mad(pred) < 0.25 * floor
  assert pred["spectrum"].shape == pred["pred_flux"].shape == (100, grid.NUM_PIXELS)
  assert pred["z_mean"].shape == pred["z_mode"].shape == pred["log_norm"].shape == (100,)
  assert evaluate.scalar_metrics(pred)["spectrum_r2"] > 0.99


def test_photo_mlp_beats_the_mean_spectrum_baseline_with_a_pdf(survey, mlp):
  train, test = survey
  floor = _sigma_mad(baselines.MeanSpectrum().fit(train).predict(test))
  pred = mlp.predict(test)
  for estimator in ("median", "mean", "mode"):
    assert _sigma_mad(pred, estimator) < 0.25 * floor, estimator
  assert pred["z_pdf"].shape == (100, len(mlp.z_edges) - 1)
  np.testing.assert_allclose(pred["z_pdf"].sum(axis=1), 1.0, rtol=1e-5)
  assert pred["spectrum"].shape == (100, grid.NUM_PIXELS) and pred["z_median"].shape == (100,)
  scalars = evaluate.scalar_metrics(pred, mlp.z_edges)
  assert np.isfinite(scalars["z_crps"]) and scalars["spectrum_r2"] > 0.99


def test_photo_mlp_is_deterministic_given_its_seed(survey, mlp):
  train, test = survey
  again = baselines.PhotoMLP(seed=3).fit(train)
  np.testing.assert_array_equal(again.predict(test)["z_pdf"], mlp.predict(test)["z_pdf"])
  other = baselines.PhotoMLP(seed=4, epochs=2).fit(train)
  assert not np.array_equal(other.predict(test)["z_pdf"], mlp.predict(test)["z_pdf"])


def test_neighbour_spectra_of_the_training_galaxies_are_their_own(survey):
  train, _ = survey
  features = baselines.photometric_features(train)
  spectra = baselines.NeighbourSpectra(features, train, k=1)
  np.testing.assert_array_equal(spectra.neighbours(features[:10])[:, 0], np.arange(10))
  spectrum, log_norm = spectra.predict(features[:10], {k: v[:10] for k, v in train.items()})
  np.testing.assert_allclose(spectrum * 10.0 ** log_norm[:, None], train["flux"][:10],
                             rtol=1e-4)


def test_pdf_median_interpolates_within_a_bin():
  edges = np.array([0.0, 0.1, 0.2, 0.3])
  pdf = np.array([[0.0, 1.0, 0.0], [0.25, 0.5, 0.25], [0.5, 0.0, 0.5], [0.2, 0.2, 0.6]])
  np.testing.assert_allclose(baselines.pdf_median(pdf, edges), [0.15, 0.15, 0.1, 0.2 + 0.1 / 6],
                             atol=1e-7)


def test_a_dataset_without_aperture_fluxes_is_refused_clearly(survey):
  train = {k: v for k, v in survey[0].items() if k != photometry.KEY}
  for model in (baselines.PhotoTrees(), baselines.PhotoMLP()):
    with pytest.raises(KeyError, match="aperture_fluxes"):
      model.fit(train)


def _true_log_norm(data):
  return np.log10(np.mean(data["flux"], axis=1))


@pytest.mark.parametrize("make", [baselines.MeanSpectrum, baselines.ColourKNN,
                                  baselines.PhotoTrees])
def test_each_baseline_takes_its_amplitude_from_galaxies_of_the_same_fiber(survey, make):
  train, test = survey
  assert set(np.unique(test["fiber_diameter"])) == {2.0, 3.0}
  pred = make().fit(train).predict(test)
  # The ratio is one number per fiber here, so the same-fiber median recovers each norm; one
  # median over both fibers would be off by log10(0.6) = -0.22 dex for one of them.
  np.testing.assert_allclose(pred["log_norm"], _true_log_norm(test), atol=1e-4)
  swapped = dict(test, fiber_diameter=5.0 - test["fiber_diameter"])
  shift = make().fit(train).predict(swapped)["log_norm"] - pred["log_norm"]
  np.testing.assert_allclose(shift, np.where(test["fiber_diameter"] == 2.0, 1, -1)
                             * -np.log10(0.6), atol=1e-4)


def test_a_fiber_no_training_galaxy_had_takes_neighbours_among_all(survey):
  train, test = survey
  features = baselines.photometric_features(train)
  amplitudes = baselines.FiberAmplitudes(features, train, k=len(features))
  log_norm = amplitudes.log_norm(baselines.photometric_features(test)[:3], np.full(3, 1.5),
                                 test["aperture_flux"][:3, baselines.R_BAND])
  all_ratio = np.median(10 ** _true_log_norm(train) / train["aperture_flux"][:, baselines.R_BAND])
  np.testing.assert_allclose(
      log_norm, np.log10(all_ratio * test["aperture_flux"][:3, baselines.R_BAND]), rtol=1e-5)
