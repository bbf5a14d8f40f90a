"""The one observed-frame wavelength grid every spectrum lives on.

4000 pixels, log10(lambda / Angstrom) = 3.5800 + 1e-4 * i, i.e. 3801.9 to 9545.6 Angstrom (vacuum,
observed frame) with the SDSS sampling of 1e-4 dex (69 km/s) per pixel.
"""

import numpy as np

LOGLAM0 = 3.5800
DLOGLAM = 1e-4
NUM_PIXELS = 4000

#: Fixed band order of the Pan-STARRS1 cutouts; configs may select a subset, never reorder by listdir.
PS1_BANDS = ("g", "r", "i", "z", "y")


def loglam() -> np.ndarray:
  """log10(wavelength / Angstrom) of the grid, shape (4000,), float64."""
  return LOGLAM0 + DLOGLAM * np.arange(NUM_PIXELS, dtype=np.float64)


def wavelength() -> np.ndarray:
  """Vacuum observed-frame wavelength of the grid in Angstrom, shape (4000,), float64."""
  return 10.0 ** loglam()


def pixel_edges() -> np.ndarray:
  """Wavelength edges of the grid pixels in Angstrom, shape (4001,), float64 (midpoints in log10)."""
  return 10.0 ** (LOGLAM0 + DLOGLAM * (np.arange(NUM_PIXELS + 1, dtype=np.float64) - 0.5))
