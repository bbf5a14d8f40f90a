"""Physically grounded mock ASTROPIXEL survey: PS1 3pi cutouts, SDSS/BOSS fiber spectra, truth.

Each galaxy is a de Vaucouleurs bulge (Sersic n=4) plus an exponential disk (n=1) sharing one
centre and position angle; each component has its own non-negative mix of the five kcorrect v4
templates (Blanton & Roweis 2007; rest-frame f_lambda at 10 pc per solar mass formed), so colour
gradients, sizes and the fiber spectrum are mutually consistent. Redshifts and luminosities
follow an SDSS main-sample-like selection (volume-weighted Schechter LF, r < 17.77, Planck18).
The template emission lines are refitted at their vacuum wavelengths and re-added as Gaussians
of the galaxy's gas dispersion (plus the spectrograph's resolution).

Written layout (the Kaggle ASTROPIXEL layout; `id` = bare integer specobj_id):

  DIR/data.csv         `#plate,mjd,fiberid,specobj_id,ra,dec,z`, id quoted as CasJobs does.
  DIR/truth.csv        one row per galaxy, units in the column names (see `_truth_row`).
  DIR/Galaxy_{id}/images/{id}_{band}.fits   band in g,r,i,z,y: 288x288 float32, 0.25"/pix.
  DIR/Galaxy_{id}/spectrum/spectrum.csv     `wavelength,flux` (Angstrom vacuum, 1e-17 cgs/A).
  DIR/Galaxy_{id}/spectrum/spec-PPPP-MMMMM-FFFF.fits   SDSS DR16 lite format (`sdss_spec`).

Usage:
  python -m astra_jax.data.mock --out_dir DIR --num_galaxies N --seed S [--sdss_spec]
"""

import argparse
import dataclasses
import functools
import importlib.util
import multiprocessing
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
import scipy.fft
import scipy.optimize
import scipy.special

from astra_jax import grid

BANDS = grid.PS1_BANDS
NUM_TEMPLATES = 5
C_KMS = 299792.458
C_AA = 2.99792458e18  # Speed of light in Angstrom/s.
AB_FNU = 3.631e-20  # AB zero point, erg/s/cm^2/Hz.

# Selection (SDSS main sample) and luminosity function (Blanton et al. 2003, h = Planck18's).
R_LIMIT, R_BRIGHT = 17.77, 13.0
Z_MIN, Z_MAX = 0.01, 0.5
_H = 0.6766
SCHECHTER_MSTAR = -20.44 + 5.0 * np.log10(_H)  # At z = 0.1, rest-frame r, AB.
SCHECHTER_ALPHA = -1.05
LF_EVOLUTION_Q = 1.6  # M*(z) = M*(0.1) - Q (z - 0.1).
_M_BRIGHT, _M_FAINT = -24.5, -15.0

# Pan-STARRS1 3pi stack cutouts (Chambers et al. 2016).
STAMP = 288
PIXEL_ARCSEC = 0.25
CENTRE = (STAMP - 1) / 2.0  # 0-based pixel of the galaxy centre = CRVAL (CRPIX = 144.5).
PS1_ZP_1S = 25.0  # HIERARCH FPA.ZP: AB magnitude giving 1 count/s.
_EXPOSURE_S = dict(g=43.0, r=40.0, i=45.0, z=30.0, y=30.0)  # One warp.
_NUM_EPOCHS = dict(g=12, r=12, i=15, z=12, y=11)  # Typical stack depth.
_DEPTH5 = dict(g=23.3, r=23.2, i=23.1, z=22.3, y=21.4)  # 5 sigma point source, typical stack.
_PSF_FWHM = dict(g=1.31, r=1.19, i=1.11, z=1.07, y=1.02)  # Median stack seeing, arcsec.
_PSF_WING_FRAC, _PSF_WING_SCALE = 0.1, 2.0  # Double Gaussian: 10% of the light in a 2x wider wing.

# SDSS / BOSS spectroscopy.
RUN2D_CODE = 26
FIBER_DIAMETER = dict(SDSS=3.0, BOSS=2.0)  # arcsec
_PLATES = dict(SDSS=(266, 3000), BOSS=(3500, 12000))
_MJDS = dict(SDSS=(51600, 54600), BOSS=(55000, 58500))
_FIBERS = dict(SDSS=640, BOSS=1000)
_SPEC_FIRST = dict(SDSS=(-3, 12), BOSS=(-250, -225))  # Lattice index range, LOGLAM0 + DLOGLAM i.
_SPEC_LAST = dict(SDSS=(3826, 3846), BOSS=(4360, 4380))
_SPEC_GAIN = dict(SDSS=30.0, BOSS=40.0)  # e- per pixel per 1e-17 cgs/A at peak throughput.
_READ_NOISE_E = 4.0
PIX_KMS = C_KMS * np.log(10.0) * grid.DLOGLAM  # 69.03 km/s per lattice pixel.
FULLREJECT, NEARBADPIXEL, BRIGHTSKY = 1 << 18, 1 << 16, 1 << 23  # SDSS SPPIXMASK bits.

# Emission lines refitted in the templates: (name, vacuum rest wavelength in Angstrom).
LINES = (
    ("OII_3727", 3727.092), ("OII_3730", 3729.875), ("NeIII_3870", 3869.86),
    ("Heps_3971", 3971.20), ("Hdelta_4103", 4102.89), ("Hgamma_4342", 4341.69),
    ("OIII_4364", 4364.44), ("Hbeta_4863", 4862.68), ("OIII_4960", 4960.30),
    ("OIII_5008", 5008.24), ("HeI_5877", 5877.25), ("OI_6302", 6302.05), ("SIII_6314", 6313.8),
    ("OI_6366", 6365.54), ("NII_6550", 6549.86), ("Halpha_6565", 6564.61),
    ("NII_6585", 6585.27), ("SII_6718", 6718.29), ("SII_6733", 6732.67), ("HeI_7067", 7067.14),
    ("ArIII_7138", 7137.77), ("OII_7322", 7321.94), ("OII_7332", 7332.21),
    ("ArIII_7753", 7753.19), ("Pa10_9017", 9017.4), ("SIII_9071", 9071.1),
    ("Pa9_9232", 9231.55), ("SIII_9533", 9533.2),
    ("Paeps_9549", 9548.6), ("Padelta_10052", 10052.1))
LINE_NAMES = tuple(name for name, _ in LINES)
LINE_WAVE = np.array([w for _, w in LINES])
_TEMPLATE_LINE_KMS = 210.0  # Gaussian sigma of the lines as sampled in the v4 templates.


# --------------------------------------------------------------------------- cached inputs


@dataclasses.dataclass(frozen=True)
class Templates:
  """kcorrect v4 templates with their emission lines split off.

  wave: (W,) rest-frame Angstrom (vacuum). continuum: (5, W) erg/s/cm^2/A at 10 pc per Msun
  formed, lines removed. line_flux: (5, len(LINES)) erg/s/cm^2 at 10 pc per Msun formed.
  abs_mag_r: (5,) rest-frame PS1 r AB absolute magnitude of 1 Msun formed.
  """
  wave: np.ndarray
  continuum: np.ndarray
  line_flux: np.ndarray
  abs_mag_r: np.ndarray


def _template_file() -> str:
  """kcorrect-default-v4.fits inside the installed kcorrect package (found without importing
  kcorrect, whose import pulls in matplotlib: ~4 s)."""
  spec = importlib.util.find_spec("kcorrect")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("the kcorrect package (pip install kcorrect) provides the templates")
  return os.path.join(list(spec.submodule_search_locations)[0], "data", "templates",
                      "kcorrect-default-v4.fits")


def _line_groups():
  """Indices of LINES grouped where their fitting windows overlap."""
  lo, hi = LINE_WAVE * (1 - 1200 / C_KMS) - 12.0, LINE_WAVE * (1 + 1200 / C_KMS) + 12.0
  groups = []
  for j in np.argsort(lo):
    if groups and lo[j] <= hi[groups[-1]].max():
      groups[-1].append(j)
    else:
      groups.append([j])
  return [np.array(g) for g in groups], lo, hi


def _fit_line_group(x, y, centres):
  """Amplitudes (>= 0) and profiles (len(x), len(centres)) of Gaussian lines over a free linear
  continuum, with a common shift (+-80 km/s) chosen by grid search: a few template lines
  ([SIII]) sit up to 50 km/s off the vacuum wavelengths used here."""
  scale = np.abs(y).max()
  basis, _ = np.linalg.qr(np.stack([np.ones_like(x), (x - x.mean()) / 100.0], axis=1))
  sigma = centres * _TEMPLATE_LINE_KMS / C_KMS
  best = None
  for shift in np.arange(-80.0, 81.0, 10.0):
    prof = np.exp(-0.5 * ((x[:, None] - centres * (1 + shift / C_KMS)) / sigma) ** 2)
    # NNLS on what the best linear continuum leaves: continuum free, amplitudes >= 0.
    amp, rnorm = scipy.optimize.nnls(prof - basis @ (basis.T @ prof),
                                     (y - basis @ (basis.T @ y)) / scale)
    if best is None or rnorm < best[0]:
      best = (rnorm, amp * scale, prof)
  return best[1], best[2]


