"""Spectra and redshift PDFs for galaxies that have only images: a folder of cutouts -> FITS.

  predict_folder(workdir, images_dir, out_path) -> summary dict

Input layouts (both may share one folder; an id is any file-name stem, not only a specobj_id):

  DIR/Galaxy_{id}/images/{id}_{band}.fits     ASTROPIXEL (spectrum/ folders, data.csv unused)
  DIR/{id}_{band}.fits                        flat

DIR may be a URL (gs://bucket/cutouts; read through `etils.epath`). A band file may also be
`.fits.fz` or `.fits.gz`. Images go through `examples.image_example` with the bands, image_size
and softening_sigmas of the checkpoint's config.json, and their aperture photometry (a model
input: the photometry token, the amplitude's anchor) through `photometry.aperture_fluxes`: the
very code that prepared the training set (each band calibrated to nanomaggies by its header's
zero point).
A run whose config.json has no softening_sigmas was trained on uncalibrated inputs (astropixel
before 2.0.0) and is refused (`example_config`). Cutouts must be 288 x 288 (`resize="reject"`,
the default); with `resize="bin"` any square cutout whose side is a multiple of image_size is
mean-binned to it after the stretch, as training bins its 288 px cutouts. Binning matches the
pixel count, not the angular scale: a 576 px cutout at 0.125"/px covers the training field
(72") but holds a quarter of the flux per pixel (the stretch's softening is per 0.25" pixel, and
is not rescaled); one at PS1's 0.25"/px covers twice the field, and the model sees its galaxy at
half the size it was trained on.

Every galaxy found is either one row of the table or one line of the rejection file
(`examples.rejection` JSON lines with a stable `fits_io` / `preprocess` reason); a bad galaxy
never stops the run. Reading and preprocessing run in `num_workers` spawned processes, a bounded
number of tasks ahead of the model, so memory does not grow with the folder; the model runs
jitted over this process's devices (`analysis.predict`); rows are streamed to the FITS file.

Output, HDU 1 PREDICTIONS (rows in sorted-id order): specobj_id (the id), ra, dec (deg, centre of
the first band's WCS; NaN without a celestial WCS), z_mean, z_mode, z_lo, z_hi (the central 68 %
interval), z_pdf (num_z_bins,) per bin, flux_pred (4000,) in 1e-17 erg/s/cm^2/Angstrom on the
vacuum observed-frame grid LOGLAM0 + DLOGLAM * i (header cards): the light in a fiber of
`fiber_diameter` (header card FIBERDIA; SDSS 3 arcsec by default, BOSS 2) for a model with
`fiber_input`. HDU 2 Z_EDGES: the bin edges.
jax and the model are imported only by `predict_folder`: workers import this module and need
neither (nor TensorFlow: `examples` is the TF-free half of the astropixel builder; only cutouts
under a URL bring it in, as epath's gfile backend).
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import re
import tempfile
import time
from typing import Iterable, Iterator

from etils import epath
import numpy as np

from astra_jax import grid
from astra_jax import paths
from astra_jax import photometry
from astra_jax.data import examples
from astra_jax.data import fits_io
from astra_jax.data import preprocess

RESIZE_MODES = ("reject", "bin")
#: Galaxies read by one worker task: ~20-50 ms each, so a task is long next to its pickling.
GALAXIES_PER_TASK = 16
FLUX_UNIT = "1e-17 erg/s/cm^2/Angstrom"  # As analysis.FLUX_UNIT (not imported: it pulls in jax).
UNEXPECTED = "unexpected error"
DUPLICATE_ID = "duplicate id"

_FLAT_NAME = re.compile(r"^(?P<id>.+)_(?P<band>[^_]+)\.fits(?:\.fz|\.gz)?$")


# ---------------------------------------------------------------- finding and reading galaxies


@dataclasses.dataclass(frozen=True)
class Job:
  """One galaxy to read: its id and the folder holding its `{id}_{band}.fits` files."""
  specobj_id: str
  folder: str
  path: str  # Named in rejections: the Galaxy_ folder, or `DIR/{id}_{g,r,...}.fits` when flat.


def find_galaxies(images_dir: str, bands: Iterable[str]) -> tuple[list[Job], list[dict]]:
  """(jobs sorted by id, rejections of ids found twice) for the galaxies of `images_dir`.

  One listing of `images_dir` (a local folder or a URL, gs://bucket/cutouts): `Galaxy_{id}`
  folders and flat `{id}_{band}.fits[.fz|.gz]` files of the given bands. A flat id that also has
  a Galaxy_ folder is rejected (DUPLICATE_ID). Raises FileNotFoundError when `images_dir` is not
  a folder.
  """
  if not paths.is_dir(images_dir):
    raise FileNotFoundError(f"{images_dir}: no such folder of cutouts")
  bands = tuple(bands)
  folders, flat = {}, set()
  for name, is_folder in paths.entries(images_dir):
    if name.startswith("Galaxy_") and is_folder:
      folders[name[len("Galaxy_"):]] = os.path.join(images_dir, name)
    else:
      m = _FLAT_NAME.match(name)
      if m and m.group("band") in bands and not is_folder:
        flat.add(m.group("id"))
  jobs = [Job(i, os.path.join(path, "images"), path) for i, path in folders.items()]
  pattern = "{" + ",".join(bands) + "}" if len(bands) > 1 else bands[0]
  rejections = []
  for i in sorted(flat):
    path = os.path.join(images_dir, f"{i}_{pattern}.fits")
    if i in folders:
      rejections.append(examples.rejection(i, path, DUPLICATE_ID,
                                             f"also {folders[i]}; that one is used"))
    else:
      jobs.append(Job(i, images_dir, path))
  return sorted(jobs, key=lambda j: j.specobj_id), rejections


def band_files(job: Job, bands: tuple[str, ...]) -> list[str]:
  """The job's cutout per band, in the given order (`fits_io.band_file` in its folder)."""
  return [fits_io.band_file(job.folder, job.specobj_id, band) for band in bands]


def example_config(config, workdir: str) -> examples.ExampleConfig:
  """The image preprocessing of a training run's config (bands, image_size, softening).

  Raises ValueError for a run trained on uncalibrated inputs: its config.json predates
  `softening_sigmas` (it has `stretch_beta`, a softening in each cutout's own sky sigma).
  """
  if "softening_sigmas" not in config:
    raise ValueError(
        f"{workdir}: this model was trained on uncalibrated inputs (config.json has no "
        f"softening_sigmas: each band was divided by its cutout's own sky sigma and its zero "
        f"point ignored); prediction now feeds calibrated images, so retrain it: "
        f"python -m experiments.baseline --workdir NEW_WORKDIR (its dataset is prepared again)")
  bands = tuple(config.bands.split(","))
  return examples.ExampleConfig(
      bands=bands, image_size=config.image_size,
      softening_nmgy=preprocess.ps1_softening_nmgy(bands, config.softening_sigmas))


def check_shape(shape: tuple[int, int], config: examples.ExampleConfig, resize: str,
                path: str):
  """Raises InputError(WRONG_SHAPE) unless cutouts of `shape` (H, W) may go to the model.

  reject: only the 288 x 288 cutouts of training. bin: square, side a multiple of image_size.
  """
  if resize == "reject":
    raw = (examples.RAW_IMAGE_SIZE,) * 2
    ok, want = shape == raw, f"expected {raw}"
  elif resize == "bin":
    ok = shape[0] == shape[1] and shape[0] % config.image_size == 0
    want = f"--resize bin needs a square multiple of {config.image_size}"
  else:
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
  if not ok:
    raise fits_io.InputError(path, fits_io.WRONG_SHAPE, detail=f"{shape}, {want}")


#: Prefixes of WCS distortion cards (SIP, TPV, lookup tables): with any of them the reference
#: pixel's sky position can differ from CRVAL, so astropy computes it.
_DISTORTION_PREFIXES = ("A_", "B_", "PV", "CPDIS", "CQDIS", "DP", "DQ", "D2IM")


def centre_ra_dec(header, shape: tuple[int, int]) -> tuple[float, float]:
  """(ra, dec) in degrees of the cutout centre (`fits_io.image_ra_dec`); NaN when the header
  has no celestial WCS or astropy cannot read it."""
  ctype = (str(header.get("CTYPE1", "")).upper(), str(header.get("CTYPE2", "")).upper())
  if not ctype[0].startswith("RA"):
    return math.nan, math.nan  # astropy would read a pixel WCS and return pixel numbers.
  # A plain TAN projection maps its reference pixel to (CRVAL1, CRVAL2) exactly; when that pixel
  # is the centre (mock and centred cutouts) this skips building astropy's WCS: ~20 ms a galaxy
  # on a busy 2-core CPU, as much as the stretch.
  centre = ((shape[1] + 1) / 2, (shape[0] + 1) / 2)  # 1-based, as CRPIX.
  if (ctype == ("RA---TAN", "DEC--TAN")
      and (header.get("CRPIX1"), header.get("CRPIX2")) == centre
      and not any(k.startswith(_DISTORTION_PREFIXES) for k in header.keys())):
    return float(header["CRVAL1"]), float(header["CRVAL2"])
  try:
    return fits_io.image_ra_dec(header, shape)
  except Exception:  # pylint: disable=broad-except  # A bad WCS spoils ra/dec, not the image.
    return math.nan, math.nan


def load_galaxy(job: Job, config: examples.ExampleConfig, resize: str
                ) -> tuple[np.ndarray, np.ndarray, float, float]:
  """(model image (bands, S, S) float16, aperture_fluxes (bands, 5) float32 nanomaggies, ra, dec)
  of one job: the image and the photometry by the very functions that prepared the training set
  (`examples.image_example`, `photometry.aperture_fluxes`, the latter at PS1's 0.25 arcsec per
  pixel, as the training cutouts). Raises fits_io.InputError as
  `fits_io.read_bands` (MISSING_BAND, UNREADABLE_FITS, NO_IMAGE, INCONSISTENT_SHAPES),
  `check_shape` and `examples.image_example` (NO_ZERO_POINT, MOSTLY_NONFINITE) do."""
  files = band_files(job, config.bands)
  images, headers = fits_io.read_bands(files, config.bands)
  shape = images.shape[1:]
  check_shape(shape, config, resize, job.path)
  image = examples.image_example(images, headers, config, files)
  return (image, photometry_of(images, headers)) + centre_ra_dec(headers[0], shape)


def photometry_of(images: np.ndarray, headers) -> np.ndarray:
  """`photometry.aperture_fluxes` (bands, 5) float32 nanomaggies of cutouts (bands, S, S) in
  counts, read as the model reads their image (`check_shape`): pixel counts, not angular scale,
  matter. A 288 px cutout is measured as is; a side that is a multiple of 288 is mean-binned to
  288 first (a pixel repeated 2 x 2 gives the same fluxes); any other side is measured with
  apertures scaled to the same fraction of the cutout and the per-pixel flux kept."""
  side = images.shape[-1]
  if side % examples.RAW_IMAGE_SIZE == 0:
    images = preprocess.bin_image(images, side // examples.RAW_IMAGE_SIZE)
    return photometry.aperture_fluxes(images, headers).astype(np.float32)
  ratio = examples.RAW_IMAGE_SIZE / side
  fluxes = photometry.aperture_fluxes(images, headers,
                                      pixel_scale=preprocess.PS1_PIXEL_SCALE_ARCSEC * ratio)
  return (fluxes * ratio**2).astype(np.float32)


def load_task(jobs: list[Job], config: examples.ExampleConfig, resize: str) -> dict:
  """A worker's task: {"ids" (n,), "image" (n, bands, S, S) float16, "aperture_fluxes"
  (n, bands, 5) float32, "ra", "dec" (n,) float64, "rejections": [...]} for the good and the
  rejected galaxies of `jobs`, in order."""
  ids, images, fluxes, coords, rejections = [], [], [], [], []
  for job in jobs:
    try:
      image, flux, ra, dec = load_galaxy(job, config, resize)
    except fits_io.InputError as e:
      rejections.append(examples.rejection(job.specobj_id, e.path, e.reason, e.detail))
      continue
    except Exception as e:  # pylint: disable=broad-except  # Reported; the run goes on.
      rejections.append(examples.rejection(job.specobj_id, job.path, UNEXPECTED, repr(e)))
      continue
    ids.append(job.specobj_id)
    images.append(image)
    fluxes.append(flux)
    coords.append((ra, dec))
  size = config.image_size
  coords = np.asarray(coords, np.float64).reshape(-1, 2)
  return dict(ids=ids, rejections=rejections, ra=coords[:, 0], dec=coords[:, 1],
              image=np.stack(images) if images else
              np.zeros((0, len(config.bands), size, size), np.float16),
              aperture_fluxes=np.stack(fluxes) if fluxes else
              np.zeros((0, len(config.bands), len(photometry.DIAMETERS_ARCSEC)), np.float32))


class Reader:
  """`load_task` results in job order, read in this process (num_workers=0) or in a spawned pool.

  With a pool the first tasks are submitted at once, so that reading overlaps restoring and
  compiling the model, and never more than 2 tasks per worker wait for the consumer: memory
  does not grow with the number of galaxies. Use as a context manager (closes the pool).
  """

  def __init__(self, jobs: list[Job], config: examples.ExampleConfig, resize: str,
               num_workers: int):
    self._tasks = (jobs[i:i + GALAXIES_PER_TASK] for i in range(0, len(jobs), GALAXIES_PER_TASK))
    self._args = (config, resize)
    self._pending = collections.deque()
    self._pool = None
    if num_workers > 0:
      # Spawn, not fork: this process holds XLA's threads, and a forked copy of them can hang.
      self._pool = concurrent.futures.ProcessPoolExecutor(
          num_workers, mp_context=multiprocessing.get_context("spawn"))
      self._ahead = 2 * num_workers
      self._submit()

  def _submit(self):
    for task in itertools.islice(self._tasks, self._ahead - len(self._pending)):
      self._pending.append(self._pool.submit(load_task, task, *self._args))

  def __iter__(self) -> Iterator[dict]:
    if self._pool is None:
      yield from (load_task(task, *self._args) for task in self._tasks)
      return
    while self._pending:
      result = self._pending.popleft().result()
      self._submit()
      yield result

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- the output table


class TableWriter:
  """A FITS binary table written row batch by row batch (memory independent of the row count).

  HDUs: an empty primary, the table (NAXIS2 patched when closed), then the `extra` image HDUs.
  The file is `path + ".partial"` until `close`, which renames it to `path`.
  """

  def __init__(self, path: str, columns: list, name: str, cards: dict, extra: list):
    from astropy.io import fits  # pylint: disable=g-import-not-at-top
    self.path, self.rows, self._extra = path, 0, extra
    hdu = fits.BinTableHDU.from_columns(columns, nrows=0, name=name)
    for key, value in cards.items():
      hdu.header[key] = value
    self.header = hdu.header
    self.dtype = np.dtype(hdu.data.dtype).newbyteorder(">")  # FITS tables are big-endian.
    if self.dtype.itemsize != self.header["NAXIS1"]:
      raise AssertionError(f"row dtype {self.dtype} is not {self.header['NAXIS1']} bytes")
    self._file = open(path + ".partial", "wb")
    self._file.write(fits.PrimaryHDU().header.tostring().encode("ascii"))
    self._header_at = self._file.tell()
    self._file.write(self.header.tostring().encode("ascii"))

  def write(self, columns: dict[str, np.ndarray]):
    """Appends n rows given as {column name: (n, ...) array}."""
    n = len(next(iter(columns.values())))
    rows = np.zeros(n, self.dtype)
    for name, value in columns.items():
      rows[name] = value
    self._file.write(rows.tobytes())
    self.rows += n

  def close(self) -> str:
    """Pads the data, writes the row count and the extra HDUs; returns the final path."""
    self._file.write(b"\0" * (-self._file.tell() % 2880))
    self.header["NAXIS2"] = self.rows
    text = self.header.tostring().encode("ascii")
    end = self._file.tell()
    self._file.seek(self._header_at)
    self._file.write(text)  # Same length: one fixed-width card changed.
    self._file.seek(end)
    for hdu in self._extra:
      data = np.ascontiguousarray(hdu.data, hdu.data.dtype.newbyteorder(">")).tobytes()
      self._file.write(hdu.header.tostring().encode("ascii") + data + b"\0" * (-len(data) % 2880))
    self._file.close()
    os.replace(self.path + ".partial", self.path)
    return self.path


def _table_writer(path: str, model, config, id_width: int, cards: dict) -> TableWriter:
  from astropy.io import fits  # pylint: disable=g-import-not-at-top
  from astra_jax import analysis  # pylint: disable=g-import-not-at-top
  nz = model.num_z_bins
  spec = (("specobj_id", f"{max(id_width, 1)}A", None, "galaxy id (file name stem)"),
          ("ra", "D", "deg", "ICRS right ascension of the cutout centre"),
          ("dec", "D", "deg", "ICRS declination of the cutout centre"),
          ("z_mean", "E", None, "mean of the predicted redshift PDF"),
          ("z_mode", "E", None, "centre of the most probable redshift bin"),
          ("z_lo", "E", None, "16th percentile of the redshift PDF"),
          ("z_hi", "E", None, "84th percentile of the redshift PDF"),
          ("z_pdf", f"{nz}E", None, "redshift PDF per bin (edges in HDU Z_EDGES)"),
          ("flux_pred", f"{grid.NUM_PIXELS}E", FLUX_UNIT, "predicted flux on the grid"))
  columns = [fits.Column(name=n, format=f, unit=u) for n, f, u, _ in spec]
  header = {f"TTYPE{i}": (n, c) for i, (n, _, _, c) in enumerate(spec, start=1)}
  header.update({
      "LOGLAM0": (grid.LOGLAM0, "log10(vacuum obs-frame wavelength/A), pixel 0"),
      "DLOGLAM": (grid.DLOGLAM, "log10(wavelength/A) step per pixel"),
      "NPIX": (grid.NUM_PIXELS, "pixels of flux_pred"),
      "WAVEUNIT": ("Angstrom", "wavelengths are vacuum, observed frame"),
      "ZMAX": (float(model.z_max), "redshift bins tile [0, ZMAX] uniformly"),
      "NZBINS": (int(nz), "number of redshift bins"),
      "BANDS": (config.bands, "image bands, in model order"),
      "IMGSIZE": (int(config.image_size), "[pixel] model input size"),
      "SOFTSIG": (float(config.softening_sigmas), "asinh softening / PS1 median sky sigma")})
  header.update(cards)
  edges = fits.ImageHDU(analysis.z_edges(model), name="Z_EDGES")
  edges.header["COMMENT"] = "Edges of the redshift bins of the z_pdf column (num_z_bins + 1)."
  return TableWriter(path, columns, "PREDICTIONS", header, [edges])


# ---------------------------------------------------------------- truth


def _fields(line: str) -> list[str]:
  return [f.strip().strip("'\"").strip() for f in next(csv.reader([line]))]


def read_truth(path: str) -> dict[str, float]:
  """{id: z} from a CSV with `specobj_id` and `z` columns (a mock truth.csv, an ASTROPIXEL
  data.csv: `#` before the header and quoted ids allowed); rows without a finite z are skipped.
  Raises ValueError when a column is missing."""
  with paths.open_text(path) as f:
    lines = (l for l in f if l.strip())
    names = [n.lstrip("#").strip().lower() for n in _fields(next(lines, ""))]
    if "specobj_id" not in names or "z" not in names:
      raise ValueError(f"{path}: a truth table needs specobj_id and z columns; got {names}")
    i, k = names.index("specobj_id"), names.index("z")
    truth = {}
    for line in lines:
      fields = _fields(line)
      try:
        z = float(fields[k])
      except (IndexError, ValueError):
        continue
      if math.isfinite(z):
        truth[fields[i]] = z
  return truth


def find_truth(images_dir: str) -> str | None:
  """`images_dir`'s truth.csv, else its data.csv, when it has a z column; else None."""
  for name in ("truth.csv", "data.csv"):
    path = os.path.join(images_dir, name)
    if paths.is_file(path):
      with paths.open_text(path) as f:
        names = [n.lstrip("#").strip().lower() for n in _fields(f.readline() or ",")]
      if "z" in names and "specobj_id" in names:
        return path
  return None


# ---------------------------------------------------------------- the whole run


def rejections_path_for(out_path: str) -> str:
  """`predictions.fits` -> `predictions.rejected.jsonl`, beside it."""
  root, ext = os.path.splitext(out_path)
  return (root if ext.lower() in (".fits", ".fit", ".fts") else out_path) + ".rejected.jsonl"


def predict_folder(workdir: str, images_dir: str, out_path: str, batch_size: int = 64,
                   num_workers: int | None = None, resize: str = "reject",
                   truth: str | None = "auto", step: int | None = None, best: bool = False,
                   progress: bool = False,
                   fiber_diameter: float = fits_io.SDSS_FIBER_ARCSEC) -> dict:
  """Predicts every galaxy of `images_dir` with the run in `workdir`; writes `out_path`.

  Args:
    workdir: a training workdir (config.json and checkpoints; see `analysis.restore`).
    images_dir: cutouts in either layout of the module docstring.
    out_path: the FITS table; rejections go to `rejections_path_for(out_path)`. A URL
      (gs://bucket/...) is written in a local temporary folder and copied there when complete
      (the table's row count is patched in place, which a bucket cannot do).
    batch_size: images per forward pass (rounded up to a multiple of the local device count).
    num_workers: reading processes; 0 reads in this process; None: min(8, cpu count).
    resize: "reject" or "bin" (module docstring).
    truth: a CSV of specobj_id, z (`read_truth`); "auto": `find_truth(images_dir)`; None: none.
    step, best: which checkpoint (`analysis.restore`).
    progress: show a tqdm bar on stderr.
    fiber_diameter: arcsec, the fiber whose light flux_pred is (one of
      `fits_io.FIBER_DIAMETERS_ARCSEC`: SDSS 3, BOSS 2).
  Returns:
    the summary: predicted, rejected (counts), out, rejections (paths), reasons {reason: count},
    seconds (wall, from the call), galaxies_per_s (predicted / seconds: start-up, compilation and
    writing included), startup_s (until the first batch is written), steady_galaxies_per_s
    (rows per second after the first batch; None with one batch: the rate that scales to
    millions), and with truth: truth (path), z_num_truth (galaxies compared), z_sigma_mad,
    z_outlier_fraction, z_bias (`evaluate.redshift_metrics` of z_mean; None when none matched).
  """
  # pylint: disable=g-import-not-at-top  # jax only here: the workers import this module.
  import jax
  import tqdm
  from astra_jax import analysis
  from astra_jax import evaluate
  start = time.perf_counter()
  if resize not in RESIZE_MODES:
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
  if fiber_diameter not in fits_io.FIBER_DIAMETERS_ARCSEC:
    raise ValueError(f"fiber_diameter must be one of {fits_io.FIBER_DIAMETERS_ARCSEC} arcsec "
                     f"(BOSS, SDSS), got {fiber_diameter!r}")
  data_config = example_config(analysis.load_config(workdir), workdir)
  jobs, rejections = find_galaxies(images_dir, data_config.bands)
  if not jobs and not rejections:
    raise FileNotFoundError(f"{images_dir}: no Galaxy_{{id}} folders or {{id}}_{{band}}.fits "
                            f"files of bands {','.join(data_config.bands)}")
  truth_path = find_truth(images_dir) if truth == "auto" else truth
  truth_z = read_truth(truth_path) if truth_path else {}
  num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
  destination = out_path
  local = tempfile.TemporaryDirectory() if paths.is_url(out_path) else None
  if local is not None:
    out_path = os.path.join(local.name, os.path.basename(out_path))
  rejections_path = rejections_path_for(out_path)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  reasons = collections.Counter()
  with Reader(jobs, data_config, resize, num_workers) as reader, \
      open(rejections_path, "w") as rejected:
    def reject(items):
      for r in items:
        rejected.write(json.dumps(r) + "\n")
        reasons[r["reason"]] += 1
      rejected.flush()

    reject(rejections)
    # The workers are reading already, while the model is restored and compiled.
    config, model, params = analysis.restore(workdir, step=step, best=best)
    ndev = len(jax.local_devices())
    id_width = max((len(j.specobj_id) for j in jobs), default=1)
    softening = ",".join(f"{v:.4g}" for v in data_config.softening_nmgy)
    writer = _table_writer(out_path, model, config, id_width,
                           {"WORKDIR": (paths.absolute(workdir), "training run"),
                            "RESIZE": (resize, "cutouts of other sizes: reject or bin"),
                            "SOFTNMGY": (softening, "[nmgy] asinh softening"),
                            "FIBERDIA": (float(fiber_diameter),
                                         "[arcsec] fiber whose light flux_pred is")})
    batches = _Batches(model, params, -(-batch_size // ndev) * ndev, writer, truth_z,
                       fiber_diameter if model.fiber_input else None)
    bar = tqdm.tqdm(total=len(jobs), unit="gal", desc="predict", disable=not progress)
    for result in reader:
      reject(result["rejections"])
      batches.add(result)
      bar.update(len(result["ids"]) + len(result["rejections"]))
      bar.set_postfix(rejected=sum(reasons.values()), refresh=False)
    batches.flush()
  bar.close()
  writer.close()
  if local is not None:
    for path in (out_path, rejections_path):
      target = epath.Path(destination).parent / os.path.basename(path)
      target.parent.mkdir(parents=True, exist_ok=True)
      epath.Path(path).copy(target, overwrite=True)
    out_path, rejections_path = destination, rejections_path_for(destination)
    local.cleanup()
  seconds = time.perf_counter() - start
  times = batches.written_at
  summary = dict(
      predicted=writer.rows, rejected=sum(reasons.values()), out=out_path,
      rejections=rejections_path, reasons=dict(sorted(reasons.items())),
      seconds=round(seconds, 2), galaxies_per_s=round(writer.rows / seconds, 2),
      startup_s=round((times[0][0] if times else time.perf_counter()) - start, 2),
      steady_galaxies_per_s=(round((times[-1][1] - times[0][1]) / (times[-1][0] - times[0][0]), 2)
                             if len(times) > 1 else None))
  if truth_path:
    z_pred, z_true = (np.array([pair[k] for pair in batches.compared]) for k in (0, 1))
    metrics = evaluate.redshift_metrics(z_pred, z_true)
    metrics = {k: None if v != v else v for k, v in metrics.items()}  # NaN is not JSON.
    summary.update(truth=truth_path, z_num_truth=metrics["n"], z_sigma_mad=metrics["sigma_mad"],
                   z_outlier_fraction=metrics["outlier_fraction"], z_bias=metrics["bias"])
  return summary


class _Batches:
  """Loaded galaxies -> full batches -> the model -> table rows.

  Keeps (z_mean, z_true) of the galaxies in `truth_z`, and (time, rows written) after each batch.
  """

  def __init__(self, model, params, batch: int, writer: TableWriter, truth_z: dict[str, float],
               fiber_diameter: float | None):
    self.model, self.params, self.batch, self.writer = model, params, batch, writer
    self.fiber_diameter = fiber_diameter
    self.truth_z = truth_z
    self.compared: list[tuple[float, float]] = []
    self.written_at: list[tuple[float, int]] = []
    self._parts: list[dict] = []
    self._size = 0

  def add(self, result: dict):
    """Queues one `load_task` result; predicts every full batch."""
    if result["ids"]:
      self._parts.append(result)
      self._size += len(result["ids"])
    while self._size >= self.batch:
      self._predict(self.batch)

  def flush(self):
    if self._size:
      self._predict(self._size)

  def _predict(self, n: int):
    """Predicts and writes the first n queued galaxies."""
    from astra_jax import analysis  # pylint: disable=g-import-not-at-top
    ids = [i for p in self._parts for i in p["ids"]]
    keys = ("image", "aperture_fluxes", "ra", "dec")
    image, fluxes, ra, dec = (np.concatenate([p[k] for p in self._parts]) for k in keys)
    rest = dict(ids=ids[n:], image=image[n:], aperture_fluxes=fluxes[n:], ra=ra[n:], dec=dec[n:])
    self._parts, self._size = ([rest] if rest["ids"] else []), len(rest["ids"])
    ids = ids[:n]
    # One input shape for every call (one compilation): the last batch is zero-padded.
    pad = lambda x: np.concatenate([x[:n], np.zeros((self.batch - n,) + x.shape[1:], x.dtype)])
    pred = analysis.predict(self.model, self.params, pad(image), pad(fluxes),
                            batch_size=self.batch, fiber_diameter=self.fiber_diameter)
    pred = {k: v[:n] for k, v in pred.items()}
    # FITS strings are ASCII; another character in a file name becomes '?'.
    ascii_ids = np.array([i.encode("ascii", "replace") for i in ids])
    self.writer.write(dict(specobj_id=ascii_ids, ra=ra[:n], dec=dec[:n], z_mean=pred["z_mean"],
                           z_mode=pred["z_mode"], z_lo=pred["z_lo"], z_hi=pred["z_hi"],
                           z_pdf=pred["z_pdf"], flux_pred=pred["flux"]))
    self.compared += [(float(z), self.truth_z[i]) for i, z in zip(ids, pred["z_mean"])
                      if i in self.truth_z]
    self.written_at.append((time.perf_counter(), self.writer.rows))
