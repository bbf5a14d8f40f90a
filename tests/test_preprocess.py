"""Tests of astra_jax.data.preprocess (pure numpy)."""

import dataclasses
import pickle

import numpy as np
import pytest

from astra_jax import grid
from astra_jax.data import mock
from astra_jax.data import preprocess as pp


def noisy_image(sigma=3.0, shape=(288, 288), seed=0, source=True):
  """Gaussian sky noise + (optionally) a bright extended source and hot pixels."""
  rng = np.random.default_rng(seed)
  image = rng.normal(0.0, sigma, shape)
  if source:
    y, x = np.mgrid[:shape[0], :shape[1]]
    image += 1000 * sigma * np.exp(-((x - 140) ** 2 + (y - 150) ** 2) / (2 * 15.0 ** 2))
    image[rng.integers(0, shape[0], 50), rng.integers(0, shape[1], 50)] = 1e4 * sigma
  return image.astype(np.float32)


# --------------------------------------------------------------------------- images


def test_asinh_matches_numpy():
  x = np.concatenate([np.float32([0, -0.0, 1e-30, -1e-8, 1e-4, 0.5, 1e10, -3e38, 3.4e38, 1e19]),
                      np.logspace(-6, 38, 20000).astype(np.float32),
                      -np.logspace(-6, 3, 20000).astype(np.float32)])
  ref = np.arcsinh(x.astype(np.float64))
  got = pp.asinh(x)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, ref, rtol=5e-7, atol=3e-7)
  in_place = x.copy()
  assert pp.asinh(in_place, out=in_place) is in_place
  np.testing.assert_array_equal(in_place, got)


def test_ps1_sky_sigma_from_the_published_depth_and_seeing():
  # sigma_pix = f5 / (5 sqrt(NEA)), NEA = 4 pi (FWHM / 2.355 / 0.25")^2 (the docstring's table).
  got = [pp.ps1_sky_sigma_nmgy(b) for b in grid.PS1_BANDS]
  np.testing.assert_allclose(got, [0.012136, 0.014649, 0.017220, 0.037323, 0.089692], rtol=1e-4)
  np.testing.assert_allclose(pp.ps1_softening_nmgy(("y", "g"), 2.5), [2.5 * got[4], 2.5 * got[0]])
  with pytest.raises(ValueError, match="'u'"):
    pp.ps1_softening_nmgy(("u", "g"), 2.5)
  with pytest.raises(ValueError, match="> 0"):
    pp.ps1_softening_nmgy(("g",), 0.0)


def test_zero_point_magzero_else_exptime_else_nan():
  assert pp.zero_point({"MAGZERO": 31.5, "EXPTIME": 100.0}) == 31.5
  assert pp.zero_point({"EXPTIME": 100.0}) == pytest.approx(30.0)
  assert pp.zero_point({"MAGZERO": float("nan"), "EXPTIME": 100.0}) == pytest.approx(30.0)
  for header in ({}, {"EXPTIME": 0.0}, {"EXPTIME": -5.0}, {"MAGZERO": "n/a"},
                 {"EXPTIME": float("inf")}, {"MAGZERO": None, "EXPTIME": None}):
    assert np.isnan(pp.zero_point(header)), header
  np.testing.assert_allclose(pp.zero_points([{"MAGZERO": 30.0}, {"EXPTIME": 10.0}]), [30.0, 27.5])


def test_stretch_is_asinh_of_nanomaggies_over_the_softening():
  images = np.stack([noisy_image(1.0, seed=1), noisy_image(5.0, seed=2)])
  images[1, 3, 4] = np.nan
  images[1, 5, 6] = np.inf
  zps, softening = [31.0, 28.0], [0.03, 0.2]
  out = pp.stretch(images, zps, softening)
  assert out.shape == images.shape and out.dtype == np.float32
  for b in range(2):
    nmgy = np.nan_to_num(images[b].astype(np.float64), posinf=0) * 10 ** (-0.4 * (zps[b] - 22.5))
    np.testing.assert_allclose(out[b], np.arcsinh(nmgy / softening[b]), rtol=1e-6, atol=3e-7)
  assert out[1, 3, 4] == 0 and out[1, 5, 6] == 0 and np.all(np.isfinite(out))
  assert np.isnan(images[1, 3, 4]) and np.isinf(images[1, 5, 6])  # The input is untouched.
  with pytest.raises(ValueError, match="zero points and softenings"):
    pp.stretch(images, zps[:1], softening)
  with pytest.raises(ValueError, match="softening_nmgy"):
    pp.stretch(images, zps, [0.03, 0.0])
  with pytest.raises(ValueError):
    pp.stretch(images[0], zps, softening)  # not (bands, H, W)