def _fit_lines(wave, flux):
  """Template emission lines: (line fluxes (L,) [flux x A], line model on `wave`), fitted as
  Gaussians of sigma 210 km/s (their width in the v4 templates), blends together."""
  groups, lo, hi = _line_groups()
  line_flux = np.zeros(len(LINES))
  model = np.zeros_like(flux)
  for g in groups:
    sel = (wave > lo[g].min()) & (wave < hi[g].max())
    amp, prof = _fit_line_group(wave[sel], flux[sel], LINE_WAVE[g])
    line_flux[g] = amp * np.sqrt(2 * np.pi) * LINE_WAVE[g] * _TEMPLATE_LINE_KMS / C_KMS
    model[sel] += prof @ amp
  return line_flux, model


@functools.lru_cache(maxsize=None)
def templates() -> Templates:
  """The kcorrect v4 default templates, read from the installed kcorrect package."""
  from astropy.io import fits  # pylint: disable=g-import-not-at-top
  with fits.open(_template_file()) as hdul:
    wave = np.asarray(hdul["FLUX"].data["wave"][0], np.float64)
    flux = np.asarray(hdul["FLUX"].data["flux"][0], np.float64).reshape(NUM_TEMPLATES, -1)
  line_flux = np.zeros((NUM_TEMPLATES, len(LINES)))
  continuum = flux.copy()
  for k in range(NUM_TEMPLATES):
    line_flux[k], model = _fit_lines(wave, flux[k])
    continuum[k] -= model
  partial = Templates(wave, continuum, line_flux, np.zeros(NUM_TEMPLATES))
  rest = _template_maggies(0.0, partial)
  return dataclasses.replace(partial, abs_mag_r=-2.5 * np.log10(rest[:, BANDS.index("r")]))


@dataclasses.dataclass(frozen=True)
class Filters:
  """PS1 grizy on a 1 Angstrom grid. wave: (P,) Angstrom; weight: (5, P) maggies per
  (erg/s/cm^2/A) sample (trapezoid); density: (5, P) maggies per erg/s/cm^2 of a narrow line."""
  wave: np.ndarray
  weight: np.ndarray
  density: np.ndarray


@functools.lru_cache(maxsize=None)
def filters() -> Filters:
  """speclite's panstarrs-{g,r,i,z,y} curves as AB photometry weights."""
  import speclite.filters  # pylint: disable=g-import-not-at-top
  curves = speclite.filters.load_filters(*[f"panstarrs-{b}" for b in BANDS])
  wave = np.arange(3850.0, 11051.0, 1.0)
  resp = np.stack([np.interp(wave, c.wavelength, c.response, left=0.0, right=0.0)
                   for c in curves])
  norm = AB_FNU * C_AA * np.trapezoid(resp / wave, wave, axis=1)  # f_nu^AB band integral.
  density = resp * wave / norm[:, None]
  trap = np.full(wave.size, 1.0)
  trap[[0, -1]] = 0.5
  return Filters(wave, density * trap, density)


@dataclasses.dataclass(frozen=True)
class Cosmology:
  """Planck18 tables on z = 0 ... 1.2 (step 1e-3): distances in Mpc, dV/dz in Mpc^3/sr."""
  z: np.ndarray
  d_lum: np.ndarray
  d_ang: np.ndarray
  dvdz: np.ndarray

  def lum_dist(self, z):
    return np.interp(z, self.z, self.d_lum)

  def ang_dist(self, z):
    return np.interp(z, self.z, self.d_ang)


@functools.lru_cache(maxsize=None)
def cosmology() -> Cosmology:
  """Planck18 (astropy) tabulated once; np.interp on the table is ~1000x faster per call."""
  from astropy.cosmology import Planck18  # pylint: disable=g-import-not-at-top
  z = np.linspace(0.0, 1.2, 1201)
  d_lum = Planck18.luminosity_distance(z).to_value("Mpc")
  dvdz = Planck18.differential_comoving_volume(z).to_value("Mpc3 / sr")
  return Cosmology(z, d_lum, d_lum / (1 + z) ** 2, dvdz)


# --------------------------------------------------------------------------- SED and photometry


def _template_maggies(z: float, tmpl: Optional[Templates] = None) -> np.ndarray:
  """(5 templates, 5 bands) PS1 maggies of 1 Msun formed at 10 pc, redshifted to z."""
  tmpl = tmpl or templates()
  filt = filters()
  rest = filt.wave / (1 + z)
  cont = np.stack([np.interp(rest, tmpl.wave, c) for c in tmpl.continuum]) / (1 + z)
  line_density = np.stack([np.interp(LINE_WAVE * (1 + z), filt.wave, d, left=0, right=0)
                           for d in filt.density])  # (bands, lines)
  return cont @ filt.weight.T + tmpl.line_flux @ line_density.T


def _dimming(z) -> np.ndarray:
  """(10 pc / d_L)^2: flux at redshift z over flux at 10 pc (f_lambda also gets 1/(1+z))."""
  return (1e-5 / cosmology().lum_dist(z)) ** 2


def band_maggies(z: float, weights) -> np.ndarray:
  """PS1 grizy maggies (..., 5) of template mixtures `weights` (..., 5) [Msun] at redshift z."""
  return np.asarray(weights, np.float64) @ _template_maggies(z) * _dimming(z)


def ab_magnitudes(z: float, weights) -> np.ndarray:
  """PS1 grizy AB magnitudes (..., 5) of template mixtures `weights` (..., 5) [Msun] at z."""
  return -2.5 * np.log10(band_maggies(z, weights))


def observed_sed(wave, z: float, weights, line_sigma_kms=100.0) -> np.ndarray:
  """Observed f_lambda [1e-17 erg/s/cm^2/A] at `wave` (N,) [A, vacuum] of weights (5,) [Msun].

  f_obs(lambda) = f_10pc(lambda / (1+z)) (10 pc / d_L)^2 / (1+z); lines are Gaussians at
  (1+z) lambda_rest with sigma `line_sigma_kms` (scalar or (len(LINES),), incl. instrument).
  """
  tmpl = templates()
  wave = np.asarray(wave, np.float64)
  weights = np.asarray(weights, np.float64)
  cont = sum(w * np.interp(wave / (1 + z), tmpl.wave, c)
             for w, c in zip(weights, tmpl.continuum) if w > 0) / (1 + z)
  flam = cont + _line_profiles(wave, (1 + z) * LINE_WAVE, weights @ tmpl.line_flux,
                               line_sigma_kms)
  return flam * _dimming(z) * 1e17


def _line_profiles(wave, centre, flux, sigma_kms) -> np.ndarray:
  """Sum of Gaussians of integrated `flux` (L,) at `centre` (L,) [A], evaluated at wave (N,)."""
  out = np.zeros_like(wave)
  sigma = centre * np.broadcast_to(sigma_kms, centre.shape) / C_KMS
  lo = np.searchsorted(wave, centre - 6 * sigma)
  hi = np.searchsorted(wave, centre + 6 * sigma)
  for c, s, f, a, b in zip(centre, sigma, flux, lo, hi):
    if b > a and f > 0:
      out[a:b] += f / (np.sqrt(2 * np.pi) * s) * np.exp(-0.5 * ((wave[a:b] - c) / s) ** 2)
  return out


# --------------------------------------------------------------------------- galaxy population


@dataclasses.dataclass(frozen=True)
class Galaxy:
  """Intrinsic properties of one mock galaxy.

  z: redshift. abs_mag_r: rest-frame PS1 r AB absolute magnitude (total). bulge_to_total:
  bulge fraction of rest-frame r light. activity: star-formation activity in [0, 1].
  bulge_weights, disk_weights: (5,) template masses formed [Msun]. *_re_kpc: half-light radius
  along the major axis. *_q: axis ratio b/a. pa_deg: major-axis position angle, East of North.
  gas_sigma_kms: emission-line velocity dispersion.
  """
  z: float
  abs_mag_r: float
  bulge_to_total: float
  activity: float
  bulge_weights: np.ndarray
  disk_weights: np.ndarray
  bulge_re_kpc: float
  disk_re_kpc: float
  bulge_q: float
  disk_q: float
  pa_deg: float
  gas_sigma_kms: float

  @property
  def weights(self) -> np.ndarray:
    """(2, 5) template masses [Msun]: bulge, disk."""
    return np.stack([self.bulge_weights, self.disk_weights])

  def component_maggies(self) -> np.ndarray:
    """(2, 5) observed PS1 grizy maggies of bulge and disk (computed once per instance)."""
    if "_maggies" not in self.__dict__:  # Frozen dataclass: cache past __setattr__.
      self.__dict__["_maggies"] = band_maggies(self.z, self.weights)
    return self.__dict__["_maggies"]

  def r_mag(self) -> float:
    """Total observed PS1 r AB magnitude."""
    return float(-2.5 * np.log10(self.component_maggies()[:, BANDS.index("r")].sum()))

  def kpc_per_arcsec(self) -> float:
    """Proper kpc per arcsec at z (Planck18 angular-diameter distance)."""
    return float(cosmology().ang_dist(self.z)) * 1e3 * np.pi / (180 * 3600)


