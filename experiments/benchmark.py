r"""Throughput of ASTRA on this machine, side by side with the PyTorch seed peer.

  python -m experiments.benchmark --torch_python /work/torchvenv/bin/python [--quick]

Everything is measured in one process, one figure after another (absolute times drift with the
machine's load; ratios taken minutes apart drift much less):
  matmul peak    a 4096^2 x 4096^2 matmul in float32 and in bfloat16 with float32 accumulation
                 (the MFU denominators), and in bfloat16 with a bfloat16 result;
  train step     `train.make_train_step` on a 1-device mesh with synthetic batches (state donated,
                 warmup excluded, median of N steps), for the `seed` (batch 8) and `small` configs
                 of experiments/configs/baseline.py in float32 and bfloat16: the model as
                 configured, and "peer-matched" (the peer's fixed geometry: 288 px, 16-px patches,
                 Conv1d(5->32->64) patch CNN, decoder hidden 2048; the config's dim, layers, heads
                 and batch), next to the torch peer run as a subprocess at the same settings;
                 samples/s and FLOP/s from analytic FLOPs per sample, checked against XLA's cost
                 analysis of the compiled step;
  input pipeline `pipeline.train_dataset` over a prepared 288x288x5 mock, samples/s per core;
  prepare        `prepare.prepare` of a fresh mock with 1 worker and with one worker per core;
  checkpoint     Orbax save + restore of the seed's full TrainState (`train.checkpoint_managers`,
                 `train.restore_or_init`);
  peak RSS       of this process and of its children.
Prints one JSON line per figure ({"figure", "value", "unit", "vs_torch", ...}), then markdown
tables and the goals.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import copy  # pylint: disable=g-import-not-at-top,g-bad-import-order
import json
import platform
import resource
import shutil
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

from astra_jax import grid
from astra_jax import train
from experiments.configs import baseline

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PEER_CANDIDATES = (os.path.join(_REPO, "shared", "peers", "torch_seed_model.py"),
                    os.path.join(os.path.dirname(_REPO), "shared", "peers", "torch_seed_model.py"))

_QUICK = flags.DEFINE_bool("quick", False, "Fewer steps, repetitions and galaxies (a few minutes).")
_TORCH_PYTHON = flags.DEFINE_string(
    "torch_python", "", "A python with torch for the peer (e.g. /work/torchvenv/bin/python); "
    "empty: the peer is skipped.")
_TORCH_PEER = flags.DEFINE_string(
    "torch_peer", "", "Path of torch_seed_model.py; empty: shared/peers/ beside or above the repo.")
_SECTIONS = flags.DEFINE_list("sections", ["matmul", "train", "checkpoint", "data"],
                              "Which parts to run.")
_CONFIGS = flags.DEFINE_list("configs", ["seed", "small"], "Config variants of the train step.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes of the train step.")
_EMBEDDINGS = flags.DEFINE_list("embeddings", ["configured", "peer"],
                                "'configured' (the config's model) and/or 'peer' (peer-matched).")
_SEED_BATCH = flags.DEFINE_integer("seed_batch", 8, "Batch of the seed config (the peer's).")
_STEPS = flags.DEFINE_integer("steps", 0, "Timed train steps; 0: 5, or 2 with --quick.")
_RNG_IMPL = flags.DEFINE_string("rng_impl", "", "Dropout RNG; empty: the config's rng_impl.")
_GALAXIES = flags.DEFINE_integer("galaxies", 0, "Mock galaxies for the data figures; 0: 96, "
                                 "or 48 with --quick.")
_TMP_DIR = flags.DEFINE_string("tmp_dir", "", "Where mocks and checkpoints go (default: $TMPDIR).")

FIGURES: list[dict] = []


def emit(figure: str, value, unit: str, vs_torch=None, **detail) -> dict:
  """Records a figure and prints it as one JSON line."""
  row = {"figure": figure, "value": value, "unit": unit, "vs_torch": vs_torch, **detail}
  FIGURES.append(row)
  print(json.dumps(row), flush=True)
  return row


def median_time(fn, reps: int, warmup: int = 1) -> float:
  """Median wall seconds of `fn()` (which must block until its work is done) after `warmup` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def cores() -> int:
  return os.cpu_count() or 1


# ---------------------------------------------------------------- matmul peak


