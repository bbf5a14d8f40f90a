"""Figures of a trained run from numpy arrays; each function writes one PNG and returns its path.

Spectra are flux in 1e-17 erg/s/cm^2/Angstrom against vacuum observed-frame wavelength in Angstrom;
redshift figures use dz = (z_pred - z_true) / (1 + z_true) as `astra_jax.evaluate` does.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib
matplotlib.use("Agg")  # Files only: no display on clusters or in tests.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import cm  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import colors  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import ticker  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from astra_jax import evaluate  # pylint: disable=g-import-not-at-top,wrong-import-position

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


def spectra(path: str, wavelength: np.ndarray, flux_true: np.ndarray, weight: np.ndarray,
            flux_pred: np.ndarray, z_true: np.ndarray, z_pred: np.ndarray | None = None,
            names: Sequence[str] | None = None, num: int = 8) -> str:
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
    true = np.where(weight[i] > 0, flux_true[i], np.nan)
    ax.plot(wavelength, true, color="0.5", lw=0.5, label="true")
    ax.plot(wavelength, flux_pred[i], color="tab:orange", lw=0.9, alpha=0.9, label="predicted")
    ax.set_ylim(*_flux_limits(true, flux_pred[i]))
    if np.isfinite(z_true[i]):
      for label, rest, kind in LINES:
        observed = (1.0 + z_true[i]) * rest
        if wavelength[0] < observed < wavelength[-1]:
          ax.axvline(observed, color=_LINE_COLOURS[kind], lw=0.7, ls="--", alpha=0.6)
          if label:
            ax.text(observed, 0.97, label, transform=ax.get_xaxis_transform(), rotation=90,
                    ha="right", va="top", fontsize=7, color=_LINE_COLOURS[kind],
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.7, pad=0.5))
    title = [] if names is None else [str(names[i])]
    title.append(f"z_true={z_true[i]:.3f}")
    if z_pred is not None:
      title.append(f"z_pred={z_pred[i]:.3f}")
    ax.set_title("   ".join(title), fontsize=8, loc="left")
    ax.tick_params(labelsize=7)
    if i >= n - cols:
      ax.set_xlabel(r"observed vacuum wavelength [$\AA$]", fontsize=8)
      ax.xaxis.set_tick_params(labelbottom=True)
  fig.text(0.0, 0.5, r"flux [$10^{-17}$ erg s$^{-1}$ cm$^{-2}$ $\AA^{-1}$]", rotation=90,
           va="center", ha="right")
  fig.tight_layout()
  # Above the panels, where it hides no spectrum.
  fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower right", ncol=2, fontsize=8,
             bbox_to_anchor=(1.0, 1.0), frameon=False)
  return _save(fig, path)


def redshift(path: str, z_true: np.ndarray, z_pred: np.ndarray, z_max: float,
             z_lo: np.ndarray | None = None, z_hi: np.ndarray | None = None,
             label: str = "z_mean") -> str:
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
  return _save(fig, path)


class _PlainLogFormatter(ticker.LogFormatter):
  """Labels log-axis ticks as plain numbers (0.3, 2) instead of 3e-01 or 2x10^0."""

  def _num_to_string(self, x, vmin, vmax):
    return f"{x:g}"


def loss_curves(path: str, metrics: Mapping[str, Mapping[str, np.ndarray]]) -> str:
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
  return _save(fig, path)


def colour_image(image: np.ndarray, bands: Sequence[str]) -> np.ndarray:
  """(H, W, 3) RGB in [0, 1] from an asinh-stretched image (bands, H, W): i, r, g -> R, G, B.

  The stretch is already Lupton's asinh, so a linear map from the sky level (0) to the 99.9th
  percentile of the three bands is enough. Missing bands: the reddest three available (or grey).
  """
  names = list(bands)
  picks = [names.index(b) for b in ("i", "r", "g") if b in names]
  if len(picks) < 3:
    picks = list(range(len(names)))[::-1][:3]
  rgb = np.stack([image[k] for k in picks], axis=-1)
  if rgb.shape[-1] < 3:
    rgb = np.repeat(rgb[..., :1], 3, axis=-1)
  hi = np.percentile(rgb, 99.9)
  return np.clip(rgb / (hi if hi > 0 else 1.0), 0.0, 1.0)


def attention(path: str, images: np.ndarray, attention_maps: np.ndarray, bands: Sequence[str],
              names: Sequence[str] | None = None, num: int = 4) -> str:
  """gri images (top) and the summary token's attention over the patches on them (bottom).

  images (N, bands, H, W) asinh-stretched; attention_maps (N, gh, gw) (averaged over heads), each
  patch's weight shown over its p x p pixels (p = H / gh) as a multiple of the uniform weight
  1 / (gh gw), so 1 means "no preference". The tint's opacity grows with the weight, so the
  galaxy stays visible under the patches that are ignored.
  """
  n = min(num, len(images), len(attention_maps))
  fig, axes = plt.subplots(2, n, figsize=(2.6 * n + 0.8, 5.4), squeeze=False)
  height, width = images.shape[2:]
  cmap = plt.get_cmap("plasma")
  for i in range(n):
    rgb = colour_image(images[i], bands)
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
  axes[0, 0].set_ylabel("i, r, g", fontsize=9)
  axes[1, 0].set_ylabel("attention / uniform", fontsize=9)
  fig.tight_layout()
  return _save(fig, path)