@dataclasses.dataclass(frozen=True)
class _ProposalTables:
  z: np.ndarray  # (Z,) redshift grid
  z_cdf: np.ndarray  # (Z,) cumulative proposal density in z
  m_limit: np.ndarray  # (Z,) faintest admissible M at z = 0.1 of the LF (permissive)
  m: np.ndarray  # (M,) absolute magnitude grid
  m_cdf: np.ndarray  # (M,) cumulative Schechter LF (unnormalised)


@functools.lru_cache(maxsize=None)
def _proposal_tables() -> _ProposalTables:
  """Volume-weighted (z, M) proposal that contains every galaxy passing r < R_LIMIT.

  The K-correction of a mixture lies between those of its templates, so the bluest template's
  K gives a permissive limit; exact selection is applied on the drawn galaxy's own SED.
  """
  tmpl, cos = templates(), cosmology()
  m = np.linspace(_M_BRIGHT, _M_FAINT, 2001)
  x = 10 ** (0.4 * (SCHECHTER_MSTAR - m))
  m_cdf = np.concatenate([[0.0], np.cumsum(x ** (SCHECHTER_ALPHA + 1) * np.exp(-x))[:-1]])
  z = np.linspace(Z_MIN, Z_MAX, 197)
  app = np.stack([-2.5 * np.log10(_template_maggies(zi)[:, BANDS.index("r")] * _dimming(zi))
                  for zi in z])  # (Z, 5): apparent r of 1 Msun.
  limit = R_LIMIT - (app - tmpl.abs_mag_r).min(axis=1) + 0.05  # Minus distance modulus + K.
  limit = limit + LF_EVOLUTION_Q * (z - 0.1)
  density = np.interp(z, cos.z, cos.dvdz) * np.interp(limit, m, m_cdf)
  z_cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(z))])
  return _ProposalTables(z, z_cdf / z_cdf[-1], limit, m, m_cdf)


def _sample_z_mag(rng):
  """(z, M_r) from the permissive proposal: dV/dz x Schechter, M brighter than the limit."""
  t = _proposal_tables()
  z = float(np.interp(rng.random(), t.z_cdf, t.z))
  limit = np.interp(z, t.z, t.m_limit)
  m = float(np.interp(rng.random() * np.interp(limit, t.m, t.m_cdf), t.m_cdf, t.m))
  return z, m - LF_EVOLUTION_Q * (z - 0.1)


def _light_to_mass(fractions, abs_mag, tmpl) -> np.ndarray:
  """Template masses [Msun] whose rest r light splits as `fractions` and totals `abs_mag`."""
  return fractions * 10 ** (-0.4 * (abs_mag - tmpl.abs_mag_r))


# Rest-frame r light fractions of the templates (0 metal-rich intermediate age, g-r 1.10,
# EW(Halpha) 7 A; 1 starburst, -0.22, 260 A; 2 star-forming, 0.36, 107 A; 3 old, 0.64, 0 A;
# 4 young metal-poor, 0.17, 0 A) for a quiescent and a star-forming population: g-r ~ 0.75 and
# ~ 0.4, EW(Halpha) ~ 2 A and ~ 25 A, as the SDSS red sequence and blue cloud.
_RED_MIX = np.array([0.25, 0.0, 0.0, 0.75, 0.0])
_BLUE_MIX = np.array([0.05, 0.02, 0.2, 0.33, 0.4])
_MIX_CONCENTRATION = 8.0


def _sample_structure(rng, z: float, abs_mag: float) -> Galaxy:
  """Morphology and stellar populations given M_r: bright galaxies are more often quiescent,
  bulge-dominated; bulges are redder than their disks."""
  tmpl = templates()
  blue = rng.random() < scipy.special.expit(1.5 * (abs_mag + 21.3) + 0.2)
  activity = float(rng.beta(6.0, 2.0) if blue else rng.beta(1.0, 12.0))
  mean_bt = 0.65 - 0.5 * activity
  bt = float(np.clip(rng.beta(4 * mean_bt, 4 * (1 - mean_bt)), 0.02, 0.98))
  disk_mix = (1 - activity) * _RED_MIX + activity * _BLUE_MIX
  bulge_mix = (1 - 0.3 * activity) * _RED_MIX + 0.3 * activity * _BLUE_MIX
  bulge_alpha = _MIX_CONCENTRATION * bulge_mix + 0.02
  disk_alpha = _MIX_CONCENTRATION * disk_mix + 0.02
  m_bulge = abs_mag - 2.5 * np.log10(bt)
  m_disk = abs_mag - 2.5 * np.log10(1 - bt)
  bulge_w = _light_to_mass(rng.dirichlet(bulge_alpha), m_bulge, tmpl)
  disk_w = _light_to_mass(rng.dirichlet(disk_alpha), m_disk, tmpl)
  # Size-luminosity relations in the spirit of Shen et al. (2003); bulges are the smaller part.
  disk_re = 4.0 * 10 ** (-0.1 * (abs_mag + 21.0) + 0.18 * rng.standard_normal())
  bulge_re = 2.2 * 10 ** (-0.22 * (abs_mag + 21.0) + 0.15 * rng.standard_normal())
  disk_re, bulge_re = max(disk_re, 0.5), float(np.clip(bulge_re, 0.2, 0.9 * max(disk_re, 0.5)))
  cos_i = rng.random()  # Random inclination of an oblate disk of intrinsic thickness 0.15.
  disk_q = float(np.sqrt(cos_i ** 2 + 0.15 ** 2 * (1 - cos_i ** 2)))
  bulge_q = float(np.clip(0.8 + 0.12 * rng.standard_normal(), 0.5, 1.0))
  return Galaxy(z=z, abs_mag_r=abs_mag, bulge_to_total=bt, activity=activity,
                bulge_weights=bulge_w, disk_weights=disk_w, bulge_re_kpc=float(bulge_re),
                disk_re_kpc=float(disk_re), bulge_q=bulge_q, disk_q=disk_q,
                pa_deg=float(180.0 * rng.random()),
                gas_sigma_kms=float(60.0 * 10 ** (0.15 * rng.standard_normal())))


def sample_galaxy(rng) -> Galaxy:
  """One galaxy of the main-sample-like population (13 <= r < 17.77, 0.01 <= z <= 0.5).

  Rejection sampling: (z, M) from the permissive volume-weighted proposal, structure given M,
  kept if its own filter-integrated r magnitude passes. z is rounded to 7 significant digits
  (as data.csv writes it).
  """
  for _ in range(10000):
    z, abs_mag = _sample_z_mag(rng)
    z = float(f"{z:.7g}")
    gal = _sample_structure(rng, z, abs_mag)
    if R_BRIGHT <= gal.r_mag() < R_LIMIT:
      return gal
  raise RuntimeError("sample_galaxy: rejection sampling did not converge")


# --------------------------------------------------------------------------- observing conditions


@dataclasses.dataclass(frozen=True)
class Conditions:
  """Observing conditions of one galaxy.

  psf_fwhm_arcsec, num_epochs: (5,) per PS1 band. survey: 'SDSS' or 'BOSS'.
  fiber_seeing_arcsec: FWHM of the seeing during the spectroscopic exposures.
  spec_first, spec_last: lattice indices i (inclusive) of the spectrum, loglam = 3.58 + 1e-4 i.
  wdisp_pix: spectral resolution (Gaussian sigma) in lattice pixels at 5000 A.
  spec_gain: e- per pixel per 1e-17 erg/s/cm^2/A at peak throughput.
  bad_pixels: (first index into the spectrum, length) of a bad-column region.
  """
  psf_fwhm_arcsec: np.ndarray
  num_epochs: np.ndarray
  survey: str
  fiber_seeing_arcsec: float
  spec_first: int
  spec_last: int
  wdisp_pix: float
  spec_gain: float
  bad_pixels: tuple

  @functools.cached_property
  def exptime(self) -> np.ndarray:
    """(5,) stack exposure time [s]."""
    return self.num_epochs * np.array([_EXPOSURE_S[b] for b in BANDS])

  @functools.cached_property
  def magzero(self) -> np.ndarray:
    """(5,) AB zero point: AB mag = MAGZERO - 2.5 log10(counts)."""
    return PS1_ZP_1S + 2.5 * np.log10(self.exptime)

  @functools.cached_property
  def sky_sigma(self) -> np.ndarray:
    """(5,) rms pixel noise [counts]: the typical stack's 5 sigma depth at its median seeing,
    scaled to this stack's number of epochs (sky variance grows with exposure time)."""
    out = []
    for b in BANDS:
      exptime = _NUM_EPOCHS[b] * _EXPOSURE_S[b]
      f5 = 10 ** (-0.4 * (_DEPTH5[b] - PS1_ZP_1S - 2.5 * np.log10(exptime)))
      out.append(f5 / (5 * np.sqrt(_psf_nea(_PSF_FWHM[b]))))
    return np.array(out) * np.sqrt(self.num_epochs / np.array([_NUM_EPOCHS[b] for b in BANDS]))

  @functools.cached_property
  def depth5(self) -> np.ndarray:
    """(5,) 5 sigma point-source AB depth of this stack (PSF-weighted photometry)."""
    nea = np.array([_psf_nea(f) for f in self.psf_fwhm_arcsec])
    return self.magzero - 2.5 * np.log10(5 * self.sky_sigma * np.sqrt(nea))