def matmul_peak(n: int = 4096, reps: int = 5) -> dict[str, float]:
  """GFLOP/s of an n x n x n matmul: float32, bf16 -> f32 accumulation, bf16 -> bf16."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  ab, bb = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  cases = {
      "float32": (jax.jit(lambda x, y: x @ y), a, b),
      "bf16_f32acc": (jax.jit(lambda x, y: lax.dot(x, y, preferred_element_type=jnp.float32)),
                      ab, bb),
      "bf16_bf16out": (jax.jit(lambda x, y: x @ y), ab, bb),
  }
  peaks = {}
  for name, (fn, x, y) in cases.items():
    seconds = median_time(lambda: fn(x, y).block_until_ready(), reps)
    peaks[name] = 2 * n**3 / seconds / 1e9
    emit(f"matmul {n}^2 {name}", round(peaks[name], 1), "GFLOP/s", seconds=round(seconds, 4))
  return peaks


# ---------------------------------------------------------------- FLOPs


def forward_flops(config) -> tuple[int, int]:
  """(forward matmul/conv FLOPs of one example, those of the first layer), 2 FLOPs per MAC.

  Counts the patch CNN, projections, attention, MLPs and heads of `Astra`; elementwise work
  (norms, softmax, GELU, optimizer) is left out, as in the usual MFU convention.
  """
  m = config.model
  p, bands = m.patch_size, len(config.bands.split(","))
  patches = (config.image_size // p) ** 2
  pixels = p * p
  first = None
  embed, channels = 0, bands
  if m.patch_embedding in ("conv2d", "conv1d"):
    taps = 9 if m.patch_embedding == "conv2d" else 3
    for features in m.cnn_features:
      layer = 2 * pixels * taps * channels * features
      first = layer if first is None else first
      embed += layer
      channels = features
  proj = 2 * pixels * channels * m.dim
  first = proj if first is None else first
  embed = patches * (embed + proj)
  first *= patches
  d, t = m.dim, patches + 1
  block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * m.mlp_ratio * d
  heads = (2 * d * m.decoder_hidden + 2 * m.decoder_hidden * (grid.NUM_PIXELS + 1) +
           2 * d * d + 2 * d * m.num_z_bins)
  return embed + m.num_layers * block + heads, first


def train_flops(config) -> int:
  """Training FLOPs of one example: forward + backward (2x forward), less the first layer's
  input gradient (the images need none)."""
  fwd, first = forward_flops(config)
  return 3 * fwd - first


# ---------------------------------------------------------------- train step


def bench_config(variant: str, dtype: str, embedding: str):
  """The config whose train step is timed; `embedding` "peer" gives the peer's geometry."""
  config = baseline.get_config(variant)
  with config.unlocked():
    config.dtype = dtype
    if variant == "seed":
      config.batch_size = _SEED_BATCH.value
    if _RNG_IMPL.value:
      config.rng_impl = _RNG_IMPL.value
    if embedding == "peer":
      config.image_size = 288
      config.model.patch_size = 16
      config.model.patch_embedding = "conv1d"
      config.model.cnn_features = (32, 64)
      config.model.decoder_hidden = 2048
  return config


