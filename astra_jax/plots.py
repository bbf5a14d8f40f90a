"""Figures of a trained run from numpy arrays.

Each `*_figure` function returns a matplotlib Figure (a notebook shows it); the function of the
same name without the suffix writes it as one PNG, closes it and returns the path.

Spectra are flux in 1e-17 erg/s/cm^2/Angstrom against vacuum observed-frame wavelength in Angstrom;
redshift figures use dz = (z_pred - z_true) / (1 + z_true) as `astra_jax.evaluate` does.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib
# Files only (no display on clusters or in tests), unless a backend was asked for: Jupyter's
# kernels set MPLBACKEND to their inline backend, which shows each figure under its cell.
if not os.environ.get("MPLBACKEND"):
  matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import cm  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import colors  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import figure as mpl_figure  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import ticker  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from astropy import visualization  # pylint: disable=g-import-not-at-top,wrong-import-position

from astra_jax import evaluate  # pylint: disable=g-import-not-at-top,wrong-import-position
from astra_jax.data import examples  # pylint: disable=g-import-not-at-top,wrong-import-position
from astra_jax.data import preprocess  # pylint: disable=g-import-not-at-top,wrong-import-position

#: Rest-frame vacuum wavelengths (Angstrom) of lines marked on the spectra: (label, lambda, kind).
#: Ca H, 35 Angstrom from K, is drawn without a label of its own (the two would overlap).
LINES = (
    ("[OII]", 3728.5, "emission"),
    ("Ca H&K", 3934.8, "absorption"),
    ("", 3969.6, "absorption"),
    (r"H$\beta$", 4862.7, "emission"),
    ("[OIII]", 5008.2, "emission"),
    ("Mg b", 5176.7, "absorption"),
    ("Na D", 5895.6, "absorption"),
    (r"H$\alpha$", 6564.6, "emission"),
)
_LINE_COLOURS = {"emission": "tab:blue", "absorption": "tab:red"}
_DPI = 110


#: The standard composite (Lupton et al. 2004): i -> red, r -> green, g -> blue.
GRI_CHANNELS = (("i",), ("r",), ("g",))
#: Colour composite of all five bands: (z, y) -> red, (r, i) -> green, g -> blue, each channel
#: the mean of its bands' fluxes.
GRIZY_CHANNELS = (("z", "y"), ("r", "i"), ("g",))
#: `colour_image`'s Lupton asinh (astropy's LuptonAsinhStretch), in nanomaggies per 0.25" pixel
#: of the channels' mean flux I: linear below LUPTON_STRETCH_NMGY / LUPTON_Q = 0.03, about the
#: g, r, i softening of the stored images (2.5 PS1 sky sigmas), so that the sky's noise stays
#: dark; white from 1.85 (0.03 sinh(10 asinh(LUPTON_Q / 10))), the core of a bright galaxy: the
#: mock survey's galaxies peak at 0.3-3.4 in 96-pixel images.
LUPTON_Q = 5.0
LUPTON_STRETCH_NMGY = 0.15


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=_DPI, bbox_inches="tight")
  plt.close(fig)
  return path


def _flux_limits(true: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
  """y range: the 1st-99th percentile of the true flux and 5th-95th of the predicted one.

  Percentiles, because a few noise spikes or sky residuals would otherwise flatten the spectrum;
  a margin on top leaves room for the line labels.
  """
  true, pred = true[np.isfinite(true)], pred[np.isfinite(pred)]
  bounds = [np.percentile(v, q) for v, q in ((true, (1, 99)), (pred, (5, 95))) if v.size]
  if not bounds:
    return -1.0, 1.0
  lo, hi = min(b[0] for b in bounds), max(b[1] for b in bounds)
  span = max(hi - lo, 1e-3)
  return lo - 0.1 * span, hi + 0.3 * span


def masked_ranges(wavelength: np.ndarray, weight: np.ndarray) -> list[tuple[float, float]]:
  """(start, end) Angstrom of each run of consecutive masked pixels (weight <= 0 or not finite).

  wavelength (P,) increasing pixel centres, weight (P,). A run spans its pixels' full width: it
  starts and ends half-way to the neighbouring pixel centres (at the grid ends, half a pixel out).
  """
  wavelength = np.asarray(wavelength, np.float64)
  bad = ~(np.asarray(weight) > 0)
  # Pixel boundaries: midpoints between centres, extrapolated by half a pixel at both ends.
  mid = 0.5 * (wavelength[1:] + wavelength[:-1])
  edges = np.concatenate([[2 * wavelength[0] - mid[0]], mid, [2 * wavelength[-1] - mid[-1]]])
  change = np.diff(np.concatenate([[False], bad, [False]]).astype(np.int8))
  starts, ends = np.flatnonzero(change == 1), np.flatnonzero(change == -1)
  return [(float(edges[a]), float(edges[b])) for a, b in zip(starts, ends)]


def _mark_lines(ax, wavelength: np.ndarray, z: float):
  """The LINES at (1 + z) lambda, labelled at the top of `ax`; nothing when z is not finite."""
  if not np.isfinite(z):
    return
  for label, rest, kind in LINES:
    observed = (1.0 + z) * rest
    if wavelength[0] < observed < wavelength[-1]:
      ax.axvline(observed, color=_LINE_COLOURS[kind], lw=0.7, ls="--", alpha=0.6)
      if label:
        ax.text(observed, 0.97, label, transform=ax.get_xaxis_transform(), rotation=90,
                ha="right", va="top", fontsize=7, color=_LINE_COLOURS[kind],
                bbox=dict(facecolor="white", edgecolor="none", alpha=0.7, pad=0.5))


def _spectrum_panel(ax, wavelength, flux_true, weight, flux_pred, z_true, title: str,
                    shade_masked: bool):
  """True flux where weight > 0 (gaps elsewhere), the prediction, lines, masked runs shaded."""
  true = np.where(weight > 0, flux_true, np.nan)
  ax.plot(wavelength, true, color="0.5", lw=0.5, label="true")
  ax.plot(wavelength, flux_pred, color="tab:orange", lw=0.9, alpha=0.9, label="predicted")
  if shade_masked:
    ranges = masked_ranges(wavelength, weight)
    if ranges:
      ax.broken_barh([(a, b - a) for a, b in ranges], (0, 1), transform=ax.get_xaxis_transform(),
                     facecolor="0.85", edgecolor="none", zorder=0, label="masked (weight 0)")
  ax.set_ylim(*_flux_limits(true, flux_pred))
  _mark_lines(ax, wavelength, z_true)
  ax.set_title(title, fontsize=8, loc="left")
  ax.tick_params(labelsize=7)


def _title(i: int, names, z_true, z_pred) -> str:
  title = [] if names is None else [str(names[i])]
  title.append(f"z_true={z_true[i]:.3f}")
  if z_pred is not None:
    title.append(f"z_pred={z_pred[i]:.3f}")
  return "   ".join(title)


_WAVELENGTH_LABEL = r"observed vacuum wavelength [$\AA$]"
_FLUX_LABEL = r"flux [$10^{-17}$ erg s$^{-1}$ cm$^{-2}$ $\AA^{-1}$]"


def spectra_figure(wavelength: np.ndarray, flux_true: np.ndarray, weight: np.ndarray,
                   flux_pred: np.ndarray, z_true: np.ndarray, z_pred: np.ndarray | None = None,
                   names: Sequence[str] | None = None, num: int = 8) -> mpl_figure.Figure:
  """True (where weight > 0) and predicted spectra of the first `num` galaxies, lines marked.

  wavelength (P,) Angstrom; flux_true, weight, flux_pred (N, P), flux in
  1e-17 erg/s/cm^2/Angstrom; z_true (N,) places the LINES at (1 + z_true) lambda (NaN: no lines);
  z_pred (N,) and names (N,) go into each panel's title.
  """
  n = min(num, len(flux_pred))
  cols = 1 if n < 4 else 2
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(8 * cols, 2.4 * rows), sharex=True, squeeze=False)
  for ax in axes.flat[n:]:
    ax.set_visible(False)
  for i, ax in enumerate(axes.flat[:n]):
    _spectrum_panel(ax, wavelength, flux_true[i], weight[i], flux_pred[i], z_true[i],
                    _title(i, names, z_true, z_pred), shade_masked=False)
    if i >= n - cols:
      ax.set_xlabel(_WAVELENGTH_LABEL, fontsize=8)
      ax.xaxis.set_tick_params(labelbottom=True)
  fig.text(0.0, 0.5, _FLUX_LABEL, rotation=90, va="center", ha="right")
  fig.tight_layout()
  # Above the panels, where it hides no spectrum.
  fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower right", ncol=2, fontsize=8,
             bbox_to_anchor=(1.0, 1.0), frameon=False)
  return fig


def spectra(path: str, *args, **kwargs) -> str:
  """`spectra_figure(*args, **kwargs)` written to `path` (PNG); returns `path`."""
  return _save(spectra_figure(*args, **kwargs), path)


def _channels_label(channels: Sequence[Sequence[str]]) -> str:
  """"R: i  G: r  B: g" for GRI_CHANNELS, "R: z,y  G: r,i  B: g" for GRIZY_CHANNELS."""
  return "  ".join(f"{k}: {','.join(c)}" for k, c in zip("RGB", channels))


def galaxies_figure(images: np.ndarray, bands: Sequence[str], wavelength: np.ndarray,
                    flux_true: np.ndarray, weight: np.ndarray, flux_pred: np.ndarray,
                    z_true: np.ndarray, z_pred: np.ndarray | None = None,
                    names: Sequence[str] | None = None,
                    channels: Sequence[Sequence[str]] = GRI_CHANNELS) -> mpl_figure.Figure:
  """One row per galaxy: its colour composite, then its true and predicted spectra.

  images (N, bands, H, W) asinh-stretched, composited by `colour_image(image, bands, channels)`;
  wavelength (P,) Angstrom; flux_true, weight, flux_pred (N, P), flux in
  1e-17 erg/s/cm^2/Angstrom. The true flux is drawn only where weight > 0, and every run of
  masked pixels (weight 0) is shaded grey: a gap in the line is a masked pixel, not a zero flux.
  z_true (N,) places the LINES; z_pred, names (N,) go into the titles.
  """
  n = len(images)
  fig, axes = plt.subplots(n, 2, figsize=(11, 2.3 * n + 0.4), squeeze=False, sharex="col",
                           gridspec_kw=dict(width_ratios=(1, 4.2)))
  for i in range(n):
    image_ax, spec_ax = axes[i]
    image_ax.imshow(colour_image(images[i], bands, channels), origin="lower")
    image_ax.set_xticks([])
    image_ax.set_yticks([])
    _spectrum_panel(spec_ax, wavelength, flux_true[i], weight[i], flux_pred[i], z_true[i],
                    _title(i, names, z_true, z_pred), shade_masked=True)
  axes[0, 0].set_title(_channels_label(channels), fontsize=8)
  axes[-1, 1].set_xlabel(_WAVELENGTH_LABEL, fontsize=8)
  axes[n // 2, 1].set_ylabel(_FLUX_LABEL, fontsize=8)
  fig.tight_layout()
  handles = {}
  for ax in axes[:, 1]:  # The legend of every kind drawn, masked runs included if any.
    for handle, label in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(label, handle)
  fig.legend(handles.values(), handles.keys(), loc="lower right", ncol=len(handles), fontsize=8,
             bbox_to_anchor=(1.0, 1.0), frameon=False)
  return fig


def z_pdfs_figure(edges: np.ndarray, z_pdf: np.ndarray, z_true: np.ndarray | None = None,
                  z_pred: np.ndarray | None = None, z_lo: np.ndarray | None = None,
                  z_hi: np.ndarray | None = None, names: Sequence[str] | None = None
                  ) -> mpl_figure.Figure:
  """Each galaxy's redshift PDF as probability density, with its true z and point estimate.

  edges (B+1,) bin edges; z_pdf (N, B) probability per bin (drawn as pdf / bin width, so the area
  is 1); z_true, z_pred (N,) vertical lines (NaN: none); z_lo, z_hi (N,) the shaded interval.
  """
  edges = np.asarray(edges, np.float64)
  n = len(z_pdf)
  cols = min(n, 4)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False,
                           sharex=True)
  for ax in axes.flat[n:]:
    ax.set_visible(False)
  for i, ax in enumerate(axes.flat[:n]):
    density = np.asarray(z_pdf[i], np.float64) / np.diff(edges)
    ax.stairs(density, edges, fill=True, color="tab:blue", alpha=0.35, label="PDF")
    if z_lo is not None and z_hi is not None:
      ax.axvspan(z_lo[i], z_hi[i], color="tab:blue", alpha=0.12, lw=0, label="68 % interval")
    if z_pred is not None and np.isfinite(z_pred[i]):
      ax.axvline(z_pred[i], color="tab:blue", lw=1.2, label="z_pred")
    if z_true is not None and np.isfinite(z_true[i]):
      ax.axvline(z_true[i], color="k", lw=1.2, ls="--", label="z_true")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylim(0, None)
    ax.set_title(str(names[i]) if names is not None else f"galaxy {i}", fontsize=8)
    ax.tick_params(labelsize=7)
    if i >= n - cols:
      ax.set_xlabel("z", fontsize=8)
  axes[0, 0].set_ylabel("p(z)", fontsize=8)
  fig.tight_layout()
  fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower right", ncol=4, fontsize=8,
             bbox_to_anchor=(1.0, 1.0), frameon=False)
  return fig


def redshift_figure(z_true: np.ndarray, z_pred: np.ndarray, z_max: float,
                    z_lo: np.ndarray | None = None, z_hi: np.ndarray | None = None,
                    label: str = "z_mean") -> mpl_figure.Figure:
  """z_pred vs z_true (N,) with the 1:1 line, the |dz| = 0.05 outlier bounds, sigma_MAD and eta.

  Galaxies whose z_true is not finite are left out; z_lo, z_hi (N,) draw the 68 % intervals.
  """
  ok = np.isfinite(z_true)
  z_true, z_pred = z_true[ok], z_pred[ok]
  m = evaluate.redshift_metrics(z_pred, z_true)
  fig, (ax, res) = plt.subplots(2, 1, figsize=(5.5, 7), sharex=True,
                                gridspec_kw=dict(height_ratios=(3.2, 1), hspace=0.05))
  line = np.array([0.0, z_max])
  bound = evaluate.OUTLIER_DZ
  ax.plot(line, line, color="k", lw=1, label="1:1")
  ax.plot(line, line + bound * (1 + line), color="k", lw=0.8, ls="--",
          label=rf"$|\Delta z| = {bound}\,(1+z)$")
  ax.plot(line, line - bound * (1 + line), color="k", lw=0.8, ls="--")
  if z_lo is not None and z_hi is not None:
    z_lo, z_hi = z_lo[ok], z_hi[ok]
    ax.errorbar(z_true, z_pred, yerr=np.abs([z_pred - z_lo, z_hi - z_pred]), fmt="none",
                ecolor="tab:blue", alpha=0.25, lw=0.8, label="68 % interval")
  stats = (rf"{label}: $\sigma_\mathrm{{MAD}}$={m['sigma_mad']:.4f}, "
           rf"$\eta$={m['outlier_fraction']:.3f}, N={m['n']}")
  ax.scatter(z_true, z_pred, s=8, color="tab:blue", label=stats, zorder=3)
  ax.set(xlim=(0, z_max), ylim=(0, z_max), ylabel=r"$z_\mathrm{pred}$")
  ax.legend(loc="upper left", fontsize=8)
  dz = (z_pred - z_true) / (1 + z_true)
  res.axhline(0, color="k", lw=1)
  for sign in (-1, 1):
    res.axhline(sign * bound, color="k", lw=0.8, ls="--")
  res.scatter(z_true, dz, s=8, color="tab:blue")
  limit = max(2 * bound, float(np.max(np.abs(dz)) * 1.1) if dz.size else 0.0)
  res.set(xlim=(0, z_max), ylim=(-limit, limit), xlabel=r"$z_\mathrm{true}$",
          ylabel=r"$\Delta z / (1+z)$")
  return fig


def redshift(path: str, *args, **kwargs) -> str:
  """`redshift_figure(*args, **kwargs)` written to `path` (PNG); returns `path`."""
  return _save(redshift_figure(*args, **kwargs), path)


class _PlainLogFormatter(ticker.LogFormatter):
  """Labels log-axis ticks as plain numbers (0.3, 2) instead of 3e-01 or 2x10^0."""

  def _num_to_string(self, x, vmin, vmax):
    return f"{x:g}"


def loss_curves_figure(metrics: Mapping[str, Mapping[str, np.ndarray]]) -> mpl_figure.Figure:
  """Total loss, and its parts, vs step for the train and validation splits, log y.

  metrics: {split: {"step": (T,), "loss": (T,), "loss_spectrum": ..., ...}} as
  `analysis.read_metrics` returns it.
  """
  fig, (total, parts) = plt.subplots(1, 2, figsize=(11, 4))
  styles = {"train": dict(ls="-", marker=None), "validation": dict(ls="--", marker="o", ms=3)}
  for split, style in styles.items():
    m = metrics.get(split)
    if not m or "loss" not in m:
      continue
    total.plot(m["step"], m["loss"], label=split, **style)
    for part, colour in (("spectrum", "tab:orange"), ("norm", "tab:green"),
                         ("redshift", "tab:purple")):
      if f"loss_{part}" in m:
        parts.plot(m["step"], m[f"loss_{part}"], color=colour, label=f"{split} {part}", **style)
  for ax, title in ((total, "total loss"), (parts, "loss parts (unweighted)")):
    ax.set(yscale="log", xlabel="step", title=title)
    # Plain numbers on the log axis (matplotlib writes 2.8x10^0 when it spans under a decade).
    ax.yaxis.set_major_formatter(_PlainLogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False,
                                                    minor_thresholds=(2, 0.5)))
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def loss_curves(path: str, *args, **kwargs) -> str:
  """`loss_curves_figure(*args, **kwargs)` written to `path` (PNG); returns `path`."""
  return _save(loss_curves_figure(*args, **kwargs), path)


def colour_image(image: np.ndarray, bands: Sequence[str],
                 channels: Sequence[Sequence[str]] = GRI_CHANNELS) -> np.ndarray:
  """(H, W, 3) float64 RGB in [0, 1] from an asinh-stretched image (bands, H, W).

  The image is as the prepared dataset stores it, asinh(f / softening) per band with the default
  softening (`preprocess.ps1_softening_nmgy(bands, examples.SOFTENING_SIGMAS)`, the configs'
  softening_sigmas); it is turned back into f, nanomaggies per 0.25" pixel, and composited with
  Lupton et al. (2004)'s asinh of the mean intensity I = (R + G + B) / 3
  (`astropy.visualization.make_lupton_rgb`, LUPTON_Q and LUPTON_STRETCH_NMGY): the colour of a
  pixel is the ratio of its channels' fluxes, so a source of equal AB magnitudes in every channel
  is grey and one brighter in i than in g is red; the sky (f <= 0) is black.
  `channels` names the bands of R, G and B (each channel the mean of its bands' fluxes): i, r, g
  by default, `GRIZY_CHANNELS` for all five. A channel none of whose bands is present makes the
  reddest three bands R, G, B instead (one band: grey).
  """
  names = list(bands)
  image = np.asarray(image, np.float64)
  picks = [[names.index(b) for b in channel if b in names] for channel in channels]
  if len(picks) != 3 or not all(picks):
    picks = [[k] for k in list(range(len(names)))[::-1][:3]]
    picks += picks[-1:] * (3 - len(picks))  # One band: the same flux in R, G and B.
  softening = np.asarray(preprocess.ps1_softening_nmgy(names, examples.SOFTENING_SIGMAS))
  flux = softening[:, None, None] * np.sinh(np.where(np.isfinite(image), image, 0.0))
  red, green, blue = (flux[p].mean(axis=0) for p in picks)
  with np.errstate(invalid="ignore", divide="ignore"):  # f(I) / I where I = 0: black, no warning.
    return visualization.make_lupton_rgb(red, green, blue, stretch=LUPTON_STRETCH_NMGY,
                                         Q=LUPTON_Q, output_dtype=np.float64)


def attention_figure(images: np.ndarray, attention_maps: np.ndarray, bands: Sequence[str],
                     names: Sequence[str] | None = None, num: int = 4,
                     channels: Sequence[Sequence[str]] = GRI_CHANNELS) -> mpl_figure.Figure:
  """Colour images (top) and the summary token's attention over the patches on them (bottom).

  images (N, bands, H, W) asinh-stretched, composited by `colour_image(image, bands, channels)`;
  attention_maps (N, gh, gw) (averaged over heads), each patch's weight shown over its p x p
  pixels (p = H / gh) as a multiple of the uniform weight 1 / (gh gw), so 1 means "no
  preference". The tint's opacity grows with the weight, so the galaxy stays visible under the
  patches that are ignored.
  """
  n = min(num, len(images), len(attention_maps))
  fig, axes = plt.subplots(2, n, figsize=(2.6 * n + 0.8, 5.4), squeeze=False)
  height, width = images.shape[2:]
  cmap = plt.get_cmap("plasma")
  for i in range(n):
    rgb = colour_image(images[i], bands, channels)
    grid_h, grid_w = attention_maps[i].shape
    patch_h, patch_w = height // grid_h, width // grid_w
    # Nearest-neighbour upsampling: each patch is one token, so its weight covers its own pixels.
    weight = np.kron(attention_maps[i] / attention_maps[i].sum() * grid_h * grid_w,
                     np.ones((patch_h, patch_w)))
    norm = colors.Normalize(0.0, max(float(weight.max()), 1.0))
    tint = cmap(norm(weight))
    tint[..., 3] = 0.6 * norm(weight)
    axes[0, i].imshow(rgb, origin="lower")
    axes[1, i].imshow(rgb, origin="lower")
    axes[1, i].imshow(tint, origin="lower")
    for edge in range(1, grid_h):  # The patch grid, faintly.
      axes[1, i].axhline(edge * patch_h - 0.5, color="white", lw=0.3, alpha=0.3)
    for edge in range(1, grid_w):
      axes[1, i].axvline(edge * patch_w - 0.5, color="white", lw=0.3, alpha=0.3)
    cbar = fig.colorbar(cm.ScalarMappable(norm, cmap), ax=axes[1, i], fraction=0.046,
                        pad=0.03)
    cbar.ax.tick_params(labelsize=7)
    axes[0, i].set_title(str(names[i]) if names is not None else f"galaxy {i}", fontsize=8)
    for ax in axes[:, i]:
      ax.set_xticks([])
      ax.set_yticks([])
  axes[0, 0].set_ylabel(_channels_label(channels), fontsize=9)
  axes[1, 0].set_ylabel("attention / uniform", fontsize=9)
  fig.tight_layout()
  return fig


def attention(path: str, *args, **kwargs) -> str:
  """`attention_figure(*args, **kwargs)` written to `path` (PNG); returns `path`."""
  return _save(attention_figure(*args, **kwargs), path)