def sample_conditions(rng, survey: str) -> Conditions:
  """PS1 seeing and depth per band and the spectrograph setup of `survey`."""
  seeing = 10 ** (0.05 * rng.standard_normal())  # Shared by all bands of one stack location.
  fwhm = np.array([_PSF_FWHM[b] for b in BANDS]) * seeing * 10 ** (0.02 * rng.standard_normal(5))
  epochs = np.array([_NUM_EPOCHS[b] for b in BANDS]) + rng.integers(-4, 5, size=5)
  first = int(rng.integers(_SPEC_FIRST[survey][0], _SPEC_FIRST[survey][1] + 1))
  last = int(rng.integers(_SPEC_LAST[survey][0], _SPEC_LAST[survey][1] + 1))
  npix = last - first + 1
  bad_len = int(rng.integers(3, 13))
  return Conditions(
      psf_fwhm_arcsec=np.clip(fwhm, 0.85, 1.6), num_epochs=np.maximum(epochs, 4), survey=survey,
      fiber_seeing_arcsec=float(np.clip(1.5 * 10 ** (0.08 * rng.standard_normal()), 1.0, 2.5)),
      spec_first=first, spec_last=last,
      wdisp_pix=float(np.clip(1.0 + 0.06 * rng.standard_normal(), 0.85, 1.2)),
      spec_gain=float(_SPEC_GAIN[survey] * 10 ** (0.1 * rng.standard_normal())),
      bad_pixels=(int(rng.integers(20, npix - 20 - bad_len)), bad_len))


# --------------------------------------------------------------------------- image rendering


@functools.lru_cache(maxsize=None)
def _psf_fwhm_in_sigma() -> float:
  """FWHM of the double-Gaussian PSF in units of its core sigma."""
  a, s = _PSF_WING_FRAC, _PSF_WING_SCALE

  def excess(r):  # Profile at radius r (core sigma units) minus half its peak.
    prof = (1 - a) * np.exp(-0.5 * r * r) + a / s ** 2 * np.exp(-0.5 * (r / s) ** 2)
    return prof - 0.5 * ((1 - a) + a / s ** 2)

  return 2 * scipy.optimize.brentq(excess, 0.1, 10.0)


def _psf_sigmas(fwhm_arcsec: float):
  """(core sigma, wing sigma) in pixels."""
  core = fwhm_arcsec / PIXEL_ARCSEC / _psf_fwhm_in_sigma()
  return core, core * _PSF_WING_SCALE


def _psf_nea(fwhm_arcsec: float) -> float:
  """Noise-equivalent area 1 / integral(PSF^2) [pixels]."""
  sig = _psf_sigmas(fwhm_arcsec)
  amp = (1 - _PSF_WING_FRAC, _PSF_WING_FRAC)
  integral = sum(amp[i] * amp[j] / (2 * np.pi * (sig[i] ** 2 + sig[j] ** 2))
                 for i in range(2) for j in range(2))
  return 1.0 / integral


@functools.lru_cache(maxsize=8)
def _freq2(n: int) -> np.ndarray:
  """(n, n//2+1) squared spatial frequency [cycles/pixel]^2 of rfft2 on an n x n image."""
  return (np.fft.fftfreq(n)[:, None] ** 2 + np.fft.rfftfreq(n)[None, :] ** 2).astype(np.float32)


def _psf_otf(n: int, fwhm_arcsec: float) -> np.ndarray:
  """Optical transfer function of the double-Gaussian PSF on the rfft2 grid of size n."""
  core, _ = _psf_sigmas(fwhm_arcsec)
  e = np.exp(np.float32(-2 * np.pi ** 2 * core ** 2) * _freq2(n))
  return (1 - _PSF_WING_FRAC) * e + _PSF_WING_FRAC * (e * e) ** 2  # Wing: 2x sigma -> e^4.


def _sersic_image(n: float, re_pix: float, q: float, pa_deg: float, size: int, cx: float,
                  cy: float) -> np.ndarray:
  """Pixel-integrated Sersic profile of unit total flux (infinite plane), (size, size) float32.

  Centre (cx, cy) in 0-based pixels (x = column). Pixel centres are sampled, and the 16x16
  pixels around the centre 8x finer; the samples within elliptical radius 7 pixels are rescaled
  to the analytic enclosed flux, so the cusp of n = 4 is right even when re << 1 pixel.
  """
  b = scipy.special.gammaincinv(2 * n, 0.5)
  ie = 1.0 / (2 * np.pi * q * re_pix ** 2 * n * np.exp(b) * b ** (-2 * n)
              * scipy.special.gamma(2 * n))
  pa = np.deg2rad(pa_deg)
  ux, uy = -np.sin(pa) / re_pix, np.cos(pa) / re_pix  # Major axis: North = +y, East = -x.

  def profile(dx, dy):  # -> (surface brightness, (elliptical radius / re)^2)
    major = dx * np.float32(ux) + dy * np.float32(uy)
    minor = (dy * np.float32(ux) - dx * np.float32(uy)) * np.float32(1 / q)
    r2 = major * major + minor * minor
    if n == 1:
      t = np.sqrt(r2)
    elif n == 4:
      t = np.sqrt(np.sqrt(np.sqrt(r2)))  # (r/re)^(1/4) without the slow float power.
    else:
      t = r2 ** np.float32(0.5 / n)
    return np.exp(np.float32(-b) * t + np.float32(b + np.log(ie))), r2

  pix = np.arange(size, dtype=np.float32)
  img, _ = profile(pix[None, :] - np.float32(cx), pix[:, None] - np.float32(cy))
  half, over, r_fix = 8, 8, 7.0
  x0, y0 = int(np.floor(cx)) - half + 1, int(np.floor(cy)) - half + 1
  sub = ((np.arange(2 * half * over) + 0.5) / over - 0.5).astype(np.float32)
  vals, r2 = profile(sub[None, :] + np.float32(x0 - cx), sub[:, None] + np.float32(y0 - cy))
  inner = r2 < (r_fix / re_pix) ** 2
  enclosed = scipy.special.gammainc(2 * n, b * (r_fix / re_pix) ** (1.0 / n))
  vals[inner] *= np.float32(enclosed / (np.sum(vals[inner], dtype=np.float64) / over ** 2))
  img[y0:y0 + 2 * half, x0:x0 + 2 * half] = vals.reshape(
      2 * half, over, 2 * half, over).mean(axis=(1, 3))
  return img


@functools.lru_cache(maxsize=4)
def _fiber_mask(diameter_arcsec: float) -> np.ndarray:
  """(288, 288) fractional coverage of a fiber centred on the galaxy (8x8 sub-pixels)."""
  over = 8
  sub = (np.arange(STAMP * over) + 0.5) / over - 0.5 - CENTRE
  inside = (sub[None, :] ** 2 + sub[:, None] ** 2) < (0.5 * diameter_arcsec / PIXEL_ARCSEC) ** 2
  return inside.reshape(STAMP, over, STAMP, over).mean(axis=(1, 3))


@functools.lru_cache(maxsize=4)
def _fiber_mask_ft(diameter_arcsec: float) -> np.ndarray:
  """Fiber mask in rfft2 space, weighted so that vdot(it, rfft2(img)) = sum(mask * img)
  (Parseval; the half-plane columns stand for two)."""
  ft = scipy.fft.rfft2(_fiber_mask(diameter_arcsec))
  weight = np.full(ft.shape[1], 2.0)
  weight[0] = weight[-1] = 1.0  # Column 0 and the Nyquist column (even size) appear once.
  return (ft * weight / STAMP ** 2).astype(np.complex64)


def _blackbody_maggies(teff: float) -> np.ndarray:
  """(5,) PS1 maggies of a blackbody, arbitrary normalisation."""
  filt = filters()
  wave_cm = filt.wave * 1e-8
  flam = 1.0 / (wave_cm ** 5 * np.expm1(1.4388 / (wave_cm * teff)))
  return filt.weight @ flam * 1e-20


def _neighbours(rng, r_mag_galaxy: float) -> list:
  """A few fainter stars and galaxies away from the centre: list of dicts (pixel x, y, maggies,
  and for galaxies re_pix, q, pa_deg)."""
  out = []
  for _ in range(min(int(rng.poisson(2.0)), 6)):
    while True:
      x, y = rng.uniform(4, STAMP - 5, size=2)
      if np.hypot(x - CENTRE, y - CENTRE) > 32:  # >= 8 arcsec: never in the fiber.
        break
    lo = max(r_mag_galaxy + 0.5, 16.0)
    u = rng.random()
    r_mag = np.log10(10 ** (0.3 * lo) + u * (10 ** (0.3 * 23.5) - 10 ** (0.3 * lo))) / 0.3
    if rng.random() < 0.4:
      colour = _blackbody_maggies(rng.uniform(3500.0, 9000.0))
      shape = {}
    else:
      light = rng.dirichlet(np.ones(NUM_TEMPLATES))  # Rest r light fractions -> masses.
      colour = light * 10 ** (0.4 * templates().abs_mag_r) @ _template_maggies(
          rng.uniform(0.05, 0.8))
      shape = dict(re_pix=rng.uniform(0.3, 1.5) / PIXEL_ARCSEC, q=rng.uniform(0.3, 1.0),
                   pa_deg=rng.uniform(0, 180))
    maggies = colour / colour[BANDS.index("r")] * 10 ** (-0.4 * r_mag)
    out.append(dict(x=float(x), y=float(y), maggies=maggies, r_mag=float(r_mag), **shape))
  return out


