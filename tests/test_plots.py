"""The figures of `astra_jax.plots` on tiny hand-made arrays: what each draws, not how it looks."""

import io
import os
import subprocess
import sys

import matplotlib.collections
import matplotlib.image
from matplotlib import figure as mpl_figure
import matplotlib.pyplot as plt
from astropy import visualization
import numpy as np
import pytest

from astra_jax import plots
from astra_jax.data import examples
from astra_jax.data import preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANDS = ("g", "r", "i", "z", "y")


def png(fig) -> np.ndarray:
  """The figure rendered as an RGBA array (closes it)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  plt.close(fig)
  buffer.seek(0)
  return matplotlib.image.imread(buffer)


def galaxies(n=2, pixels=50, size=8, seed=0):
  """n galaxies: images (n, 5, size, size), wavelength (pixels,), fluxes, weights, redshifts."""
  rng = np.random.default_rng(seed)
  wavelength = np.linspace(4000.0, 9000.0, pixels)
  flux_true = 5 + rng.normal(size=(n, pixels))
  weight = np.ones((n, pixels))
  weight[0, 10:13] = 0.0   # A run of three masked pixels ...
  weight[0, -1] = 0.0      # ... and the last one.
  images = rng.random((n, 5, size, size)).astype(np.float16)
  return dict(images=images, bands=BANDS, wavelength=wavelength, flux_true=flux_true,
              weight=weight, flux_pred=flux_true + 0.5,
              z_true=np.array([0.1] + [np.nan] * (n - 1)),  # Galaxy 0 alone has a true z.
              z_pred=np.linspace(0.12, 0.3, n), names=[f"gal{i}" for i in range(n)])


def test_masked_ranges_cover_whole_pixels():
  wavelength = np.array([10.0, 12.0, 14.0, 16.0, 18.0])
  assert plots.masked_ranges(wavelength, np.ones(5)) == []
  assert plots.masked_ranges(wavelength, np.array([0, 1, 0, 0, 1.0])) == [(9.0, 11.0),
                                                                          (13.0, 17.0)]
  assert plots.masked_ranges(wavelength, np.array([1, 1, 1, 1, np.nan])) == [(17.0, 19.0)]
  assert plots.masked_ranges(wavelength, np.zeros(5)) == [(9.0, 19.0)]


def stored(flux_nmgy, bands=BANDS):
  """Fluxes (bands, H, W) in nanomaggies per pixel as the dataset stores them: asinh(f / softening)."""
  softening = np.array(preprocess.ps1_softening_nmgy(bands, examples.SOFTENING_SIGMAS))
  return np.arcsinh(np.asarray(flux_nmgy) / softening[:, None, None]).astype(np.float16)


def galaxy(colour, size=15):
  """A round galaxy (5, size, size), nanomaggies: `colour` (5,) times a profile peaking at 1."""
  y, x = np.mgrid[:size, :size] - size // 2
  return np.asarray(colour, np.float64)[:, None, None] * np.exp(-(x ** 2 + y ** 2) / 8.0)


def test_colour_image_is_lupton_gri_of_the_fluxes():
  flat = plots.colour_image(stored(galaxy([1.0] * 5)), BANDS)
  assert flat.shape == (15, 15, 3) and flat.dtype == np.float64
  assert 0.0 <= flat.min() and flat.max() <= 1.0
  # Equal AB fluxes in i, r, g (different stored values: each band has its own softening) are
  # grey; the sky (0 nanomaggies) is black; brighter is brighter, up to white at the core.
  np.testing.assert_allclose(flat[..., 0], flat[..., 2], atol=5e-3)
  np.testing.assert_allclose(flat[..., 1], flat[..., 2], atol=5e-3)
  np.testing.assert_array_equal(plots.colour_image(stored(np.zeros((5, 4, 4))), BANDS), 0.0)
  profile = flat[7, 7:, 0]
  assert np.all(np.diff(profile) <= 0) and profile[0] > 0.5 and profile[-1] < 0.05
  # astropy's make_lupton_rgb of i, r, g in nanomaggies, to float16 storage precision.
  flux = galaxy([0.3, 0.6, 1.0, 1.2, 1.3])
  want = visualization.make_lupton_rgb(flux[2], flux[1], flux[0], stretch=plots.LUPTON_STRETCH_NMGY,
                                       Q=plots.LUPTON_Q, output_dtype=np.float64)
  np.testing.assert_allclose(plots.colour_image(stored(flux), BANDS), want, atol=2e-3)


def test_colour_image_of_a_red_galaxy_is_red():
  # An early-type galaxy's colours: i brighter than r brighter than g (g - i = 1.3 mag).
  red = plots.colour_image(stored(galaxy([0.3, 0.6, 1.0, 1.2, 1.3])), BANDS)
  core = red[7, 7]
  assert core[0] > core[1] > core[2] and core[0] > 2 * core[2]
  # The same, blue (a star-forming galaxy) comes out blue; its channels follow its fluxes.
  blue = plots.colour_image(stored(galaxy([1.0, 0.6, 0.3, 0.25, 0.2])), BANDS)
  assert blue[7, 7, 2] > blue[7, 7, 1] > blue[7, 7, 0]
  np.testing.assert_allclose(blue[7, 7], red[7, 7, ::-1], rtol=1e-2)
  # GRIZY_CHANNELS: z, y in red: redder still than i alone.
  grizy = plots.colour_image(stored(galaxy([0.3, 0.6, 1.0, 3.0, 3.0])), BANDS, plots.GRIZY_CHANNELS)
  gri = plots.colour_image(stored(galaxy([0.3, 0.6, 1.0, 3.0, 3.0])), BANDS)
  assert grizy[7, 7, 0] / grizy[7, 7, 2] > gri[7, 7, 0] / gri[7, 7, 2]
  # Bands missing from a channel: the reddest three there are; one band: grey.
  np.testing.assert_array_equal(
      plots.colour_image(stored(galaxy([0.3, 0.6, 1.0]), BANDS[:3]), BANDS[:3],
                         plots.GRIZY_CHANNELS), red)
  one = plots.colour_image(stored(galaxy([1.0]), ("r",)), ("r",))
  assert one[7, 7, 0] > 0.1 and np.all(one == one[..., :1])


def test_galaxies_figure_shows_masked_pixels_as_masked():
  g = galaxies()
  fig = plots.galaxies_figure(**g)
  assert isinstance(fig, mpl_figure.Figure)
  image_axes, spectrum_axes = fig.axes[0::2], fig.axes[1::2]
  assert len(fig.axes) == 4 and all(ax.images for ax in image_axes)
  true_line = spectrum_axes[0].lines[0]
  y = np.asarray(true_line.get_ydata())
  assert np.all(np.isnan(y[10:13])) and np.isnan(y[-1]) and np.all(np.isfinite(y[:10]))
  # The shaded runs are exactly the masked pixels; the unmasked galaxy has none.
  bars = [c for c in spectrum_axes[0].collections
          if isinstance(c, matplotlib.collections.PolyCollection)]
  assert len(bars) == 1
  spans = sorted((p.vertices[:, 0].min(), p.vertices[:, 0].max()) for p in bars[0].get_paths())
  np.testing.assert_allclose(spans, plots.masked_ranges(g["wavelength"], g["weight"][0]))
  assert not spectrum_axes[1].collections
  # Lines are marked where z_true is known (galaxy 0), not for galaxy 1 (NaN).
  assert len(spectrum_axes[0].lines) > 2 and len(spectrum_axes[1].lines) == 2
  assert "z_pred=0.120" in spectrum_axes[0].get_title(loc="left")
  assert png(fig)[..., :3].std() > 0.05


def test_z_pdfs_figure_draws_densities_and_true_z():
  edges = np.linspace(0.0, 0.6, 7)
  pdf = np.array([[0, 0.5, 0.5, 0, 0, 0], [1.0, 0, 0, 0, 0, 0]])
  fig = plots.z_pdfs_figure(edges, pdf, z_true=np.array([0.15, np.nan]),
                            z_pred=np.array([0.2, 0.05]), z_lo=np.array([0.1, 0.0]),
                            z_hi=np.array([0.3, 0.1]), names=["a", "b"])
  first, second = fig.axes[:2]
  heights = first.patches[0].get_data()[0]   # StepPatch: (values, edges).
  np.testing.assert_allclose(heights, [0, 5, 5, 0, 0, 0])  # Density: area 1.
  assert [l.get_xdata()[0] for l in first.lines] == [0.2, 0.15]   # z_pred, then z_true.
  assert [l.get_xdata()[0] for l in second.lines] == [0.05]       # No true z to draw.
  assert first.get_title() == "a"
  assert png(fig)[..., :3].std() > 0.05


def test_figure_functions_return_what_the_writers_save(tmp_path):
  g = galaxies(n=3)
  fig = plots.spectra_figure(g["wavelength"], g["flux_true"], g["weight"], g["flux_pred"],
                             g["z_true"], g["z_pred"], g["names"])
  assert len([ax for ax in fig.axes if ax.get_visible()]) == 3
  plt.close(fig)
  path = plots.redshift(str(tmp_path / "z.png"), np.array([0.1, 0.2, 0.3]),
                        np.array([0.11, 0.2, 0.5]), 0.6)
  assert matplotlib.image.imread(path).shape[0] > 200
  attention = np.ones((3, 2, 2)) / 4
  fig = plots.attention_figure(g["images"].astype(np.float32), attention, BANDS, num=2,
                               channels=plots.GRIZY_CHANNELS)
  assert len(fig.axes) == 2 * 2 + 2   # Two images, two overlays, two colour bars.
  plt.close(fig)


@pytest.mark.parametrize("backend,expected", [("", "agg"), ("svg", "svg")])
def test_backend_is_agg_unless_one_was_asked_for(backend, expected):
  env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
  if backend:
    env["MPLBACKEND"] = backend  # As Jupyter's kernels set their inline backend.
  out = subprocess.run([sys.executable, "-c", "from astra_jax import plots; import matplotlib; "
                        "print(matplotlib.get_backend())"], env=env, cwd=REPO, check=True,
                       capture_output=True, text=True, timeout=120).stdout
  assert out.strip().lower() == expected