def test_a_scaled_copy_gives_identical_inputs_in_nanomaggies():
  # The same sky in other units: counts x k with the zero point raised by 2.5 log10 k, a
  # different k in each band (as stacks of different depth have). Both give asinh(f / softening)
  # of the same nanomaggies f (the old stretch, per cutout sky sigma, gave neither the same
  # colours nor that scale).
  nmgy = np.stack([noisy_image(0.02, seed=s) for s in range(3)]).astype(np.float64)
  softening = np.array(pp.ps1_softening_nmgy(("g", "r", "i"), 2.5))
  zps = np.array([30.1, 31.7, 29.4])
  counts = (nmgy * 10 ** (0.4 * (zps - 22.5))[:, None, None]).astype(np.float32)
  want = np.arcsinh(nmgy / softening[:, None, None])
  base = pp.stretch(counts, zps, softening)
  np.testing.assert_allclose(base, want, rtol=1e-6, atol=3e-7)  # pp.asinh: see its test.
  k = np.array([4.0, 0.25, 2.0])  # Powers of two: the copy's counts are exact, so is its input.
  np.testing.assert_array_equal(
      pp.stretch(counts * k[:, None, None].astype(np.float32), zps + 2.5 * np.log10(k), softening),
      base)
  k = np.array([0.37, 3.3, 1.7])  # Else equal to float32 rounding.
  np.testing.assert_allclose(
      pp.stretch(counts * k[:, None, None].astype(np.float32), zps + 2.5 * np.log10(k), softening),
      base, rtol=1e-6, atol=3e-7)