def _add_neighbour(images, nb, counts_per_maggie, fwhm):
  """Adds one neighbour, PSF-convolved on a 64x64 box, to images (5, 288, 288) in place."""
  box = 64
  ix, iy = int(round(nb["x"])), int(round(nb["y"]))
  cx, cy = nb["x"] - ix + box // 2, nb["y"] - iy + box // 2
  if "re_pix" in nb:
    ft = scipy.fft.rfft2(_sersic_image(1.0, nb["re_pix"], nb["q"], nb["pa_deg"], box, cx, cy))
  else:  # A point: Fourier shift theorem.
    ky, kx = np.fft.fftfreq(box)[:, None], np.fft.rfftfreq(box)[None, :]
    ft = np.exp(-2j * np.pi * (kx * cx + ky * cy))
  y0, x0 = iy - box // 2, ix - box // 2
  ys, xs = slice(max(y0, 0), min(y0 + box, STAMP)), slice(max(x0, 0), min(x0 + box, STAMP))
  for k in range(len(BANDS)):
    stamp = scipy.fft.irfft2(ft * _psf_otf(box, fwhm[k]), s=(box, box))
    images[k, ys, xs] += (nb["maggies"][k] * counts_per_maggie[k]) * stamp[
        ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]


@dataclasses.dataclass(frozen=True)
class Rendered:
  """images: (5, 288, 288) float32 counts. model: same without noise and neighbours.
  flux: (5,) total galaxy counts (infinite plane). outside_frac: (5,) fraction of it off the
  stamp. fiber_frac: (2,) fraction of bulge, disk light in the fiber (spectroscopic seeing).
  neighbours: list of neighbour dicts."""
  images: np.ndarray
  model: np.ndarray
  flux: np.ndarray
  outside_frac: np.ndarray
  fiber_frac: np.ndarray
  neighbours: list


def render_images(gal: Galaxy, cond: Conditions, noise_rng=None,
                  neighbour_rng=None) -> Rendered:
  """PS1 grizy cutouts of `gal`: each component's unit profile is rendered once, convolved per
  band with that band's PSF by FFT and scaled by its filter-integrated flux.

  noise_rng: numpy Generator for Gaussian noise of variance sky_sigma^2 + counts (gain 1
  e-/count); None: noiseless. neighbour_rng: Generator drawing neighbouring stars and galaxies;
  None: no neighbours. Separate streams, so switching one off leaves the other unchanged.
  """
  scale = gal.kpc_per_arcsec() * PIXEL_ARCSEC  # kpc per pixel
  comps = [_sersic_image(4.0, gal.bulge_re_kpc / scale, gal.bulge_q, gal.pa_deg, STAMP, CENTRE,
                         CENTRE),
           _sersic_image(1.0, gal.disk_re_kpc / scale, gal.disk_q, gal.pa_deg, STAMP, CENTRE,
                         CENTRE)]
  inside = np.array([np.sum(c, dtype=np.float64) for c in comps])
  fts = [scipy.fft.rfft2(c.astype(np.float32)) for c in comps]
  counts_per_maggie = 10 ** (0.4 * cond.magzero)
  comp_counts = gal.component_maggies() * counts_per_maggie  # (2, 5)
  model = np.empty((len(BANDS), STAMP, STAMP), np.float32)
  for k in range(len(BANDS)):
    ft = (comp_counts[0, k] * fts[0] + comp_counts[1, k] * fts[1]) * _psf_otf(
        STAMP, cond.psf_fwhm_arcsec[k])
    model[k] = scipy.fft.irfft2(ft, s=(STAMP, STAMP))
  flux = comp_counts.sum(axis=0)
  outside = 1.0 - (comp_counts * inside[:, None]).sum(axis=0) / flux
  mask_ft = _fiber_mask_ft(FIBER_DIAMETER[cond.survey])
  spec_otf = _psf_otf(STAMP, cond.fiber_seeing_arcsec)
  fiber_frac = np.array([np.vdot(mask_ft, ft * spec_otf).real for ft in fts], np.float64)
  images, nbs = model.copy(), []
  if neighbour_rng is not None:
    nbs = _neighbours(neighbour_rng, gal.r_mag())
    for nb in nbs:
      _add_neighbour(images, nb, counts_per_maggie, cond.psf_fwhm_arcsec)
  if noise_rng is not None:
    sigma = np.sqrt(cond.sky_sigma[:, None, None] ** 2 + np.maximum(images, 0.0))
    images += sigma * noise_rng.standard_normal(images.shape, dtype=np.float32)
  return Rendered(images, model, flux, outside, fiber_frac, nbs)


# --------------------------------------------------------------------------- spectra

# Synthetic night sky per arcsec^2 [1e-17 erg/s/cm^2/A]: continuum ~ r 21 mag/arcsec^2 growing
# 1 mag per band to the red; [OI], NaD and a fixed pseudo-random OH forest (not a real line list).
_SKY_FIRST, _SKY_LAST = _SPEC_FIRST["BOSS"][0], _SPEC_LAST["BOSS"][1]  # Span of all spectra.
_SKY_LINES = ((5578.89, 60.0), (5891.58, 8.0), (5897.56, 6.0), (6302.05, 20.0), (6365.54, 7.0))


@functools.lru_cache(maxsize=None)
def _oh_forest():
  """(wavelengths [A], fluxes per arcsec^2 [1e-17 erg/s/cm^2]) of 160 fixed pseudo OH lines."""
  gen = np.random.default_rng(20240917)
  wave = np.sort(gen.uniform(6800.0, 10500.0, 160))
  return wave, gen.lognormal(0.0, 0.8, wave.size) * (2.0 + 6.0 * (wave - 6800.0) / 3700.0)


@functools.lru_cache(maxsize=None)
def _sky_lattice() -> np.ndarray:
  """Night sky per arcsec^2 [1e-17 erg/s/cm^2/A] on lattice indices _SKY_FIRST ... _SKY_LAST,
  lines at the nominal resolution (1 pixel sigma); computed once, sliced per spectrum."""
  wave = 10.0 ** (grid.LOGLAM0 + grid.DLOGLAM * np.arange(_SKY_FIRST, _SKY_LAST + 1))
  cont = 1.13 * (6200.0 / wave) ** 2 * 10 ** (0.4 * (wave - 6200.0) / 1300.0)
  oh_wave, oh_flux = _oh_forest()
  lw = np.concatenate([[w for w, _ in _SKY_LINES], oh_wave])
  lf = np.concatenate([[f for _, f in _SKY_LINES], oh_flux])
  return cont + _line_profiles(wave, lw, lf, PIX_KMS)


def _throughput(wave) -> np.ndarray:
  """Relative spectrograph + telescope + atmosphere throughput (peak 1), dichroic dip at 6000A."""
  return np.exp(-0.5 * ((wave - 6500.0) / 2200.0) ** 2) * (
      1 - 0.4 * np.exp(-0.5 * ((wave - 6000.0) / 60.0) ** 2))


@dataclasses.dataclass(frozen=True)
class Spectrum:
  """A fiber spectrum on the SDSS lattice. loglam: (N,) log10 Angstrom (vacuum). flux, model,
  sky: (N,) 1e-17 erg/s/cm^2/A. ivar: (N,) of flux (0 = bad). and_mask, or_mask: (N,) int32
  SDSS SPPIXMASK. wdisp: (N,) resolution sigma in lattice pixels. line_flux: (len(LINES),)
  fiber line fluxes [1e-17 erg/s/cm^2]. z_err: redshift error estimate."""
  loglam: np.ndarray
  flux: np.ndarray
  ivar: np.ndarray
  model: np.ndarray
  sky: np.ndarray
  and_mask: np.ndarray
  or_mask: np.ndarray
  wdisp: np.ndarray
  line_flux: np.ndarray
  snr_median: float
  z_err: float

  @property
  def wavelength(self) -> np.ndarray:
    """(N,) vacuum wavelength [Angstrom]."""
    return 10.0 ** self.loglam