def synthetic_batch(config, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  b = config.batch_size
  return {
      "image": rng.normal(size=(b, *train.image_shape(config))).astype(np.float32),
      "flux": (5 + rng.normal(size=(b, grid.NUM_PIXELS))).astype(np.float32),
      "weight": np.ones((b, grid.NUM_PIXELS), np.float32),
      "z": rng.uniform(0.02, 0.5, size=b).astype(np.float32),
      "has_z": np.ones(b, bool),
  }


def time_train_step(config, steps: int) -> dict:
  """Median step seconds of the real train step, plus XLA's FLOP count of the compiled step."""
  mesh = train.create_mesh(jax.devices()[:1])
  model, tx = train.make_model(config), train.make_optimizer(config)
  state = train.init_state(config, model, tx, mesh)
  step = train.make_train_step(config, model, tx, mesh)
  batches = [train.to_global(synthetic_batch(config, s), mesh) for s in range(2)]
  rng = jax.random.key(config.seed, impl=config.rng_impl)
  t = time.perf_counter()
  compiled = step.lower(state, batches[0], rng).compile()
  compile_s = time.perf_counter() - t
  xla_flops = float((compiled.cost_analysis() or {}).get("flops", float("nan")))
  times = []
  for i in range(steps + 1):  # The first (warmup) step is not timed.
    t = time.perf_counter()
    state, metrics = compiled(state, batches[i % 2], rng)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
  loss = float(metrics["loss"])
  del state
  return dict(step_s=statistics.median(times[1:]), compile_s=compile_s, xla_flops=xla_flops,
              loss=loss)


def run_peer(config, dtype: str, steps: int) -> dict | str:
  """The torch peer's JSON line at the peer-matched settings of `config`, or why it was skipped."""
  if not _TORCH_PYTHON.value:
    return "skipped: no torch (pass --torch_python)"
  peer = _TORCH_PEER.value or next((p for p in _PEER_CANDIDATES if os.path.exists(p)), "")
  if not os.path.exists(peer):
    return "skipped: torch_seed_model.py not found (pass --torch_peer)"
  probe = subprocess.run([_TORCH_PYTHON.value, "-c", "import torch"], capture_output=True)
  if probe.returncode:
    return f"skipped: no torch in {_TORCH_PYTHON.value}"
  m = config.model
  cmd = [_TORCH_PYTHON.value, peer, "--dim", str(m.dim), "--layers", str(m.num_layers),
         "--heads", str(m.num_heads), "--batch", str(config.batch_size), "--steps", str(steps),
         "--warmup", "1", "--threads", str(cores())] + (["--bf16"] if dtype == "bfloat16" else [])
  out = subprocess.run(cmd, capture_output=True, text=True)
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not lines:
    return f"skipped: peer failed ({out.stderr.strip().splitlines()[-1:]})"
  return json.loads(lines[-1])


def train_section(peaks: dict[str, float], steps: int):
  for variant in _CONFIGS.value:
    for dtype in _DTYPES.value:
      for embedding in _EMBEDDINGS.value:
        config = bench_config(variant, dtype, embedding)
        timing = time_train_step(config, steps)
        batch = config.batch_size
        flops = train_flops(config)
        samples_s = batch / timing["step_s"]
        gflops_s = samples_s * flops / 1e9
        peak = peaks.get("float32" if dtype == "float32" else "bf16_f32acc")
        vs_torch = peer_samples = None
        name = f"train_step {variant} {dtype} {'peer-matched conv1d' if embedding == 'peer' else config.model.patch_embedding}"
        if embedding == "peer":
          peer = run_peer(config, dtype, steps)
          if isinstance(peer, dict):
            peer_samples = peer["samples_per_s"]
            vs_torch = round(samples_s / peer_samples, 3)
            emit(f"torch_peer {variant} {dtype}", round(peer_samples, 3), "samples/s",
                 batch=batch, step_s=round(peer["step_s_median"], 3), torch=peer["torch"],
                 threads=peer["threads"], gflop_per_s=round(peer_samples * flops / 1e9, 1))
          else:
            emit(f"torch_peer {variant} {dtype}", None, "samples/s", note=peer)
        xla = timing["xla_flops"] / batch
        emit(name, round(samples_s, 3), "samples/s", vs_torch, batch=batch,
             step_s=round(timing["step_s"], 3), compile_s=round(timing["compile_s"], 1),
             gflop_per_s=round(gflops_s, 1),
             mfu=round(gflops_s / peak, 3) if peak else None,
             gflop_per_sample=round(flops / 1e9, 2), xla_gflop_per_sample=round(xla / 1e9, 2),
             xla_vs_analytic=round(xla / flops, 4), rng_impl=config.rng_impl,
             loss=round(timing["loss"], 4))


# ---------------------------------------------------------------- checkpoint


def checkpoint_section(tmp: str):
  """Save + restore seconds of the seed's full TrainState (Orbax, as train_and_evaluate does)."""
  config = baseline.get_config("seed")
  mesh = train.create_mesh(jax.devices()[:1])
  model, tx = train.make_model(config), train.make_optimizer(config)
  state = jax.block_until_ready(train.init_state(config, model, tx, mesh))
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  workdir = os.path.join(tmp, "checkpoint")
  latest, _ = train.checkpoint_managers(workdir, config)
  t = time.perf_counter()
  latest.save(1, args=ocp.args.StandardSave(state))
  latest.wait_until_finished()
  save_s = time.perf_counter() - t
  del state
  t = time.perf_counter()
  restored = jax.block_until_ready(train.restore_or_init(latest, config, model, tx, mesh))
  restore_s = time.perf_counter() - t
  assert int(restored.step) == 0
  latest.close()
  emit("checkpoint save+restore (seed TrainState)", round(save_s + restore_s, 2), "s",
       save_s=round(save_s, 2), restore_s=round(restore_s, 2), gbytes=round(nbytes / 1e9, 2),
       note="restore reads a checkpoint written moments before (page cache)")
  shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------- data


def data_section(tmp: str, num_galaxies: int, quick: bool):
  """prepare galaxies/s (1 worker, and per core with one worker per core); pipeline samples/s."""
  from astra_jax.data import mock  # pylint: disable=g-import-not-at-top
  from astra_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from astra_jax.data import prepare  # pylint: disable=g-import-not-at-top
  prepare.hide_gpus_from_tensorflow()
  raw = os.path.join(tmp, "raw")
  t = time.perf_counter()
  mock.generate_survey(raw, num_galaxies, seed=0, num_workers=cores())
  print(f"# mock survey: {num_galaxies} galaxies in {time.perf_counter() - t:.1f} s", flush=True)
  dataset_dir = None
  for workers in (1, cores()):
    t = time.perf_counter()
    summary = prepare.prepare(raw, os.path.join(tmp, f"tfds-{workers}"), image_size=288,
                              num_workers=workers)
    seconds = time.perf_counter() - t
    written = sum(summary["written"].values())
    emit(f"prepare {workers} worker(s), 288 px", round(num_galaxies / seconds / workers, 2),
         "galaxies/s/core", galaxies=num_galaxies, written=written,
         rejected=summary["rejected"], seconds=round(seconds, 2),
         galaxies_per_s=round(num_galaxies / seconds, 2))
    dataset_dir = dataset_dir or summary["dataset_dir"]
  batch = 32
  ds = pipeline.train_dataset(dataset_dir, global_batch=batch, seed=0, process_index=0,
                              process_count=1)
  iterator = pipeline.as_numpy(ds)
  for _ in range(3):  # tf.data warmup: threads, the first shuffle buffer fill.
    next(iterator)
  n = 10 if quick else 30
  t = time.perf_counter()
  for _ in range(n):
    example = next(iterator)
  seconds = time.perf_counter() - t
  rate = n * batch / seconds
  emit("input pipeline 288x288x5, augment", round(rate / cores(), 1), "samples/s/core",
       samples_per_s=round(rate, 1), batch=batch, batches=n, cores=cores(),
       image_shape=list(example["image"].shape[1:]))


# ---------------------------------------------------------------- report


def machine() -> str:
  model = "unknown CPU"
  flags_line = ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name") and model == "unknown CPU":
          model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags_line:
          flags_line = line
  except OSError:
    pass
  isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags_line]
  mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return (f"{model}, {cores()} cores ({', '.join(isa)}), {mem:.0f} GiB; "
          f"jax {jax.__version__}, {platform.python_version()}")