def test_a_shallower_copy_gives_the_same_input_within_the_noise_where_bright():
  # One mock galaxy (r = 15.4) observed twice: its stack, and one with a quarter of the epochs
  # (14, 10, 19, 14, 14 -> 3, 2, 4, 3, 3: ~1/4.7 of the counts per nanomaggy, 2.2x the noise
  # relative to the signal at least; mock.render_images).
  rng = np.random.default_rng(11)
  gal = next(g for g in (mock.sample_galaxy(rng) for _ in range(50)) if g.r_mag() < 16.0)
  deep = mock.sample_conditions(rng, "SDSS")
  shallow = dataclasses.replace(deep, num_epochs=np.maximum(deep.num_epochs // 4, 1))
  softening = np.array(pp.ps1_softening_nmgy(grid.PS1_BANDS, 2.5))[:, None, None]
  x, sd_f = {}, {}
  for name, cond in (("deep", deep), ("shallow", shallow)):
    rendered = mock.render_images(gal, cond, noise_rng=np.random.default_rng(len(name)))
    x[name] = pp.stretch(rendered.images, cond.magzero, softening[:, 0, 0])
    per_count = pp.nmgy_per_count(cond.magzero)[:, None, None]
    f = rendered.model * per_count                  # Noiseless nanomaggies: the same for both.
    sd_f[name] = np.sqrt(cond.sky_sigma[:, None, None] ** 2 + np.maximum(rendered.model, 0)
                         ) * per_count               # Pixel noise, nanomaggies.
  assert np.all(sd_f["shallow"] > 1.7 * sd_f["deep"])
  # Bright: f > 10 softenings. There d asinh(f / s) = df / sqrt(f^2 + s^2), so the difference of
  # the two inputs has sd sqrt(sd_deep^2 + sd_shallow^2) / sqrt(f^2 + s^2) per pixel (measured:
  # 0.99 sd). Each pixel within 5 sd (1124 pixels: odds ~6e-4 of one 5 sd excursion), their mean
  # within 5 sd of the mean. The old stretch, over each cutout's own sky sigma, differed by 0.75
  # there on average (~0.5 ln 4.7: the shallow copy's signal over its noise is 2.2x lower),
  # up to 34 sd.
  bright = f > 10 * softening
  sd = np.sqrt(sd_f["deep"] ** 2 + sd_f["shallow"] ** 2) / np.sqrt(f**2 + softening**2)
  z = ((x["deep"] - x["shallow"]) / sd)[bright]
  assert z.size > 1000 and bright.any(axis=(1, 2)).all(), z.size
  assert np.abs(z).max() < 5.0, np.abs(z).max()
  assert abs(z.mean()) < 5.0 / np.sqrt(z.size), z.mean()


def test_stretch_rejects_no_zero_point_and_mostly_nonfinite():
  images = np.stack([noisy_image(1.0), noisy_image(1.0, seed=3)])
  for zps in ([30.0, np.nan], [30.0, np.inf]):
    with pytest.raises(pp.PreprocessError) as excinfo:
      pp.stretch(images, zps, [0.03, 0.03])
    assert excinfo.value.reason == pp.NO_ZERO_POINT == "no usable zero point (MAGZERO or EXPTIME)"
    assert excinfo.value.band == 1

  images[1, :200] = np.nan  # 69% of band 1
  with pytest.raises(pp.PreprocessError) as excinfo:
    pp.stretch(images, [30.0, 30.0], [0.03, 0.03])
  assert excinfo.value.reason == pp.MOSTLY_NONFINITE == "mostly non-finite image"
  assert excinfo.value.band == 1 and isinstance(excinfo.value, ValueError)
  back = pickle.loads(pickle.dumps(excinfo.value))
  assert (back.reason, back.band, str(back)) == (pp.MOSTLY_NONFINITE, 1,
                                                 "mostly non-finite image (band 1)")
  pp.stretch(images, [30.0, 30.0], [0.03, 0.03], max_bad_fraction=0.75)  # A raised threshold.


def test_bin_image_mean():
  images = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6)
  binned = pp.bin_image(images, 2)
  assert binned.shape == (2, 2, 3) and binned.dtype == np.float32
  assert binned[0, 0, 0] == np.mean([0, 1, 6, 7])
  assert binned[1, 1, 2] == np.mean(images[1, 2:4, 4:6])
  np.testing.assert_allclose(binned.mean(), images.mean())
  np.testing.assert_array_equal(pp.bin_image(images, 1), images)
  x = np.random.default_rng(0).normal(size=(3, 2, 12, 9)).astype(np.float32)
  ref = x.astype(np.float64).reshape(3, 2, 4, 3, 3, 3).mean(axis=(3, 5))
  np.testing.assert_allclose(pp.bin_image(x, 3), ref, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError):
    pp.bin_image(images, 4)


# --------------------------------------------------------------------------- spectra


def sdss_like(n=3850, start=3.5797, seed=0):
  rng = np.random.default_rng(seed)
  loglam = start + 1e-4 * np.arange(n)
  return (10 ** loglam, rng.normal(10, 1, n).astype(np.float32),
          rng.uniform(0.5, 2, n).astype(np.float32), np.zeros(n, np.int32))


def test_resample_on_lattice_copies_exactly():
  wavelength, flux, ivar, and_mask = sdss_like()
  and_mask[100] = 4
  flux[200] = np.nan
  ivar[300] = np.inf
  ivar[400] = 0
  out, weight = pp.resample_to_grid(wavelength, flux, ivar, and_mask)
  assert out.dtype == np.float32 and weight.dtype == np.float32 and out.shape == (4000,)
  # Source pixel k sits on grid pixel k - 3 (3.5797 = 3.58 - 3e-4); the grid ends at k = 3846.
  src = np.arange(3, 3850)
  bad = np.isin(src, [100, 200, 300, 400])
  np.testing.assert_array_equal(out[:3847][~bad], flux[src][~bad])
  np.testing.assert_array_equal(weight[:3847][~bad], ivar[src][~bad])
  assert np.all(out[src[bad] - 3] == 0) and np.all(weight[src[bad] - 3] == 0)
  assert np.all(weight[3847:] == 0) and np.all(out[3847:] == 0)
  assert pp.count_valid(weight) == 3847 - 4


def test_resample_on_lattice_tolerates_float32_loglam():
  wavelength, flux, ivar, _ = sdss_like(start=3.5812)
  wavelength = 10 ** np.log10(wavelength).astype(np.float32).astype(np.float64)  # ~2e-7 dex off
  out, weight = pp.resample_to_grid(wavelength, flux, ivar)
  # Source pixel k sits on grid pixel k + 12.
  np.testing.assert_array_equal(out[12:3862], flux)
  np.testing.assert_array_equal(weight[12:3862], ivar)
  assert np.all(weight[:12] == 0) and np.all(weight[3862:] == 0)


def smooth(w):
  """A smooth positive spectrum with an emission line, 1e-17 erg/s/cm^2/A."""
  return 10 + 5 * np.sin(w / 300.0) + 40 * np.exp(-0.5 * ((w - 6563.0) / 4.0) ** 2)


def smooth_integral(a, b):
  """Exact integral of `smooth` over [a, b] Angstrom."""
  from math import erf, sqrt
  line = 40 * 4.0 * np.sqrt(np.pi / 2) * (erf((b - 6563.0) / (4.0 * sqrt(2)))
                                          - erf((a - 6563.0) / (4.0 * sqrt(2))))
  return 10 * (b - a) - 5 * 300.0 * (np.cos(b / 300.0) - np.cos(a / 300.0)) + line


def test_resample_off_lattice_conserves_flux():
  wavelength = np.arange(3500.0, 10000.0, 0.7)
  out, weight = pp.resample_to_grid(wavelength, smooth(wavelength))
  edges = grid.pixel_edges()
  assert np.all(weight == 1)
  total = np.sum(out.astype(np.float64) * np.diff(edges))
  assert total == pytest.approx(smooth_integral(edges[0], edges[-1]), rel=1e-3)
  # Locally too: each pixel holds the mean of the spectrum over it (to the accuracy of the
  # 0.7 A piecewise-constant source sampling, ~0.4% on the 4 A wide line).
  exact = np.array([smooth_integral(a, b) / (b - a) for a, b in zip(edges[:-1], edges[1:])])
  np.testing.assert_allclose(out, exact, rtol=5e-3)
  line_free = np.abs(grid.wavelength() - 6563.0) > 30
  np.testing.assert_allclose(out[line_free], exact[line_free], rtol=2e-4)


def test_resample_off_lattice_constant_and_range():
  wavelength = np.linspace(5000.0, 6000.0, 1234)
  out, weight = pp.resample_to_grid(wavelength, np.full(1234, 3.5))
  inside = (grid.wavelength() > 5001.0) & (grid.wavelength() < 5999.0)
  outside = (grid.wavelength() < 4999.0) | (grid.wavelength() > 6001.0)
  np.testing.assert_allclose(out[inside], 3.5, rtol=1e-6)
  assert np.all(weight[inside] == 1)
  assert np.all(weight[outside] == 0) and np.all(out[outside] == 0)
  assert np.all(out[weight == 0] == 0)


@pytest.mark.parametrize("covered, measured", [(0.3, False), (0.7, True)])
def test_resample_off_lattice_edge_pixel_needs_half_coverage(covered, measured):
  edges = grid.pixel_edges()
  end = edges[2000] + covered * (edges[2001] - edges[2000])  # source's last pixel edge
  wavelength = np.arange(end - 0.05, 5000.0, -0.1)[::-1]  # 0.1 A pixels
  out, weight = pp.resample_to_grid(wavelength, np.full(wavelength.size, 2.0))
  assert weight[1999] == 1 and out[1999] == pytest.approx(2.0)
  assert weight[2000] == float(measured) and out[2000] == pytest.approx(2.0 if measured else 0.0)
  assert np.all(weight[2001:] == 0)


def test_resample_off_lattice_ivar_propagation():
  # 0.01 A source pixels, ivar 2: a grid pixel of width d averages ~d/0.01 of them.
  wavelength = np.arange(5000.0, 5100.0, 0.01)
  n = wavelength.size
  ivar = np.full(n, 2.0)
  flux = np.ones(n)
  flux[5000] = np.nan  # one bad source pixel: its grid pixel stays measured
  and_mask = np.zeros(n, np.int32)
  and_mask[7000:7400] = 1  # 4 A masked: grid pixels wholly inside get weight 0
  out, weight = pp.resample_to_grid(wavelength, flux, ivar, and_mask)
  width = np.diff(grid.pixel_edges())
  centre = grid.wavelength()
  clean = (centre > 5002) & (centre < 5098) & ((centre < 5069) | (centre > 5075))
  np.testing.assert_allclose(weight[clean], 2.0 * width[clean] / 0.01, rtol=0.01)
  np.testing.assert_allclose(out[clean], 1.0, rtol=1e-9)
  masked = (centre > 5071) & (centre < 5073)
  assert masked.any() and np.all(weight[masked] == 0) and np.all(out[masked] == 0)


def test_resample_empty_and_validation():
  out, weight = pp.resample_to_grid(np.zeros(0), np.zeros(0))
  assert out.shape == weight.shape == (4000,) and pp.count_valid(weight) == 0
  with pytest.raises(ValueError):
    pp.resample_to_grid(np.array([5000.0, 4000.0]), np.ones(2))
  with pytest.raises(ValueError):
    pp.resample_to_grid(np.array([5000.0, 6000.0]), np.ones(3))


def test_count_valid():
  assert pp.count_valid(np.float32([0, 1, 0.5, 0, -1])) == 2


# --------------------------------------------------------------------------- splits


def test_split_of_deterministic_and_balanced():
  rng = np.random.default_rng(0)
  ids = [str(i) for i in rng.integers(10**17, 10**19, 20000, dtype=np.uint64)]
  splits = [pp.split_of(i) for i in ids]
  assert splits == [pp.split_of(i) for i in ids]
  fractions = [splits.count(s) / len(ids) for s in pp.SPLITS]
  np.testing.assert_allclose(fractions, [0.8, 0.1, 0.1], atol=0.015)
  assert set(pp.split_of(i, (1.0, 0.0, 0.0)) for i in ids[:100]) == {"train"}


def test_split_of_regression():
  # sha256("2") = d4735e3a..., u = 0.830 -> validation; sha256("5") = ef2d127d..., u = 0.934.
  assert pp.split_of("299489677444933632") == "train"
  assert pp.split_of("2") == "validation"
  assert pp.split_of("5") == "test"
  assert pp.split_of("15") == "validation"
  assert pp.split_of("20") == "test"
  with pytest.raises(ValueError):
    pp.split_of("1", (0.8, 0.1))


def test_aperture_flux_in_nanomaggies():
  images = np.zeros((2, 64, 64), np.float32)
  images[:, 31:33, 31:33] = 25.0           # 100 counts at the centre...
  images[:, 0, 0] = 1e6                    # ...and a bright source outside the 3" aperture.
  images[1, 40, 32] = np.nan               # Non-finite pixels count as 0.
  images[0, 30, 31] = np.inf
  headers = [{"MAGZERO": 25.0}, {"EXPTIME": 100.0}]   # Zero points 25 and 25 + 2.5 log10(100).
  flux = pp.aperture_flux(images, headers)
  np.testing.assert_allclose(flux, [100 * 10 ** (-0.4 * 2.5), 100 * 10 ** (-0.4 * 7.5)], rtol=1e-6)
  assert np.isnan(pp.aperture_flux(images[:1], [{}])[0])
  # Bigger aperture, more light: the 2" BOSS fiber misses a ring that 3" catches.
  images[0, 32, 32 + 10] = 50.0            # 2.5" from the centre.
  assert pp.aperture_flux(images[:1], headers[:1], 6.0)[0] > flux[0]
  assert pp.aperture_flux(images[:1], headers[:1], 2.0)[0] == flux[0]