def simulate_spectrum(gal: Galaxy, cond: Conditions, fiber_frac, rng=None) -> Spectrum:
  """What the fiber sees: fiber_frac (2,) of the bulge and disk SEDs, at SDSS resolution.

  rng: numpy Generator for the noise; None: noiseless (flux = model, ivar as if observed).
  Noise: variance (model + sky) / e + (read noise / e)^2 with e = gain x throughput [e- per
  1e-17 cgs/A], so median S/N per pixel runs from a few to ~20 with fiber magnitude. A bad
  column region gets ivar 0, FULLREJECT and interpolated flux, as spcoadd writes it.
  """
  index = np.arange(cond.spec_first, cond.spec_last + 1)
  loglam = grid.LOGLAM0 + grid.DLOGLAM * index
  wave = 10.0 ** loglam
  wdisp = cond.wdisp_pix * (1 - 0.4 * (loglam - np.log10(5000.0)))  # R grows to the red.
  inst_kms = np.interp((1 + gal.z) * LINE_WAVE, wave, wdisp) * PIX_KMS
  line_kms = np.sqrt(gal.gas_sigma_kms ** 2 + inst_kms ** 2)
  weights = np.asarray(fiber_frac) @ gal.weights
  model = observed_sed(wave, gal.z, weights, line_kms)
  line_flux = weights @ templates().line_flux * _dimming(gal.z) * 1e17
  area = np.pi * (0.5 * FIBER_DIAMETER[cond.survey]) ** 2
  sky = area * _sky_lattice()[cond.spec_first - _SKY_FIRST:cond.spec_last + 1 - _SKY_FIRST]
  e = cond.spec_gain * _throughput(wave)
  var = (np.maximum(model, 0) + sky) / e + (_READ_NOISE_E / e) ** 2
  flux = model + (0.0 if rng is None else np.sqrt(var) * rng.standard_normal(wave.size))
  ivar = 1.0 / var
  and_mask = np.where(sky > 8 * np.median(sky), BRIGHTSKY, 0).astype(np.int32)  # Sky lines.
  or_mask = and_mask.copy()
  start, length = cond.bad_pixels
  bad = slice(start, start + length)
  ivar[bad] = 0.0
  and_mask[bad] |= FULLREJECT
  or_mask[bad] |= FULLREJECT
  or_mask[max(start - 2, 0):start] |= NEARBADPIXEL
  or_mask[start + length:start + length + 2] |= NEARBADPIXEL
  flux[bad] = np.interp(wave[bad], wave[[start - 1, start + length]],
                        flux[[start - 1, start + length]])
  good = ivar > 0
  snr = float(np.median(model[good] * np.sqrt(ivar[good])))
  z_err = (1 + gal.z) * (1e-5 + 2e-4 / max(snr, 1.0))
  return Spectrum(loglam=loglam, flux=flux.astype(np.float32), ivar=ivar.astype(np.float32),
                  model=model.astype(np.float32), sky=sky.astype(np.float32),
                  and_mask=and_mask, or_mask=or_mask, wdisp=wdisp.astype(np.float32),
                  line_flux=line_flux, snr_median=snr, z_err=float(z_err))


# --------------------------------------------------------------------------- identifiers


def specobj_id(plate: int, mjd: int, fiberid: int, run2d_code: int = RUN2D_CODE) -> int:
  """SDSS DR8+ SPECOBJID bit encoding (run2d 26: 266, 51630, 1 -> 299489677444933632)."""
  return (plate << 50) | (fiberid << 38) | ((mjd - 50000) << 24) | (run2d_code << 10)


@dataclasses.dataclass(frozen=True)
class Target:
  """Where a galaxy sits in the spectroscopic survey. ra, dec in degrees (8 significant digits,
  as data.csv writes them)."""
  plate: int
  mjd: int
  fiberid: int
  ra: float
  dec: float
  survey: str

  @property
  def specobj_id(self) -> int:
    return specobj_id(self.plate, self.mjd, self.fiberid)


def _boss_probability(z: float) -> float:
  """BOSS reached further: 35% of low-z galaxies, up to 70% at high z, have BOSS fibers."""
  return float(np.clip(0.35 + 1.2 * (z - 0.05), 0.35, 0.7))


def assign_targets(redshifts: Sequence[float], seed: int) -> list:
  """Unique (plate, mjd, fiberid) and sky positions for galaxies at `redshifts`.

  Galaxies fill plates a few at a time (fibers drawn without replacement); plate numbers grow
  with mjd as in SDSS; positions lie within 1.49 deg of the plate centre.
  """
  rng = np.random.default_rng(np.random.SeedSequence([seed, 7919]))
  surveys = ["BOSS" if rng.random() < _boss_probability(z) else "SDSS" for z in redshifts]
  targets = [None] * len(redshifts)
  for survey in ("SDSS", "BOSS"):
    idx = [i for i, s in enumerate(surveys) if s == survey]
    lo, hi = _PLATES[survey]
    mean_fill = max(4, int(np.ceil(2.0 * len(idx) / (hi - lo + 1))))
    if len(idx) > (hi - lo + 1) * min(2 * mean_fill, _FIBERS[survey]):
      raise ValueError(f"too many {survey} galaxies for unique plates and fibers")
    plates = iter(rng.permutation(np.arange(lo, hi + 1)))
    pos = 0
    while pos < len(idx):
      plate = int(next(plates))
      frac = (plate - lo) / (hi - lo)
      mjd = int(np.clip(_MJDS[survey][0] + frac * (_MJDS[survey][1] - _MJDS[survey][0])
                        + rng.integers(-60, 61), *_MJDS[survey]))
      count = min(int(rng.integers(1, 2 * mean_fill)), len(idx) - pos)
      fibers = np.sort(rng.choice(np.arange(1, _FIBERS[survey] + 1), count, replace=False))
      ra_c, dec_c = _plate_centre(rng)
      for fiber in fibers:
        rad, phi = 1.49 * np.sqrt(rng.random()), 2 * np.pi * rng.random()
        dec = float(np.clip(dec_c + rad * np.sin(phi), -89.0, 89.0))
        ra = float((ra_c + rad * np.cos(phi) / np.cos(np.deg2rad(dec))) % 360.0)
        targets[idx[pos]] = Target(plate, mjd, int(fiber), float(f"{ra:.8g}"),
                                   float(f"{dec:.8g}"), survey)
        pos += 1
  return targets


def _plate_centre(rng):
  """A plate centre in the SDSS footprint: 3/4 north galactic cap, 1/4 southern stripes."""
  if rng.random() < 0.75:
    ra = rng.uniform(110.0, 260.0)
    dec = np.rad2deg(np.arcsin(rng.uniform(np.sin(np.deg2rad(-5)), np.sin(np.deg2rad(65)))))
  else:
    ra = rng.uniform(-50.0, 60.0) % 360.0
    dec = np.rad2deg(np.arcsin(rng.uniform(np.sin(np.deg2rad(-10)), np.sin(np.deg2rad(35)))))
  return float(ra), float(dec)


# --------------------------------------------------------------------------- writers


@functools.lru_cache(maxsize=None)
def _image_header():
  """Header of a cutout with placeholder values, which `_image_bytes` replaces per file."""
  from astropy.io import fits  # pylint: disable=g-import-not-at-top
  h = fits.Header()
  h["SIMPLE"] = (True, "conforms to FITS standard")
  h["BITPIX"] = (-32, "array data type")
  h["NAXIS"] = (2, "number of array dimensions")
  h["NAXIS1"] = STAMP
  h["NAXIS2"] = STAMP
  h["BUNIT"] = ("count", "linear; AB mag = MAGZERO - 2.5 log10(sum)")
  h["EXPTIME"] = (1.0, "[s] exposure time of the stack")
  h["MAGZERO"] = (25.0, "[mag] AB zero point = 25 + 2.5 log10(EXPTIME)")
  h["HIERARCH FPA.ZP"] = (PS1_ZP_1S, "[mag] AB zero point for 1 s")
  h["HIERARCH FPA.EXPOSURE"] = (1.0, "[s] exposure time of the stack")
  h["HIERARCH FPA.FILTER"] = ("g.00000", "PS1 filter")
  h["FILTER"] = ("g", "PS1 band")
  h["PSF_FWHM"] = (1.0, "[arcsec] PSF full width at half maximum")
  h["SKYSIG"] = (1.0, "[count] rms of the sky noise per pixel")
  h["MAGLIM5"] = (23.0, "[mag] 5 sigma point-source AB depth")
  h["PIXSCALE"] = (PIXEL_ARCSEC, "[arcsec/pixel]")
  h["RADESYS"] = "ICRS"
  h["EQUINOX"] = 2000.0
  h["CTYPE1"] = "RA---TAN"
  h["CTYPE2"] = "DEC--TAN"
  h["CUNIT1"] = "deg"
  h["CUNIT2"] = "deg"
  h["CRVAL1"] = (0.0, "[deg] RA of the galaxy")
  h["CRVAL2"] = (0.0, "[deg] Dec of the galaxy")
  h["CRPIX1"] = (CENTRE + 1, "image centre (1-based)")
  h["CRPIX2"] = (CENTRE + 1, "image centre (1-based)")
  h["CDELT1"] = (-PIXEL_ARCSEC / 3600, "[deg/pixel] RA grows to the left")
  h["CDELT2"] = (PIXEL_ARCSEC / 3600, "[deg/pixel]")
  h["OBJECT"] = ("0", "SDSS specobj_id")
  h["ORIGIN"] = ("astra_jax.data.mock", "mock PS1 3pi stack cutout")
  return h


def _fits_value(value) -> str:
  """Fixed-format FITS value field (right-justified numbers, quoted strings)."""
  if isinstance(value, str):
    return f"{chr(39) + value.ljust(8) + chr(39):<20}"
  text = f"{float(value):.12G}"
  mantissa, _, exponent = text.partition("E")
  if "." not in mantissa:
    mantissa += ".0"
  return f"{mantissa + ('E' + exponent if exponent else ''):>20}"


