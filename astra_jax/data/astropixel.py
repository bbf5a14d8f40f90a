"""The `astropixel` tfds builder: ASTROPIXEL-layout raw folders -> train/validation/test shards.

Raw layout (read through `manual_dir`)::

  RAW/data.csv                                       #plate,mjd,fiberid,specobj_id,ra,dec[,z]
  RAW/Galaxy_{specobj_id}/images/{specobj_id}_{band}.fits
  RAW/Galaxy_{specobj_id}/spectrum/spectrum.csv       wavelength,flux
  RAW/Galaxy_{specobj_id}/spectrum/spec-PPPP-MMMMM-FFFF.fits   (optional SDSS lite file; preferred)

Every raw galaxy is either written to exactly one split (a hash of `specobj_id`, 80/10/10) or
rejected with a reason; rejections are collected in `Astropixel.rejections` and written by
`astra_jax.data.prepare` to `rejected.jsonl` beside the dataset.

With a `beam_runner` or `beam_options` in the `DownloadConfig` the galaxies are read by an Apache
Beam pipeline (the optional `[beam]` extra) instead of in this process: the examples and the
rejections are the same, in the same order, as without Beam.

The per-galaxy work lives in the TensorFlow-free `astra_jax.data.examples`, so that reader
processes start without importing tensorflow_datasets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from astra_jax import grid
from astra_jax import paths
from astra_jax import photometry
from astra_jax.data import examples
from astra_jax.data import fits_io
from astra_jax.data import preprocess
from astra_jax.data.examples import RAW_IMAGE_SIZE
from astra_jax.data.examples import rejection

SPLITS = ("train", "validation", "test")
#: The first version whose images are calibrated (nanomaggies, a fixed softening per band):
#: training and prediction refuse datasets prepared before it.
CALIBRATED_VERSION = "2.0.0"
#: The first version that stores each spectrum's `fiber_diameter`, which the model's amplitude
#: head and the baselines' amplitudes read: training refuses older datasets too.
FIBER_VERSION = "2.1.0"
# Galaxies submitted to the reader pool and not yet written, per reader process: enough that no
# reader waits for the next job, few enough that finished examples (~0.9 MB each at 288 px) never
# pile up in memory behind a slower writer.
READ_AHEAD_PER_WORKER = 8
# Beam workers write their rejections as JSON lines into this folder of the dataset directory; the
# builder reads them back into `rejections` once the pipeline has finished, and removes it.
BEAM_REJECTIONS_DIR = "rejections"


def import_beam():
  """`apache_beam`, or an ImportError that says how to install it (Beam is an optional extra)."""
  try:
    import apache_beam as beam  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Preparing with a Beam runner needs Apache Beam: "
                      "pip install 'astra-jax[beam]'") from e
  return beam


@dataclasses.dataclass
class AstropixelConfig(examples.ExampleConfig, tfds.core.BuilderConfig):
  """How raw galaxies become examples (the fields of `examples.ExampleConfig`), as a tfds builder
  config: one prepared dataset per config. `softening_sigmas` names the softening in units of
  the PS1 median sky noise per pixel (`softening_nmgy` = it x `preprocess.ps1_sky_sigma_nmgy`)."""
  softening_sigmas: float = examples.SOFTENING_SIGMAS


def make_config(bands=grid.PS1_BANDS, image_size=RAW_IMAGE_SIZE,
                softening_sigmas=examples.SOFTENING_SIGMAS,
                min_valid_pixels=500) -> AstropixelConfig:
  """An `AstropixelConfig` named after its parameters, e.g. `grizy-96px-nmgy-asinh2.5sky-min500`:
  images in nanomaggies, stretched as asinh(f / (2.5 x the PS1 median sky sigma))."""
  bands = tuple(bands)
  if RAW_IMAGE_SIZE % image_size:
    raise ValueError(f"image_size={image_size} must divide the raw cutout size {RAW_IMAGE_SIZE}")
  softening = preprocess.ps1_softening_nmgy(bands, softening_sigmas)
  name = (f"{''.join(bands)}-{image_size}px-nmgy-asinh{softening_sigmas:g}sky-"
          f"min{min_valid_pixels}")
  return AstropixelConfig(
      name=name, bands=bands, image_size=image_size, softening_nmgy=softening,
      softening_sigmas=float(softening_sigmas), min_valid_pixels=int(min_valid_pixels),
      description=f"bands {','.join(bands)}, {image_size}x{image_size} px, nanomaggies, asinh "
                  f"softening {softening_sigmas:g} x the PS1 median sky sigma")


# ---------------------------------------------------------------- per-galaxy work


def _beam_example(job, config: examples.ExampleConfig):
  """Beam worker: (order, galaxy_dir, row) -> (key, example), or a tagged rejection JSON line.

  `order` (split index, item index) lets the driver put the rejections back in plain-path order.
  """
  beam = import_beam()
  order, galaxy_dir, row = job
  key, example, rejected = examples.try_example((galaxy_dir, row, config))
  if rejected is None:
    yield key, example
  else:
    yield beam.pvalue.TaggedOutput("rejected", json.dumps({"order": order, **rejected}))


# ---------------------------------------------------------------- the raw folder


@dataclasses.dataclass
class RawSurvey:
  """A raw folder checked against its catalogue: the galaxies to read and those already rejected."""
  items: list[tuple[str, fits_io.CatalogRow]]   # (galaxy_dir, row), in data.csv order.
  rejections: list[dict]
  num_raw: int                                  # Catalogue rows + folders without a row.


def scan_raw_dir(raw_dir: str) -> RawSurvey:
  """Matches data.csv rows with `Galaxy_*` folders; catalogue-level problems become rejections.

  `raw_dir` is a local folder or a URL (gs://bucket/astropixel), listed once.
  """
  catalog_path = os.path.join(raw_dir, "data.csv")
  if not paths.is_file(catalog_path):
    raise fits_io.InputError(catalog_path, "missing data.csv")
  folders = {name[len("Galaxy_"):]: os.path.join(raw_dir, name)
             for name, is_folder in paths.entries(raw_dir)
             if name.startswith("Galaxy_") and is_folder}
  items, rejections, seen = [], [], {}
  rows = fits_io.read_catalog_rows(catalog_path)
  for line_no, row in enumerate(rows, start=2):
    if isinstance(row, fits_io.InputError):
      rejections.append(rejection(None, row.path, row.reason, row.detail))
      continue
    galaxy_dir = folders.get(row.specobj_id)
    if row.specobj_id in seen:
      rejections.append(rejection(row.specobj_id, f"{catalog_path}:{line_no}",
                                  "duplicate specobj_id",
                                  f"first at line {seen[row.specobj_id]}"))
    elif galaxy_dir is None:
      rejections.append(rejection(row.specobj_id, f"{catalog_path}:{line_no}",
                                  "data.csv row with no galaxy folder"))
      seen[row.specobj_id] = line_no
    else:
      items.append((galaxy_dir, row))
      seen[row.specobj_id] = line_no
  for specobj_id in sorted(set(folders) - set(seen)):
    rejections.append(rejection(specobj_id, folders[specobj_id],
                                "galaxy folder with no data.csv row"))
  num_raw = len(rows) + len(set(folders) - set(seen))
  return RawSurvey(items=items, rejections=rejections, num_raw=num_raw)


# ---------------------------------------------------------------- the builder


class Astropixel(tfds.core.GeneratorBasedBuilder):
  """Pan-STARRS1 grizy cutouts paired with SDSS spectra on one observed-frame grid.

  `image` (bands, S, S) float16: asinh(f / softening_nmgy[b]) of each pixel's flux f in
  nanomaggies (calibrated by the band's zero point), mean-binned to S, rounded to float16 (see
  `examples.image_example`). softening_nmgy (metadata, bands in config order) is a survey
  constant: softening_sigmas x the PS1 median sky noise per pixel (`preprocess.stretch`).
  Datasets before version 2.0.0 (CALIBRATED_VERSION) divided each band by its cutout's own sky
  sigma instead, ignoring the zero point; training refuses them (`datasets.check_dataset`).
  `fiber_diameter` () float32: arcsec, the fiber that took the spectrum (SDSS 3, BOSS 2; from
  the catalogue's MJD, `fits_io.fiber_diameter_arcsec`); since 2.1.0 (FIBER_VERSION).
  `aperture_flux` (bands,) float32: nanomaggies in the SDSS fiber's 3 arcsec diameter, measured on
  the linear cutouts (for colour baselines; AB mag = 22.5 - 2.5 log10 f).
  `aperture_fluxes` (bands, 5) float32: nanomaggies in the 1.5, 3, 6, 10 and 20 arcsec diameters
  of `photometry.DIAMETERS_ARCSEC` (the 3 arcsec column is `aperture_flux`), for the
  photometric baselines.
  `flux` (4000,) float32: 1e-17 erg/s/cm^2/Angstrom on log10(lambda) = 3.58 + 1e-4 i (vacuum,
  observed frame). `weight` (4000,) float32: ivar (1e-17 erg/s/cm^2/A)^-2 where the source has
  it, 1 inside the measured range where it has not, 0 outside, masked or non-finite.
  """

  VERSION = tfds.core.Version(FIBER_VERSION)
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "image, flux, weight stored as raw bytes (~200x faster to write).",
                   "1.2.0": "image stored as float16 (half the bytes to read per example).",
                   "2.0.0": "image calibrated: each band in nanomaggies by its zero point, "
                            "stretched as asinh(f / softening_nmgy) with a fixed softening per "
                            "band (a survey constant, in the metadata), where 1.x divided by "
                            "the cutout's own sky sigma and ignored the zero point (colours "
                            "off by a random 0.15-0.18 mag, the flux scale lost); a band "
                            "without a zero point is rejected; aperture_fluxes (bands, 5) "
                            "added.",
                   "2.1.0": "fiber_diameter (arcsec) of the spectrum's fiber added: SDSS 3, "
                            "BOSS 2, from the MJD. The spectrum's amplitude is the light in that "
                            "fiber."}
  BUILDER_CONFIGS = [make_config(), make_config(image_size=96)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Point manual_dir (prepare's --raw_dir) at a folder in ASTROPIXEL layout: data.csv and "
      "Galaxy_{specobj_id}/images/{specobj_id}_{band}.fits with Galaxy_{specobj_id}/spectrum/"
      "spectrum.csv or an SDSS spec-*.fits.")

  def __init__(self, *args, num_workers: int = 1, **kwargs):
    self.num_workers = num_workers
    self.rejections: list[dict] = []
    self.num_raw = 0
    # specobj_ids yielded per split, in generation order (not collected with Beam).
    self.generated_ids: dict[str, list[str]] = {}
    self._beam = False
    self._pool = None
    super().__init__(*args, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    size = cfg.image_size
    # The large arrays are stored as raw bytes: tfds builds a float_list one element at a time
    # (~0.2 s for a (5, 288, 288) image, more than reading and preprocessing the galaxy), and
    # tf.data parses raw bytes faster too.
    raw = tfds.features.Encoding.BYTES
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(len(cfg.bands), size, size), dtype=np.float16,
                                          encoding=raw,
                                          doc="asinh(nanomaggies / softening_nmgy) per pixel, "
                                              "bands in config order"),
            "aperture_flux": tfds.features.Tensor(
                shape=(len(cfg.bands),), dtype=np.float32,
                doc="nanomaggies in a 3 arcsec diameter aperture, bands in config order"),
            photometry.KEY: tfds.features.Tensor(
                shape=(len(cfg.bands), len(photometry.DIAMETERS_ARCSEC)), dtype=np.float32,
                doc="nanomaggies in apertures of diameter "
                    f"{', '.join(f'{d:g}' for d in photometry.DIAMETERS_ARCSEC)} arcsec, "
                    "bands in config order"),
            "flux": tfds.features.Tensor(shape=(grid.NUM_PIXELS,), dtype=np.float32,
                                         encoding=raw,
                                         doc="1e-17 erg/s/cm^2/Angstrom on the fixed grid"),
            "weight": tfds.features.Tensor(shape=(grid.NUM_PIXELS,), dtype=np.float32,
                                           encoding=raw,
                                           doc="inverse variance, or 1/0 inside/outside range"),
            "z": tfds.features.Scalar(dtype=np.float32, doc="spectroscopic redshift"),
            "has_z": tfds.features.Scalar(dtype=np.bool_),
            "specobj_id": tfds.features.Text(),
            "fiber_diameter": tfds.features.Scalar(
                dtype=np.float32, doc="arcsec, the spectrum's fiber: SDSS 3, BOSS 2 (from MJD)"),
            # tf.train.Example floats are 32-bit; raw bytes keep float64 coordinates exact.
            "ra": tfds.features.Tensor(shape=(), dtype=np.float64, doc="degrees, ICRS",
                                       encoding=raw),
            "dec": tfds.features.Tensor(shape=(), dtype=np.float64, doc="degrees, ICRS",
                                        encoding=raw),
        }),
        metadata=tfds.core.MetadataDict(
            bands=list(cfg.bands), image_size=size,
            image_unit="asinh(f / softening_nmgy), f the pixel's flux in nanomaggies "
                       "(AB mag = 22.5 - 2.5 log10 f) by its band's zero point",
            softening_nmgy=list(cfg.softening_nmgy), softening_sigmas=cfg.softening_sigmas,
            sky_sigma_nmgy=[s / cfg.softening_sigmas for s in cfg.softening_nmgy],
            aperture_diameters_arcsec=list(photometry.DIAMETERS_ARCSEC),
            loglam0=grid.LOGLAM0, dloglam=grid.DLOGLAM, num_pixels=grid.NUM_PIXELS,
            flux_unit="1e-17 erg/s/cm^2/Angstrom", wavelength="vacuum, observed frame"),
        homepage="https://www.kaggle.com/datasets/",
    )

  def _download_and_prepare(self, dl_manager, download_config):
    # As in tfds: a Beam runner or Beam options in the DownloadConfig ask for a Beam pipeline.
    self._beam = bool(download_config.beam_runner or download_config.beam_options)
    # One pool for all splits, started now: its readers import while the first examples are
    # searched for in this process, which then writes what they read.
    pool = (examples.reader_pool(self.num_workers) if self.num_workers > 1 and not self._beam
            else contextlib.nullcontext())
    with pool as self._pool:
      try:
        super()._download_and_prepare(dl_manager, download_config)
      finally:
        self._pool = None

  @property
  def _example_config(self) -> examples.ExampleConfig:
    return examples.ExampleConfig.of(self.builder_config)

  def _split_generators(self, dl_manager):
    survey = scan_raw_dir(os.fspath(dl_manager.manual_dir))
    self.rejections = list(survey.rejections)
    self.num_raw = survey.num_raw
    by_split = {s: [] for s in SPLITS}
    for galaxy_dir, row in survey.items:
      by_split[preprocess.split_of(row.specobj_id)].append((galaxy_dir, row))
    # tfds cannot write an empty split, so each split's first good galaxy is found here: a split
    # that no galaxy hashes to, or whose galaxies are all rejected, is left out (tiny surveys).
    # With Beam too: the search runs here, in the launching process, before the pipeline.
    generators = {}
    for split in SPLITS:
      k, first = self._first_example(by_split[split])
      if first is None:
        continue
      if self._beam:
        # Workers read the first good galaxy again rather than ship its example in the job graph.
        generators[split] = self._beam_examples(split, by_split[split][k:])
      else:
        generators[split] = self._generate_examples(split, first, by_split[split][k + 1:])
    return generators

  def _first_example(self, items):
    """(index, (key, example)) of the first good galaxy in `items`, or (None, None)."""
    for k, (galaxy_dir, row) in enumerate(items):
      key, example, rejected = examples.try_example((galaxy_dir, row, self._example_config))
      if rejected is None:
        return k, (key, example)
      self.rejections.append(rejected)
    return None, None

  def _generate_examples(self, split, first, items) -> Iterator[tuple[str, dict]]:
    """Yields (specobj_id, example) of `first` and then of each good galaxy in `items`, in the
    order of `items`; rejections join `self.rejections` in that order too."""
    ids = self.generated_ids.setdefault(split, [])
    ids.append(first[0])
    yield first
    config = self._example_config
    jobs = [(galaxy_dir, row, config) for galaxy_dir, row in items]
    if self._pool is not None:
      results = examples.imap_bounded(self._pool, examples.try_example, jobs,
                                      ahead=READ_AHEAD_PER_WORKER * self.num_workers)
    else:
      results = map(examples.try_example, jobs)
    for key, example, rejected in results:
      if rejected is None:
        ids.append(key)
        yield key, example
      else:
        self.rejections.append(rejected)

  def stored_ids(self, split: str) -> list[str]:
    """The specobj_ids of a split just prepared, sorted (the manifest's order).

    Without Beam, the ids generated; with Beam (or if the count disagrees), read back.
    """
    ids = self.generated_ids.get(split)
    if ids is None or len(ids) != self.info.splits[split].num_examples:
      ds = self.as_dataset(split=split, shuffle_files=False,
                           decoders={"image": tfds.decode.SkipDecoding(),
                                     "flux": tfds.decode.SkipDecoding(),
                                     "weight": tfds.decode.SkipDecoding()})
      ids = [ex["specobj_id"].decode() for ex in ds.as_numpy_iterator()]
    return sorted(ids)

  def _beam_examples(self, split: str, items):
    """One split as a Beam PTransform: (key, example) of each good galaxy in `items`.

    Workers cannot append to `self.rejections`; their rejections go, as JSON lines, to
    `{dataset dir}/rejections/{split}-*.jsonl` (written inside tfds's temporary directory, so they
    move with the shards) and are read back by `_post_download_and_prepare_hook`.
    """
    beam = import_beam()
    split_index = SPLITS.index(split)
    jobs = [((split_index, i), galaxy_dir, row) for i, (galaxy_dir, row) in enumerate(items)]
    prefix = os.fspath(self.data_path / BEAM_REJECTIONS_DIR / split)
    config = self._example_config

    @beam.ptransform_fn
    def read_examples(pbegin):
      # Create makes one bundle: Reshuffle spreads the reads over the workers.
      read = (pbegin
              | "Galaxies" >> beam.Create(jobs)
              | "Spread" >> beam.Reshuffle()
              | "Read" >> beam.FlatMap(_beam_example, config).with_outputs("rejected",
                                                                            main="examples"))
      _ = read.rejected | "WriteRejected" >> beam.io.WriteToText(prefix, file_name_suffix=".jsonl")
      return read.examples

    return read_examples()  # pylint: disable=no-value-for-parameter

  def _post_download_and_prepare_hook(self):
    """After a Beam run: the workers' rejections, in plain-path order, join `self.rejections`."""
    folder = self.data_path / BEAM_REJECTIONS_DIR
    if not self._beam or not folder.exists():
      return
    records = []
    for path in folder.glob("*.jsonl"):
      records.extend(json.loads(line) for line in path.read_text().splitlines() if line)
    records.sort(key=lambda r: r["order"])
    self.rejections.extend({k: v for k, v in r.items() if k != "order"} for r in records)
    folder.rmtree()

