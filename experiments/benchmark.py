r"""Throughput of ASTRA, side by side with the PyTorch seed peer, in one run.

  python -m experiments.benchmark [--torch_python /path/to/torch-venv/bin/python] [--quick]

Prints one JSON line per figure ({"figure", "value", "unit", "vs_torch", ...}), then a markdown
table. Absolute times drift with the machine's load, so every ratio is taken within one run:
  train step   `train.make_train_step` on one device with synthetic batches (state donated;
               compile and warmup steps excluded; the median of the timed steps), at the
               `small` and `seed` sizes of experiments/configs/baseline.py in float32 and
               bfloat16, at the peer's geometry (288 px, 16-px patches, Conv1d 5->32->64 patch
               CNN, decoder hidden 2048, float32 Adam moments); the torch peer
               (shared/peers/torch_seed_model.py) runs as a subprocess right after at the same
               dim, layers, heads, batch and precision: `vs_torch` = ASTRA samples/s over the
               peer's. MFU = analytic matmul FLOPs / step time / peak: the chip's dense bf16 or
               tf32 peak where the device is a known GPU or TPU, else the fastest 4096^3 matmul
               measured here in that dtype (float32 accumulation).
  input        `pipeline.train_dataset` over a prepared 288x288x5 mock: samples/s per core.
  checkpoint   Orbax save + restore of the seed config's TrainState through
               `checkpoint.checkpoint_managers` / `checkpoint.restore_or_init`, the path a
               rerun resumes by (wall seconds).
--quick: fewer timed steps (2 seed, 5 small) and a smaller mock.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from astra_jax import checkpoint
from astra_jax import grid
from astra_jax import photometry
from astra_jax import sharding
from astra_jax import train
from experiments.configs import baseline

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PEER_CANDIDATES = (os.path.join(_REPO, "shared", "peers", "torch_seed_model.py"),
                    os.path.join(os.path.dirname(_REPO), "shared", "peers", "torch_seed_model.py"))

_QUICK = flags.DEFINE_bool("quick", False, "Fewer timed steps and a smaller mock.")
_TORCH_PYTHON = flags.DEFINE_string("torch_python", "", "Python with torch for the peer.")
_SECTIONS = flags.DEFINE_list("sections", ["train", "input", "checkpoint"], "What to measure.")
_CONFIGS = flags.DEFINE_list("configs", ["small", "seed"], "Config sizes of the train step.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes of the train step.")
_SEED_BATCH = flags.DEFINE_integer("seed_batch", 0, "Batch of the seed size; 0: 8 on CPU, "
                                   "the config's (64) on an accelerator.")
_PEER_TIMEOUT = flags.DEFINE_integer("peer_timeout", 900, "Seconds before a peer run is dropped.")

FIGURES: list[dict] = []
WARMUP_STEPS = 2

# Dense peak FLOP/s per chip (vendor figures, no sparsity) by `device_kind` prefix.
CHIP_PEAKS = {
    "NVIDIA H100": {"bfloat16": 989e12, "float32": 494e12},   # SXM; float32 as TF32.
    "NVIDIA H200": {"bfloat16": 989e12, "float32": 494e12},
    "NVIDIA A100": {"bfloat16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
}


def emit(figure: str, value, unit: str, vs_torch=None, **detail) -> dict:
  """Records a figure and prints it as one JSON line."""
  row = {"figure": figure, "value": value, "unit": unit, "vs_torch": vs_torch, **detail}
  FIGURES.append(row)
  print(json.dumps(row), flush=True)
  return row


def cores() -> int:
  return os.cpu_count() or 1


def device_name() -> str:
  device = jax.devices()[0]
  if device.platform == "cpu":
    try:
      with open("/proc/cpuinfo") as f:
        name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
      name = platform.machine()
    return f"{name}, {cores()} cores"
  return device.device_kind


# ---------------------------------------------------------------- peaks and FLOPs


def matmul_peak(dtype: str, n: int = 4096, reps: int = 3) -> float:
  """FLOP/s of the fastest of `reps` n^3 matmuls in `dtype`, accumulated in float32."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  dot = jax.jit(lambda x, y: lax.dot(x, y, preferred_element_type=jnp.float32))
  dot(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    dot(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def peak_flops(dtype: str) -> tuple[float, str]:
  """(peak FLOP/s of the default device in `dtype`, where the figure comes from)."""
  kind = jax.devices()[0].device_kind
  for prefix, peaks in CHIP_PEAKS.items():
    if kind.startswith(prefix):
      return peaks[dtype], f"{prefix} datasheet"
  return matmul_peak(dtype), f"measured {dtype} 4096^3 matmul"


def forward_flops(config, summary_only: bool) -> tuple[int, int]:
  """(forward matmul FLOPs of one example, those of the first layer), 2 FLOPs per MAC.

  The patch CNN, photometry embedding, projections, attention, MLPs and heads of `Astra`
  (the heads read the photometry embedding too with `photometry_to_heads`); elementwise work (norms,
  softmax, GELU, optimizer) is left out, the usual MFU convention. `summary_only`: the last
  block computes the summary token alone, as `Astra` does in training; the peer computes all.
  """
  m = config.model
  p, bands = m.patch_size, len(config.bands.split(","))
  patches, pixels = (config.image_size // p) ** 2, p * p
  first, embed, channels = None, 0, bands
  if m.patch_embedding in ("conv2d", "conv1d"):
    # Taps that land inside the patch, on average per pixel (SAME padding's zeros are no work).
    taps = (_valid_taps(p, 3) / p) ** 2 if m.patch_embedding == "conv2d" else (
        _valid_taps(pixels, 3) / pixels)
    for features in m.cnn_features:
      layer = round(2 * pixels * taps * channels * features)
      first = layer if first is None else first
      embed, channels = embed + layer, features
  proj = 2 * pixels * channels * m.dim
  first = patches * (proj if first is None else first)
  embed = patches * (embed + proj)
  d, hidden = m.dim, m.mlp_ratio * m.dim
  token, to_heads = m.get("photometry_token", False), m.get("photometry_to_heads", False)
  if token or to_heads:  # PhotometryEmbed: features -> Dense(d) -> GELU -> Dense(d).
    embed += 2 * photometry.NUM_FEATURES * d + 2 * d * d
  t = patches + 1 + int(token)  # Patches, the summary token and the photometry token.

  def block(queries):  # q, k, v of every token; `queries` tokens attend and go through the MLP.
    return (2 * t * d * 3 * d + 2 * 2 * queries * t * d + 2 * queries * d * d
            + 2 * 2 * queries * d * hidden)

  encoder = (m.num_layers - 1) * block(t) + block(1 if summary_only else t)
  h, bins = d * (2 if to_heads else 1), m.get("amplitude_bins", 0)  # The heads' input width.
  binned_head = lambda num_bins: 2 * h * h + 2 * h * num_bins  # A RedshiftHead.
  heads = (2 * h * m.decoder_hidden + 2 * m.decoder_hidden * (grid.NUM_PIXELS + (0 if bins else 1))
           + binned_head(m.num_z_bins) + (binned_head(bins) if bins else 0))
  return embed + encoder + heads, first


def _valid_taps(n: int, k: int) -> int:
  """Taps of a SAME k-wide kernel inside an n-long axis, summed over the n positions."""
  low = (k - 1) // 2
  return sum(min(n, i + k - low) - max(0, i - low) for i in range(n))


def train_flops(config, summary_only: bool = True) -> int:
  """Training FLOPs of one example: forward + backward (2x forward), less the first layer's
  input gradient (the images need none)."""
  fwd, first = forward_flops(config, summary_only)
  return 3 * fwd - first


# ---------------------------------------------------------------- train step


def bench_config(size: str, dtype: str, seed_batch: int = 0):
  """The `size` config ("small" or "seed") in `dtype` at the torch peer's geometry; the seed
  size's batch is `seed_batch`, or 0: 8 on CPU, the config's on an accelerator."""
  config = baseline.get_config(size)
  with config.unlocked():
    config.dtype = dtype
    config.adam_mu_dtype = "float32"  # torch's Adam keeps both moments in float32.
    config.image_size = 288
    config.model.patch_size = 16
    config.model.patch_embedding = "conv1d"
    config.model.cnn_features = (32, 64)
    config.model.decoder_hidden = 2048
    if size == "seed":
      on_cpu = jax.default_backend() == "cpu"
      config.batch_size = seed_batch or (8 if on_cpu else config.batch_size)
  return config


def synthetic_batch(config, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  b = config.batch_size
  return {
      "image": rng.normal(size=(b, *train.image_shape(config))).astype(np.float16),
      "aperture_fluxes": rng.uniform(1.0, 30.0, size=(b, *train.aperture_fluxes_shape(config))
                                     ).astype(np.float32),
      "fiber_diameter": rng.choice([2.0, 3.0], size=b).astype(np.float32),
      "flux": (5 + rng.normal(size=(b, grid.NUM_PIXELS))).astype(np.float32),
      "weight": np.ones((b, grid.NUM_PIXELS), np.float32),
      "z": rng.uniform(0.02, 0.5, size=b).astype(np.float32),
      "has_z": np.ones(b, bool),
  }


def time_train_step(config, steps: int) -> dict:
  """Median seconds of the real train step on one device, and XLA's FLOP count of it."""
  mesh = sharding.create_mesh(jax.devices()[:1])
  model, tx = train.make_model(config), train.make_optimizer(config)
  state = train.init_state(config, model, tx, mesh)
  step = train.make_train_step(config, model, tx, mesh)
  batches = [sharding.to_global(synthetic_batch(config, s), mesh) for s in range(2)]
  rng = jax.random.key(config.seed)
  t = time.perf_counter()
  compiled = step.lower(state, batches[0], rng).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  times = []
  for i in range(WARMUP_STEPS + steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batches[i % 2], rng)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
  loss = float(metrics["loss"])
  del state
  return dict(step_s=statistics.median(times[WARMUP_STEPS:]), compile_s=compile_s, loss=loss,
              xla_flops=float(cost.get("flops", float("nan"))))


def peer_path() -> str | None:
  return next((p for p in _PEER_CANDIDATES if os.path.exists(p)), None)


def run_peer(config, steps: int) -> dict | str:
  """The torch peer's JSON line at `config`'s dim, layers, heads, batch and dtype, or why not.

  The peer runs on the CPU (it has no device flag): on an accelerator it is skipped.
  """
  peer = peer_path()
  if not _TORCH_PYTHON.value:
    return "skipped: no --torch_python"
  if peer is None:
    return "skipped: shared/peers/torch_seed_model.py not found"
  if jax.default_backend() != "cpu":
    return "skipped: the peer runs on the CPU only"
  m = config.model
  cmd = [_TORCH_PYTHON.value, peer, "--dim", str(m.dim), "--layers", str(m.num_layers),
         "--heads", str(m.num_heads), "--batch", str(config.batch_size), "--steps", str(steps),
         "--warmup", str(WARMUP_STEPS), "--threads", str(cores())]
  cmd += ["--bf16"] if config.dtype == "bfloat16" else []
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=_PEER_TIMEOUT.value)
  except subprocess.TimeoutExpired:
    return f"skipped: the peer took over {_PEER_TIMEOUT.value} s"
  lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
  if out.returncode or not lines:
    return f"skipped: the peer failed ({out.stderr.strip().splitlines()[-1:]})"
  return json.loads(lines[-1])


def train_section(quick: bool):
  peaks = {}
  for size in _CONFIGS.value:
    for dtype in _DTYPES.value:
      if dtype not in peaks:
        peaks[dtype] = peak_flops(dtype)
        emit(f"peak {dtype}", round(peaks[dtype][0] / 1e9, 1), "GFLOP/s", source=peaks[dtype][1])
      config = bench_config(size, dtype, _SEED_BATCH.value)
      steps = (2 if size == "seed" else 5) if quick else 5
      timing = time_train_step(config, steps)
      flops = train_flops(config) * config.batch_size
      rate = config.batch_size / timing["step_s"]
      peer = run_peer(config, steps)
      vs_torch = (round(rate / peer["samples_per_s"], 3) if isinstance(peer, dict) else None)
      emit(f"train step {size} {dtype}", round(rate, 2), "samples/s", vs_torch,
           step_s=round(timing["step_s"], 4), batch=config.batch_size,
           mfu=round(flops / timing["step_s"] / peaks[dtype][0], 3),
           tflops_per_s=round(flops / timing["step_s"] / 1e12, 3),
           xla_over_analytic_flops=round(timing["xla_flops"] / flops, 3),
           compile_s=round(timing["compile_s"], 1), loss=round(timing["loss"], 4),
           torch_samples_per_s=(round(peer["samples_per_s"], 2) if isinstance(peer, dict)
                                else peer))


# ---------------------------------------------------------------- input pipeline


def input_section(tmp: str, num_galaxies: int, batches: int):
  """Samples/s/core of the training input pipeline (shuffle, parse, batch) at 288 px."""
  from astra_jax.data import mock  # pylint: disable=g-import-not-at-top
  from astra_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from astra_jax.data import prepare  # pylint: disable=g-import-not-at-top
  raw = os.path.join(tmp, "raw")
  mock.generate_survey(raw, num_galaxies, seed=0)
  dataset_dir = prepare.prepare(raw, os.path.join(tmp, "tfds"), image_size=288)["dataset_dir"]
  batch = 32
  iterator = pipeline.as_numpy(pipeline.train_dataset(dataset_dir, global_batch=batch, seed=0))
  for _ in range(5):  # tf.data warmup: threads, the first shuffle-buffer fill.
    next(iterator)
  t = time.perf_counter()
  for _ in range(batches):
    example = next(iterator)
  rate = batches * batch / (time.perf_counter() - t)
  emit("input pipeline 288x288x5", round(rate / cores(), 1), "samples/s/core",
       samples_per_s=round(rate, 1), cores=cores(), image_dtype=str(example["image"].dtype))


# ---------------------------------------------------------------- checkpoint


def checkpoint_section(tmp: str):
  """Save + restore seconds of the seed TrainState, as a run saves it and a rerun resumes."""
  config = baseline.get_config("seed")
  mesh = sharding.create_mesh(jax.devices()[:1])
  model, tx = train.make_model(config), train.make_optimizer(config)
  state = train.init_state(config, model, tx, mesh)
  size = sum(x.nbytes for x in jax.tree.leaves(state))
  workdir = os.path.join(tmp, "ckpt")
  latest, _ = checkpoint.checkpoint_managers(workdir, config)
  t = time.perf_counter()
  latest.save(1, args=ocp.args.StandardSave(state))
  latest.wait_until_finished()
  save_s = time.perf_counter() - t
  del state
  latest, _ = checkpoint.checkpoint_managers(workdir, config)
  t = time.perf_counter()
  restored = checkpoint.restore_or_init(latest, train.abstract_state(config, model, tx, mesh),
                                        lambda: None)
  jax.block_until_ready(restored)
  restore_s = time.perf_counter() - t
  emit("checkpoint save + restore, seed TrainState", round(save_s + restore_s, 2), "s",
       save_s=round(save_s, 2), restore_s=round(restore_s, 2), gigabytes=round(size / 1e9, 2))


# ---------------------------------------------------------------- report


def table() -> str:
  lines = ["| figure | value | unit | vs torch | details |", "|---|---:|---|---:|---|"]
  for r in FIGURES:
    detail = ", ".join(f"{k}={v}" for k, v in r.items()
                       if k not in ("figure", "value", "unit", "vs_torch"))
    vs = "" if r["vs_torch"] is None else f"{r['vs_torch']}x"
    lines.append(f"| {r['figure']} | {r['value']} | {r['unit']} | {vs} | {detail} |")
  return "\n".join(lines)


def main(argv):
  del argv
  quick = _QUICK.value
  print(f"# {device_name()}; jax {jax.__version__}, Python {platform.python_version()}",
        flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    if "train" in _SECTIONS.value:
      train_section(quick)
    if "input" in _SECTIONS.value:
      input_section(tmp, 64 if quick else 256, 30 if quick else 90)
    if "checkpoint" in _SECTIONS.value:
      checkpoint_section(tmp)
  print(table())


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