def _fits_card(key: str, value, comment: str) -> str:
  """An 80-character card; keys longer than 8 characters use the HIERARCH convention."""
  head = f"HIERARCH {key} = " if len(key) > 8 or "." in key else f"{key:<8}= "
  card = f"{head}{_fits_value(value)} / {comment}"
  if len(card) > 80:
    raise ValueError(f"FITS card too long: {card!r}")
  return card.ljust(80)


@functools.lru_cache(maxsize=None)
def _image_cards():
  """(80-character cards of `_image_header`, {key: card index}, {key: comment})."""
  h = _image_header()
  text = h.tostring()
  cards = [text[i:i + 80] for i in range(0, len(text), 80)]
  cards = cards[:[c[:8] for c in cards].index("END     ")]
  index = {}
  for i, card in enumerate(cards):
    key = card[9:].split("=")[0].strip() if card.startswith("HIERARCH") else card[:8].strip()
    index[key] = i
  return cards, index, {c.keyword: c.comment for c in h.cards}


def _image_bytes(image, band, k, target, cond) -> bytes:
  """One cutout as a FITS file (primary HDU only); cards are formatted here, not by astropy,
  which would take ~1 ms per header."""
  cards, index, comments = _image_cards()
  cards = list(cards)
  values = {"EXPTIME": float(cond.exptime[k]), "MAGZERO": round(float(cond.magzero[k]), 6),
            "FPA.EXPOSURE": float(cond.exptime[k]), "FPA.FILTER": f"{band}.00000",
            "FILTER": band, "PSF_FWHM": round(float(cond.psf_fwhm_arcsec[k]), 4),
            "SKYSIG": round(float(cond.sky_sigma[k]), 4),
            "MAGLIM5": round(float(cond.depth5[k]), 4), "CRVAL1": target.ra,
            "CRVAL2": target.dec, "OBJECT": str(target.specobj_id)}
  for key, value in values.items():
    cards[index[key]] = _fits_card(key, value, comments[key])
  header = "".join(cards) + "END".ljust(80)
  header += " " * (-len(header) % 2880)
  data = np.ascontiguousarray(image, dtype=">f4").tobytes()
  return header.encode("ascii") + data + b"\0" * (-len(data) % 2880)


def _spectrum_csv(spec: Spectrum) -> str:
  """spectrum.csv text: `wavelength,flux`, then `%.3f,%.6g` rows (Angstrom, 1e-17 cgs/A)."""
  values = np.empty(2 * spec.loglam.size)
  values[0::2] = spec.wavelength
  values[1::2] = spec.flux
  return "wavelength,flux\n" + ("%.3f,%.6g\n" * spec.loglam.size) % tuple(values.tolist())


def _write_lite_spec(path, spec: Spectrum, target: Target, gal: Galaxy):
  """SDSS DR16 lite spec file: PRIMARY, COADD, SPALL, SPZLINE."""
  from astropy.io import fits  # pylint: disable=g-import-not-at-top
  primary = fits.PrimaryHDU()
  h = primary.header
  h["TELESCOP"] = "SDSS 2.5-M"
  h["PLATEID"] = (target.plate, "plate number")
  h["MJD"] = (target.mjd, "MJD of observation")
  h["FIBERID"] = (target.fiberid, "fiber number")
  h["PLUG_RA"] = (target.ra, "[deg] RA of the fiber")
  h["PLUG_DEC"] = (target.dec, "[deg] Dec of the fiber")
  h["RUN2D"] = str(RUN2D_CODE)
  h["COEFF0"] = (round(float(spec.loglam[0]), 4), "log10 lambda [A] of the first pixel")
  h["COEFF1"] = (grid.DLOGLAM, "log10 lambda step per pixel")
  h["BUNIT"] = ("1E-17 erg/cm^2/s/Ang", "flux unit")
  h["ORIGIN"] = "astra_jax.data.mock"
  flux_unit = "1e-17 erg / (Angstrom cm2 s)"
  cols = [
      fits.Column("flux", "E", flux_unit, array=spec.flux),
      fits.Column("loglam", "E", "log10(Angstrom)", array=spec.loglam.astype(np.float32)),
      fits.Column("ivar", "E", "1e+34 Angstrom2 cm4 s2 / erg2", array=spec.ivar),
      fits.Column("and_mask", "J", array=spec.and_mask),
      fits.Column("or_mask", "J", array=spec.or_mask),
      fits.Column("wdisp", "E", "pixel", array=spec.wdisp),
      fits.Column("sky", "E", flux_unit, array=spec.sky),
      fits.Column("model", "E", flux_unit, array=spec.model)]
  coadd = fits.BinTableHDU.from_columns(cols, name="COADD")
  sid = str(target.specobj_id)
  subclass = "STARFORMING" if spec.line_flux[LINE_NAMES.index("Halpha_6565")] > 0 and \
      gal.activity > 0.5 else ""
  spall = fits.BinTableHDU.from_columns([
      fits.Column("PLATE", "J", array=[target.plate]),
      fits.Column("MJD", "J", array=[target.mjd]),
      fits.Column("FIBERID", "J", array=[target.fiberid]),
      fits.Column("SPECOBJID", f"{len(sid)}A", array=[sid]),
      fits.Column("RUN2D", "2A", array=[str(RUN2D_CODE)]),
      fits.Column("SURVEY", "4A", array=[target.survey.lower()]),
      fits.Column("CLASS", "6A", array=["GALAXY"]),
      fits.Column("SUBCLASS", "11A", array=[subclass]),
      fits.Column("Z", "E", array=[gal.z]),
      fits.Column("Z_ERR", "E", array=[spec.z_err]),
      fits.Column("ZWARNING", "J", array=[0]),
      fits.Column("RA", "D", "deg", array=[target.ra]),
      fits.Column("DEC", "D", "deg", array=[target.dec]),
      fits.Column("PLUG_RA", "D", "deg", array=[target.ra]),
      fits.Column("PLUG_DEC", "D", "deg", array=[target.dec]),
      fits.Column("SN_MEDIAN_ALL", "E", array=[spec.snr_median])], name="SPALL")
  n = len(LINES)
  zline = fits.BinTableHDU.from_columns([
      fits.Column("LINENAME", f"{max(map(len, LINE_NAMES))}A", array=list(LINE_NAMES)),
      fits.Column("LINEWAVE", "D", "Angstrom", array=LINE_WAVE),
      fits.Column("LINEZ", "E", array=np.full(n, gal.z)),
      fits.Column("LINESIGMA", "E", "km/s", array=np.full(n, gal.gas_sigma_kms)),
      fits.Column("LINEAREA", "E", "1e-17 erg / (cm2 s)", array=spec.line_flux)], name="SPZLINE")
  fits.HDUList([primary, coadd, spall, zline]).writeto(path, overwrite=True)


_TRUTH_LINES = ("Halpha_6565", "Hbeta_4863", "OIII_5008", "OII_3727", "OII_3730", "NII_6585")