def table(rows) -> str:
  lines = ["| figure | value | unit | vs torch | details |", "|---|---:|---|---:|---|"]
  for r in rows:
    detail = ", ".join(f"{k}={v}" for k, v in r.items()
                       if k not in ("figure", "value", "unit", "vs_torch"))
    value = "—" if r["value"] is None else r["value"]
    vs = "" if r["vs_torch"] is None else f"{r['vs_torch']}x"
    lines.append(f"| {r['figure']} | {value} | {r['unit']} | {vs} | {detail} |")
  return "\n".join(lines)


def goals(peaks) -> list[str]:
  """Each goal with the measured figure it is judged by."""
  out = []
  for r in FIGURES:
    if r["figure"].startswith("train_step") and r["vs_torch"] is not None:
      out.append(f"{r['figure']}: {r['vs_torch']}x torch (goal >= 1.2x): "
                 f"{'met' if r['vs_torch'] >= 1.2 else 'NOT met'}")
    if r["figure"].startswith("train_step seed bfloat16") and r.get("mfu") is not None:
      out.append(f"{r['figure']}: {r['mfu']:.1%} of the bf16 matmul peak "
                 f"({peaks.get('bf16_f32acc', 0):.0f} GFLOP/s) (goal >= 80%): "
                 f"{'met' if r['mfu'] >= 0.8 else 'NOT met'}")
    if r["figure"].startswith("input pipeline"):
      out.append(f"input pipeline: {r['value']} samples/s/core (goal >= 400): "
                 f"{'met' if r['value'] >= 400 else 'NOT met'}")
    if r["figure"].startswith("prepare") and r["galaxies"]:
      out.append(f"{r['figure']}: {r['value']} galaxies/s/core (goal >= 50): "
                 f"{'met' if r['value'] >= 50 else 'NOT met'}")
    if r["figure"].startswith("checkpoint"):
      out.append(f"checkpoint save+restore: {r['value']} s (goal < 5 s): "
                 f"{'met' if r['value'] < 5 else 'NOT met'}")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quick = _QUICK.value
  steps = _STEPS.value or (2 if quick else 5)
  sections = set(_SECTIONS.value)
  print(f"# {machine()}", flush=True)
  print(f"# command: {' '.join([os.path.basename(sys.executable), '-m', 'experiments.benchmark'] + sys.argv[1:])}",
        flush=True)
  tmp = tempfile.mkdtemp(prefix="astra-bench-", dir=_TMP_DIR.value or None)
  peaks = {}
  try:
    if "matmul" in sections:
      peaks = matmul_peak(reps=3 if quick else 5)
    if "train" in sections:
      train_section(peaks, steps)
    if "checkpoint" in sections:
      checkpoint_section(tmp)
    if "data" in sections:
      data_section(tmp, _GALAXIES.value or (48 if quick else 96), quick)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
  emit("peak RSS (this process)", round(self_rss, 2), "GiB",
       children_gib=round(child_rss, 2), note="children: the largest torch peer / worker")
  print(f"\n## Benchmark ({machine()})\n")
  print(table(FIGURES))
  print("\n## Goals\n")
  for line in goals(peaks):
    print(f"- {line}")


if __name__ == "__main__":
  app.run(main)
