r"""ASTRA baseline: images -> (spectrum, redshift PDF).

Variants (`--config=experiments/configs/baseline.py:VARIANT`):
  small  sized to learn something real on a 2-core CPU in about ten minutes.
  seed   the seed's size (dim 1280, 6 layers, 8 heads, decoder 1280->2048->4000), for GPU/TPU.
  tiny   a few seconds end to end; used by the tests.
With no variant, `small` is picked on CPU and `seed` on an accelerator (and the choice is logged).

  python -m experiments.baseline --workdir=runs/baseline \
      --config=experiments/configs/baseline.py:small --config.batch_size=32
"""

import ml_collections

VARIANTS = ("small", "seed", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config of `arg` in VARIANTS; None picks by the default JAX backend."""
  if arg is None or arg == "":
    arg = "auto"
  if arg == "auto":
    import jax  # Imported lazily so that reading a config never initialises a backend.
    arg = "small" if jax.default_backend() == "cpu" else "seed"
  if arg not in VARIANTS:
    raise ValueError(f"config variant {arg!r} is not one of {VARIANTS}")

  c = ml_collections.ConfigDict()
  c.variant = arg

  # Data. An empty data_dir means: generate the default mock survey and prepare it.
  c.data_dir = ""           # Folder holding the prepared `astropixel` dataset (prepare's dataset_dir).
  c.raw_dir = ""            # ASTROPIXEL-layout raw folder; prepared into data_dir when given.
  c.mock_cache_dir = ""     # Where the default mock survey goes; "" -> the workdir's parent/_mock_cache.
  c.num_galaxies = 2000     # Size of the default mock survey.
  c.mock_seed = 0
  c.bands = "g,r,i,z,y"     # Fixed band order of the images.
  # Images are nanomaggies (each band by its zero point), stretched as asinh(f / softening) with
  # softening = softening_sigmas x the PS1 3pi median sky noise per pixel of the band
  # (preprocess.ps1_sky_sigma_nmgy: 0.012-0.090 nanomaggies, g to y): a survey constant.
  c.softening_sigmas = 2.5  # Dimensionless: asinh softening in PS1 median sky sigmas.
  c.image_size = 96         # Model input size in pixels; the 288x288 cutouts are mean-binned to it.
  c.shuffle_buffer = 1024
  c.augment = True          # The 8 flips/90-degree rotations of the image; the spectrum is unchanged.

  # Optimisation.
  c.seed = 0
  c.batch_size = 32         # Global, over all devices of all hosts.
  # 15 epochs of the default survey's ~1,600 training galaxies: the whole default run (mock,
  # prepare, train, evaluate, baselines) took 540 s on an idle 2-core CPU; at the slowest rate
  # measured there (0.89 s/step) it would take ~14 minutes, 1000 steps ~18 (docs/science.md,
  # "Wall time").
  c.num_train_steps = 750
  c.learning_rate = 1e-3
  c.warmup_steps = 50
  c.end_learning_rate_factor = 0.02
  c.weight_decay = 1e-4
  c.grad_clip_norm = 1.0
  # lambda in  loss = spectrum MSE + lambda_norm * norm + lambda * z cross-entropy. 0.5: with the
  # standardised photometry features (lever (i)) the redshift term had R^2 and MSE lose to the
  # kNN at 1; at 0.5 they win and sigma_MAD stays ~0.012 (docs/science.md).
  c.z_loss_weight = 0.5
  # Gaussian label smoothing of the redshift cross-entropy, std in z (losses.smoothed_labels);
  # 0 -> one-hot labels. docs/science.md has the ablation.
  c.z_label_sigma = 0.01
  # lambda_norm in that loss, for the binned amplitude's cross-entropy (~3.6 nats where the
  # redshift's is ~3): at 1 its gradient on the shared layers cost the spectrum R^2
  # (docs/science.md, lever (j)).
  c.norm_loss_weight = 0.25
  # Penalty of the log_norm error (losses.NORM_LOSSES): "binned", the cross-entropy of the binned
  # amplitude head (model.amplitude_bins), whose labels are smoothed by norm_label_sigma dex;
  # "absolute" fits the median of log10(norm / aperture flux); docs/science.md has the ablation.
  c.norm_loss = "binned"
  c.norm_label_sigma = 0.02
  c.dtype = "float32"       # Compute dtype: float32 or bfloat16 (params stay float32).
  c.adam_mu_dtype = "float32"  # Adam's first moment; bfloat16 takes 1/6 off the train state.
  c.rng_impl = "threefry2x32"

  # Bookkeeping.
  c.log_every_steps = 25
  # Also log each loss part's gradient norm on the shared layers (train.make_loss_grad_norms) at
  # log steps: one forward and three backward passes more each time.
  c.log_loss_grad_norms = False
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200
  c.max_to_keep = 2

  c.model = ml_collections.ConfigDict()
  c.model.patch_size = 8
  c.model.patch_embedding = "conv2d"
  c.model.dim = 128
  c.model.num_layers = 3
  c.model.num_heads = 4
  c.model.mlp_ratio = 4
  c.model.dropout = 0.1
  c.model.decoder_hidden = 512
  # One 3x3 conv layer of 16 channels per patch: the second (32) layer cost ~2/3 of the small
  # CPU step (0.88 vs 2.5 s side by side); the cheaper step buys more steps in the same time.
  c.model.cnn_features = (16,)
  c.model.num_z_bins = 180
  c.model.z_max = 0.6
  # The calibrated aperture photometry measured on the same cutouts (photometry.aperture_fluxes,
  # stored by prepare, measured on the FITS files by predict) as one more input token ...
  c.model.photometry_token = True
  # ... and that embedding also goes straight to the heads beside the summary token: at 750
  # steps spectrum R^2 0.621 -> 0.738, sigma_MAD 0.0218 -> 0.0230 (docs/science.md, lever (h)).
  c.model.photometry_to_heads = True
  # The embedding reads photometry.features (the photometric baselines' 23 colours, magnitudes
  # and sizes) standardised by their training-split mean and std; () -> training measures them
  # and config.json keeps them (train.measure_photometry_statistics, docs/science.md lever (i)).
  c.model.photometry_mean = ()
  c.model.photometry_scale = ()
  # ... and the amplitude: log_norm predicted as a correction to the normalisation at which the
  # predicted spectrum has the r-band 3 arcsec aperture flux (astra.AMPLITUDES,
  # astra.spectrum_log_norm). docs/science.md has the ablation.
  c.model.amplitude = "aperture_spectrum"
  # ... as a PDF over 200 bins of 0.01 dex (astra.AMPLITUDE_RANGE_DEX): the fiber's share of
  # the light is bimodal (2 and 3 arcsec fibers, 0.24 dex apart). Read at its median, the
  # estimate that minimises each galaxy's expected absolute error in dex (as the redshift's); the
  # mode favours the g, r, i flux rows and the mean the z row, which holds 2 arcsec spectra
  # only (docs/science.md, lever (j)). amplitude_bins 0: a regression.
  c.model.amplitude_bins = 200
  c.model.amplitude_estimate = "median"
  # ... for the fiber the spectrum was taken through (SDSS 3, BOSS 2 arcsec; the dataset's
  # fiber_diameter, from the MJD; predict's --fiber_diameter), which the amplitude head reads:
  # the light a fiber holds is a question of the fiber (docs/science.md, lever (k)).
  c.model.fiber_input = True

  if arg == "seed":
    c.image_size = 288
    c.batch_size = 64
    c.num_train_steps = 20000
    c.learning_rate = 1e-4
    c.warmup_steps = 1000
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    c.dtype = "bfloat16"
    c.adam_mu_dtype = "bfloat16"  # As big_vision's ViT configs: 1.82 -> 1.52 GB of state.
    c.model.patch_size = 16
    c.model.dim = 1280
    c.model.num_layers = 6
    c.model.num_heads = 8
    c.model.decoder_hidden = 2048
    c.model.cnn_features = (32, 64)   # The seed's patch CNN channels.
  elif arg == "tiny":
    c.num_galaxies = 24
    c.mock_seed = 3         # Its 24 galaxies hash to 17 train, 2 validation, 5 test.
    c.image_size = 32
    c.batch_size = 8
    c.shuffle_buffer = 16
    c.num_train_steps = 4
    c.warmup_steps = 1
    c.log_every_steps = 1
    c.eval_every_steps = 2
    c.checkpoint_every_steps = 2
    c.model.dim = 32
    c.model.num_layers = 1
    c.model.num_heads = 2
    c.model.decoder_hidden = 64
    c.model.num_z_bins = 30
  return c