def _truth_row(target, gal, cond, rendered, spec) -> dict:
  """Truth of one galaxy as an ordered dict (truth.csv row); units in the column names.

  Identification: specobj_id, plate, mjd, fiberid, survey (SDSS|BOSS), ra_deg, dec_deg, z.
  Cosmology: d_lum_mpc, d_ang_mpc, kpc_per_arcsec. Population: abs_mag_r_ab (rest PS1 r),
  bulge_to_total_r (rest r light), sf_activity. Structure: {bulge,disk}_sersic_n,
  {bulge,disk}_re_{kpc,arcsec} (major-axis half-light radius), {bulge,disk}_q, pa_deg (East of
  North). Stellar populations: {bulge,disk}_template{0..4}_msun (kcorrect v4 masses formed),
  {bulge,disk}_log10_mass_formed_msun. Per band b: mag_b_ab, bulge_mag_b_ab, disk_mag_b_ab
  (total, filter-integrated SED), flux_b_count (total counts), outside_stamp_frac_b,
  psf_fwhm_b_arcsec, exptime_b_s, magzero_b_ab, sky_sigma_b_count, depth5_b_ab. Fiber:
  fiber_diameter_arcsec, fiber_seeing_fwhm_arcsec, fiber_frac_{bulge,disk}, fibermag_b_ab,
  fiberflux_b_nanomaggies. Spectrum: spec_npix, spec_loglam_first, spec_wave_{min,max}_angstrom,
  spec_snr_median (per pixel), spec_wdisp_pix, z_err, gas_sigma_kms, and
  fiber_line_{name}_1e-17_erg_s_cm2 for Halpha_6565, Hbeta_4863, OIII_5008, OII_3727, OII_3730,
  NII_6585. num_neighbours.
  """
  kpc = gal.kpc_per_arcsec()
  mags = -2.5 * np.log10(gal.component_maggies())  # (2, 5)
  total = -2.5 * np.log10(gal.component_maggies().sum(axis=0))
  fiber_maggies = rendered.fiber_frac @ gal.component_maggies()
  row = dict(specobj_id=target.specobj_id, plate=target.plate, mjd=target.mjd,
             fiberid=target.fiberid, survey=target.survey, ra_deg=target.ra, dec_deg=target.dec,
             z=gal.z, d_lum_mpc=float(cosmology().lum_dist(gal.z)),
             d_ang_mpc=float(cosmology().ang_dist(gal.z)), kpc_per_arcsec=kpc,
             abs_mag_r_ab=gal.abs_mag_r, bulge_to_total_r=gal.bulge_to_total,
             sf_activity=gal.activity, bulge_sersic_n=4.0, disk_sersic_n=1.0,
             bulge_re_kpc=gal.bulge_re_kpc, bulge_re_arcsec=gal.bulge_re_kpc / kpc,
             disk_re_kpc=gal.disk_re_kpc, disk_re_arcsec=gal.disk_re_kpc / kpc,
             bulge_q=gal.bulge_q, disk_q=gal.disk_q, pa_deg=gal.pa_deg)
  for comp, w in (("bulge", gal.bulge_weights), ("disk", gal.disk_weights)):
    row.update({f"{comp}_template{k}_msun": float(w[k]) for k in range(NUM_TEMPLATES)})
    row[f"{comp}_log10_mass_formed_msun"] = float(np.log10(w.sum()))
  for k, b in enumerate(BANDS):
    row.update({f"mag_{b}_ab": total[k], f"bulge_mag_{b}_ab": mags[0, k],
                f"disk_mag_{b}_ab": mags[1, k],
                f"flux_{b}_count": rendered.flux[k],
                f"outside_stamp_frac_{b}": rendered.outside_frac[k],
                f"psf_fwhm_{b}_arcsec": cond.psf_fwhm_arcsec[k],
                f"exptime_{b}_s": cond.exptime[k], f"magzero_{b}_ab": cond.magzero[k],
                f"sky_sigma_{b}_count": cond.sky_sigma[k], f"depth5_{b}_ab": cond.depth5[k]})
  row.update(fiber_diameter_arcsec=FIBER_DIAMETER[cond.survey],
             fiber_seeing_fwhm_arcsec=cond.fiber_seeing_arcsec,
             fiber_frac_bulge=rendered.fiber_frac[0], fiber_frac_disk=rendered.fiber_frac[1])
  for k, b in enumerate(BANDS):
    row[f"fibermag_{b}_ab"] = -2.5 * np.log10(fiber_maggies[k])
    row[f"fiberflux_{b}_nanomaggies"] = fiber_maggies[k] * 1e9
  row.update(spec_npix=spec.loglam.size, spec_loglam_first=round(float(spec.loglam[0]), 4),
             spec_wave_min_angstrom=spec.wavelength[0],
             spec_wave_max_angstrom=spec.wavelength[-1], spec_snr_median=spec.snr_median,
             spec_wdisp_pix=cond.wdisp_pix, z_err=spec.z_err, gas_sigma_kms=gal.gas_sigma_kms)
  for name in _TRUTH_LINES:
    row[f"fiber_line_{name}_1e-17_erg_s_cm2"] = spec.line_flux[LINE_NAMES.index(name)]
  row["num_neighbours"] = len(rendered.neighbours)
  return row


def _format(value) -> str:
  """truth.csv field: integers and strings as they are, floats with 9 significant digits."""
  if isinstance(value, (str, int, np.integer)):
    return str(value)
  return f"{float(value):.9g}"


# --------------------------------------------------------------------------- survey driver


@dataclasses.dataclass(frozen=True)
class _Task:
  index: int
  seed: int
  out_dir: str
  galaxy: Galaxy
  target: Target
  sdss_spec: bool
  noise: bool
  neighbours: bool


def _run_task(task: _Task) -> dict:
  """Renders, writes and returns the truth row of one galaxy (deterministic given the task)."""
  streams = np.random.SeedSequence([task.seed, task.index, 1]).spawn(4)
  rng_cond, rng_nb, rng_img, rng_spec = (np.random.default_rng(s) for s in streams)
  gal, target = task.galaxy, task.target
  cond = sample_conditions(rng_cond, target.survey)
  rendered = render_images(gal, cond, noise_rng=rng_img if task.noise else None,
                           neighbour_rng=rng_nb if task.neighbours else None)
  spec = simulate_spectrum(gal, cond, rendered.fiber_frac, rng_spec if task.noise else None)
  sid = str(target.specobj_id)
  gal_dir = os.path.join(task.out_dir, f"Galaxy_{sid}")
  os.makedirs(os.path.join(gal_dir, "images"), exist_ok=True)
  os.makedirs(os.path.join(gal_dir, "spectrum"), exist_ok=True)
  for k, band in enumerate(BANDS):
    with open(os.path.join(gal_dir, "images", f"{sid}_{band}.fits"), "wb") as f:
      f.write(_image_bytes(rendered.images[k], band, k, target, cond))
  with open(os.path.join(gal_dir, "spectrum", "spectrum.csv"), "w") as f:
    f.write(_spectrum_csv(spec))
  if task.sdss_spec:
    name = f"spec-{target.plate:04d}-{target.mjd:05d}-{target.fiberid:04d}.fits"
    _write_lite_spec(os.path.join(gal_dir, "spectrum", name), spec, target, gal)
  return _truth_row(target, gal, cond, rendered, spec)


def _sample_one(args) -> Galaxy:
  """Galaxy `index` of survey `seed`: its own stream, so independent of the worker count."""
  seed, index = args
  return sample_galaxy(np.random.default_rng(np.random.SeedSequence([seed, index, 0])))


def _warm_caches():
  """Fills the caches before forking, so workers inherit them."""
  templates(), filters(), cosmology(), _proposal_tables(), _image_header(), _fiber_mask(3.0)


def generate_survey(out_dir, num_galaxies: int, seed: int, sdss_spec: bool = False,
                    progress: bool = False, num_workers: Optional[int] = None,
                    noise: bool = True, neighbours: bool = True) -> list:
  """Writes a mock ASTROPIXEL survey to `out_dir`; returns the specobj_id strings in row order.

  Galaxy i depends only on (seed, i) (numpy SeedSequence streams); plates, fibers and sky
  positions on (seed, all redshifts). Files are byte-identical for equal arguments, whatever
  `num_workers` (processes; None: up to 2 for surveys of 50 galaxies or more, else 1).
  noise=False / neighbours=False switch off the image and spectrum noise / the neighbouring
  sources (for tests). ~40 ms of CPU per galaxy.
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  _warm_caches()
  if num_workers is None:
    num_workers = min(2, os.cpu_count() or 1) if num_galaxies >= 50 else 1
  pool = None
  if num_workers > 1 and num_galaxies > 1:
    threaded = any(m in sys.modules for m in ("jax", "tensorflow", "torch"))
    method = "spawn" if threaded else "fork"  # Forking a process with XLA/TF threads can hang.
    pool = multiprocessing.get_context(method).Pool(num_workers)
  try:
    jobs = [(seed, i) for i in range(num_galaxies)]
    galaxies = pool.map(_sample_one, jobs, chunksize=16) if pool else list(map(_sample_one, jobs))
    targets = assign_targets([g.z for g in galaxies], seed)
    tasks = [_Task(i, seed, out_dir, g, t, sdss_spec, noise, neighbours)
             for i, (g, t) in enumerate(zip(galaxies, targets))]
    results = pool.imap(_run_task, tasks, chunksize=4) if pool else map(_run_task, tasks)
    if progress:
      import tqdm  # pylint: disable=g-import-not-at-top
      results = tqdm.tqdm(results, total=num_galaxies, desc="mock galaxies", unit="gal")
    rows = list(results)
  finally:
    if pool:
      pool.close()
      pool.join()
  _write_tables(out_dir, rows)
  return [str(r["specobj_id"]) for r in rows]


def _write_tables(out_dir: str, rows: list):
  """data.csv (CasJobs style) and truth.csv."""
  with open(os.path.join(out_dir, "data.csv"), "w") as f:
    f.write("#plate,mjd,fiberid,specobj_id,ra,dec,z\n")
    for r in rows:
      f.write(f"{r['plate']},{r['mjd']},{r['fiberid']},'{r['specobj_id']}',"
              f"{r['ra_deg']:.8g},{r['dec_deg']:.8g},{r['z']:.7g}\n")
  with open(os.path.join(out_dir, "truth.csv"), "w") as f:
    if rows:
      f.write(",".join(rows[0]) + "\n")
    for r in rows:
      f.write(",".join(_format(v) for v in r.values()) + "\n")


def main(argv=None):
  """CLI: writes the survey and prints a one-line summary."""
  parser = argparse.ArgumentParser(prog="python -m astra_jax.data.mock", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out_dir", required=True, help="survey directory to write")
  parser.add_argument("--num_galaxies", type=int, default=100)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--sdss_spec", action="store_true",
                      help="also write spec-PPPP-MMMMM-FFFF.fits (SDSS DR16 lite)")
  parser.add_argument("--num_workers", type=int, default=min(2, os.cpu_count() or 1))
  args = parser.parse_args(argv)
  start = time.time()
  ids = generate_survey(args.out_dir, args.num_galaxies, args.seed, sdss_spec=args.sdss_spec,
                        progress=args.num_galaxies >= 50, num_workers=args.num_workers)
  secs = time.time() - start
  print(f"mock survey: {len(ids)} galaxies (seed {args.seed}) in {args.out_dir} "
        f"in {secs:.1f} s ({len(ids) / max(secs, 1e-9):.1f} galaxies/s, "
        f"{args.num_workers} workers)")


if __name__ == "__main__":
  main()
