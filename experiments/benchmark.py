r"""Throughput of ASTRA on this machine, side by side with the PyTorch seed peer.

  python -m experiments.benchmark --torch_python /work/torchvenv/bin/python [--quick]

Everything is measured in one run, one figure after another (absolute times drift with the
machine's load; ratios taken minutes apart drift much less):
  matmul peak    4096^3 and 4096 x 1024 x 4096 matmuls in float32, and bf16 x bf16 with float32
                 accumulation both as the native dot and widened to float32 (the fastest are the
                 MFU denominators; `matmul_peak`), and bf16 -> bf16;
  train step     `train.make_train_step` on a 1-device mesh with synthetic batches, each config
                 in a fresh process of its own, as the peer (state donated; compile and 2 warmup
                 steps excluded, the peer's too; median of N steps; a peer-matched config is
                 timed in two such processes, just before and just after its peer, and their
                 mean taken, which cancels a drift of the machine's speed), for the
                 `seed` (batch 8) and `small` configs of experiments/configs/baseline.py in float32
                 and bfloat16: the model as configured, and "peer-matched" (the peer's fixed
                 geometry: 288 px, 16-px patches, Conv1d(5->32->64) patch CNN, decoder hidden 2048,
                 float32 Adam moments; the config's dim, layers, heads and batch) next to the
                 torch peer run as a subprocess at the same settings and precision. FLOP/s and
                 MFU come from analytic FLOPs per sample, checked against XLA's cost analysis of
                 the compiled step; the MFU denominator is the highest matmul rate measured in
                 the train section (at its start, again just before each step, and after the
                 last). A peer that runs out of time (torch's bf16 matmuls crawl on CPUs without
                 AVX512-BF16) gives no rate and leaves that ratio undetermined;
  input pipeline `pipeline.train_dataset` over a prepared 288x288x5 mock (shuffle, parse, batch;
                 the random flips/rotations are part of the train step), samples/s per core;
  prepare        `prepare.prepare` of a fresh mock with 1 worker and with one worker per core,
                 galaxies/s per core (in a fresh process, imports excluded): steady (the mock's
                 second half over the seconds it adds to a run of the first half: start-up
                 cancels) and end to end, each run repeated (2 times, 3 without --quick) and
                 its fastest taken;
  predict        `predict.predict_folder` of the mock's cutouts with a freshly initialised small
                 model: the forward pass alone, reading + preprocessing alone, and end to end,
                 galaxies/s per core;
  checkpoint     Orbax save + restore of the seed's full TrainState (`train.checkpoint_managers`,
                 `train.restore_or_init`: what a rerun resumes from) and of its params alone (the
                 best checkpoint, `analysis.restore(best=True)`: what a notebook reads), saved by
                 one fresh process and restored by another;
  peak RSS       of this process and of its largest child.
Like every entry point it restarts itself with glibc's transparent huge pages
(`astra_jax.hugepages`; ASTRA_HUGEPAGES=0 to measure without), and the torch peer it starts
inherits that setting: both frameworks run in the same environment. The prepare processes start
without it, as prepare's command line runs.
Prints one JSON line per figure ({"figure", "value", "unit", "vs_torch", ...}), then markdown
tables and the goals. --quick: 2 timed seed steps and 5 of each small config (the peer: 2 and
3, 150 s at most), the seed config peer-matched only; the same 384 mock galaxies (the steady
two-worker prepare rate is the difference of two runs of a few seconds: with 192 it read 29,
47 and 70 galaxies/s/core in three runs, with 384 45 and 51, and a single slow run of the
first half once made it 69.7: hence the fastest of repeated runs). About 15 minutes on 2 AVX2
cores (a seed step of batch 8 takes ~16-21 s there), 17-18 on a 2-core Zen 4 (each peer-matched
config timed twice, around its peer), about 5 without the peer.
"""

if __name__ == "__main__":  # First, before jax and TensorFlow load: see astra_jax.hugepages.
  from astra_jax import hugepages  # pylint: disable=g-import-not-at-top
  hugepages.reexec_with_huge_pages()

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # pylint: disable=g-import-not-at-top,g-bad-import-order
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
from astra_jax import hugepages
from astra_jax import sharding
from astra_jax import train
from astra_jax.data import fits_io
from experiments.configs import baseline

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PEER_CANDIDATES = (os.path.join(_REPO, "shared", "peers", "torch_seed_model.py"),
                    os.path.join(os.path.dirname(_REPO), "shared", "peers", "torch_seed_model.py"))

_QUICK = flags.DEFINE_bool("quick", False, "Fewer steps, variants and galaxies (module doc).")
_TORCH_PYTHON = flags.DEFINE_string(
    "torch_python", "", "A python with torch for the peer (e.g. /work/torchvenv/bin/python); "
    "empty: the peer is skipped.")
_TORCH_PEER = flags.DEFINE_string(
    "torch_peer", "", "Path of torch_seed_model.py; empty: shared/peers/ beside or above the repo.")
_SECTIONS = flags.DEFINE_list("sections", ["matmul", "train", "checkpoint", "data", "predict"],
                              "Which parts to run.")
_CONFIGS = flags.DEFINE_list("configs", ["seed", "small"], "Config variants of the train step.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes of the train step.")
_EMBEDDINGS = flags.DEFINE_list(
    "embeddings", [], "'configured' (the config's model) and/or 'peer' (peer-matched); empty: "
    "both, or with --quick both for small and only 'peer' for seed.")
_TORCH_TIMEOUT = flags.DEFINE_integer(
    "torch_timeout", 0, "Seconds a peer run may take; 0: 600, or 150 with --quick.")
_SEED_BATCH = flags.DEFINE_integer("seed_batch", 8, "Batch of the seed config (the peer's).")
_STEPS = flags.DEFINE_integer("steps", 0, "Timed train steps; 0: 5, fewer with --quick "
                              "(`step_counts`).")
_RNG_IMPL = flags.DEFINE_string("rng_impl", "", "Dropout RNG; empty: the config's rng_impl.")
_GALAXIES = flags.DEFINE_integer("galaxies", 384, "Mock galaxies for the data figures.")
_TMP_DIR = flags.DEFINE_string("tmp_dir", "", "Where mocks and checkpoints go (default: $TMPDIR).")
_IN_PROCESS = flags.DEFINE_bool(
    "train_in_process", False, "Time ASTRA's train steps in this process, one config after "
    "another, instead of each config in a fresh process (as each torch peer runs).")

_BRACKET = flags.DEFINE_bool(
    "bracket", True, "Time each peer-matched config's ASTRA step before and after its torch peer "
    "and take the mean of the two (`bracketed`); false: before only.")

FIGURES: list[dict] = []


def emit(figure: str, value, unit: str, vs_torch=None, **detail) -> dict:
  """Records a figure and prints it as one JSON line."""
  row = {"figure": figure, "value": value, "unit": unit, "vs_torch": vs_torch, **detail}
  FIGURES.append(row)
  print(json.dumps(row), flush=True)
  return row


def median_time(fn, reps: int, warmup: int = 1) -> float:
  """Median wall seconds of `fn()` (which blocks until its work is done) after `warmup` calls."""
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


def cpu_seconds(who) -> float:
  """User + system CPU seconds of this process (RUSAGE_SELF) or its finished children."""
  usage = resource.getrusage(who)
  return usage.ru_utime + usage.ru_stime


def run_snippet(snippet: str, what: str, *args: str, env: dict | None = None) -> dict:
  """Runs `snippet` in a fresh Python process (repo root; `env`, default this environment) and
  returns the last JSON line it prints; raises naming `what` and the error's last lines if it
  fails."""
  proc = subprocess.run([sys.executable, "-c", snippet, *args],
                        capture_output=True, text=True, cwd=_REPO, check=False, env=env)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    raise RuntimeError(f"{what} failed: {proc.stderr.strip().splitlines()[-3:]}")
  return json.loads(lines[-1])


# ---------------------------------------------------------------- matmul peak


def matmul_peak(n: int = 4096, reps: int = 5, dtypes=("float32", "bfloat16"),
                quiet: bool = False) -> dict[str, float]:
  """GFLOP/s of matmuls per way of computing them, the fastest of two shapes; adds the MFU
  denominators (`peaks["float32"]`, `peaks["bfloat16"]`), measuring only the ways those of
  `dtypes` need.

  "bf16_f32acc": bf16 operands, float32 accumulation as the native dot
  (`preferred_element_type=float32`); "bf16_widened": the same product with the bf16 operands
  widened to float32 first (exact; what the model does without bf16 hardware, see
  `astra_jax.models.common`); "bf16_bf16out": a bf16-output dot. The bf16 peak is the fastest of
  the float32-accumulating ways, float32 itself included: widening makes the float32 rate
  reachable for bf16 operands (on CPUs without bf16 units the two widened samples differ only
  by noise, and the lower one would inflate the MFU).
  Shapes: n x n x n, and (n x n/4) x (n/4 x n) for float32 and the native bf16 dot. On a 2-core
  Zen 4 the native bf16 dot ran the second 20-40 % faster (330-384 GFLOP/s, as the seed model's
  own 2600 x 1280 x 5120 products, against 247-309 for 4096^3; float32 150-190 for either), so
  the n^3 rate alone understated the bf16 peak: a seed bf16 step read 97 % of it.
  """
  f32_acc = lambda x, y: lax.dot(x, y, preferred_element_type=jnp.float32)
  fns = {
      "float32": jax.jit(lambda x, y: x @ y),
      "bf16_f32acc": jax.jit(f32_acc),
      "bf16_widened": jax.jit(lambda x, y: x.astype(jnp.float32) @ y.astype(jnp.float32)),
      "bf16_bf16out": jax.jit(lambda x, y: x @ y),
  }
  ways = {"float32": ["float32"],
          "bfloat16": ["float32", "bf16_f32acc", "bf16_widened", "bf16_bf16out"]}
  names = list(dict.fromkeys(name for dtype in dtypes for name in ways[dtype]
                             if not (quiet and name == "bf16_bf16out")))  # Quiet: denominators.
  shapes = {(n, n): names, (n, n // 4): [w for w in names if w in ("float32", "bf16_f32acc")]}
  peaks = {}
  for (m, k), shape_names in shapes.items():
    a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (k, m), jnp.float32)
    operands = {jnp.float32: (a, b), jnp.bfloat16: (a.astype(jnp.bfloat16),
                                                     b.astype(jnp.bfloat16))}
    for name in shape_names:
      x, y = operands[jnp.float32 if name == "float32" else jnp.bfloat16]
      seconds = median_time(lambda: fns[name](x, y).block_until_ready(), reps)
      rate = 2 * m * k * m / seconds / 1e9
      peaks[name] = max(peaks.get(name, 0.0), rate)
      if not quiet:
        shape = f"{n}^2" if k == n else f"{m}x{k}x{m}"
        emit(f"matmul {shape} {name}", round(rate, 1), "GFLOP/s", seconds=round(seconds, 4))
  if "bf16_widened" in peaks:
    peaks["bfloat16"] = max(peaks["bf16_f32acc"], peaks["bf16_widened"], peaks["float32"])
  return peaks


# ---------------------------------------------------------------- FLOPs


def forward_flops(config, summary_only: bool = True) -> tuple[int, int]:
  """(forward matmul FLOPs of one example, those of the first layer), 2 FLOPs per MAC.

  Counts the patch CNN, projections, attention, MLPs and heads of `Astra`; elementwise work
  (norms, softmax, GELU, optimizer) is left out, as in the usual MFU convention. `summary_only`:
  the last block computes the summary token alone (as `Astra` does in training); False: every
  token, as the torch peer does.
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
  d, t, hidden = m.dim, patches + 1, m.mlp_ratio * m.dim

  def block(queries):  # `queries` tokens attend to all t and go through the MLP.
    return (2 * t * d * 2 * d + 2 * queries * d * d + 2 * 2 * queries * t * d +
            2 * queries * d * d + 2 * 2 * queries * d * hidden)

  encoder = (m.num_layers - 1) * block(t) + block(1 if summary_only else t)
  heads = (2 * d * m.decoder_hidden + 2 * m.decoder_hidden * (grid.NUM_PIXELS + 1) +
           2 * d * d + 2 * d * m.num_z_bins)
  return embed + encoder + heads, first


def train_flops(config, summary_only: bool = True) -> int:
  """Training FLOPs of one example: forward + backward (2x forward), less the first layer's
  input gradient (the images need none)."""
  fwd, first = forward_flops(config, summary_only)
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
      config.adam_mu_dtype = "float32"  # torch's Adam keeps both moments in float32.
  return config


def synthetic_batch(config, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  b = config.batch_size
  return {
      "image": rng.normal(size=(b, *train.image_shape(config))).astype(np.float16),
      "flux": (5 + rng.normal(size=(b, grid.NUM_PIXELS))).astype(np.float32),
      "weight": np.ones((b, grid.NUM_PIXELS), np.float32),
      "z": rng.uniform(0.02, 0.5, size=b).astype(np.float32),
      "has_z": np.ones(b, bool),
  }


# Untimed steps before the timed ones, as many for the peer: on this VM the second step still ran
# up to 65 % slower than later ones (small peer-matched float32: 5.4-6.9 s, then 4.2-4.9 s).
WARMUP_STEPS = 2


def time_train_step(config, steps: int) -> dict:
  """Median step seconds of the real train step, plus XLA's FLOP count of the compiled step."""
  mesh = sharding.create_mesh(jax.devices()[:1])
  model, tx = train.make_model(config), train.make_optimizer(config)
  state = train.init_state(config, model, tx, mesh)
  step = train.make_train_step(config, model, tx, mesh)
  batches = [sharding.to_global(synthetic_batch(config, s), mesh) for s in range(2)]
  rng = jax.random.key(config.seed, impl=config.rng_impl)
  t = time.perf_counter()
  compiled = step.lower(state, batches[0], rng).compile()
  compile_s = time.perf_counter() - t
  xla_flops = float((compiled.cost_analysis() or {}).get("flops", float("nan")))
  times = []
  for i in range(WARMUP_STEPS + steps):
    if i == WARMUP_STEPS:
      cpu0 = cpu_seconds(resource.RUSAGE_SELF)
    t = time.perf_counter()
    state, metrics = compiled(state, batches[i % 2], rng)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
  timed = times[WARMUP_STEPS:]
  cpu_share = (cpu_seconds(resource.RUSAGE_SELF) - cpu0) / (sum(timed) * cores())
  loss = float(metrics["loss"])
  del state
  return dict(step_s=statistics.median(timed), compile_s=compile_s, xla_flops=xla_flops,
              loss=loss, cpu_share=cpu_share, warmup_s=times[:WARMUP_STEPS])


# `time_train_step` of one config, in a process of its own (argv: variant, dtype, embedding, steps,
# then this benchmark's flags that `bench_config` reads).
_TRAIN_STEP_SNIPPET = """
import json, sys
from absl import flags
from experiments import benchmark
variant, dtype, embedding, steps = sys.argv[1:5]
flags.FLAGS(["benchmark", *sys.argv[5:]])
config = benchmark.bench_config(variant, dtype, embedding)
print(json.dumps(benchmark.time_train_step(config, int(steps))))
"""


def time_train_step_fresh(variant: str, dtype: str, embedding: str, steps: int) -> dict:
  """`time_train_step` of one config in a fresh process (`_TRAIN_STEP_SNIPPET`).

  Each torch peer is a fresh process; timed one after another in the benchmark's own process,
  ASTRA's steps ran on the heap the earlier configs had grown (kept by `hugepages.KEEP_MEMORY`):
  the small peer-matched bf16 step read 1.88 and 2.13 s at the end of two runs against 1.57-1.71 s
  in six fresh processes on the same Zen 4 that morning.
  """
  return run_snippet(_TRAIN_STEP_SNIPPET, f"train step {variant} {dtype} {embedding}", variant,
                     dtype, embedding, str(steps), f"--seed_batch={_SEED_BATCH.value}",
                     f"--rng_impl={_RNG_IMPL.value}")


def bracketed(before: dict, after: dict) -> dict:
  """One `time_train_step` result from two runs of a config, one before and one after its peer:
  the mean of their median step times (and CPU shares), both kept as `step_s_runs`.

  The ratio to the peer then cancels a drift of the machine's speed that is linear over the
  three runs. This shared machine's 4096^2 bf16 matmul rate read 216 GFLOP/s just before a seed
  step and 303 elsewhere in the same run; its torch seed float32 peer took 15.9-24.0 s a step in
  four runs of one morning.
  """
  runs = [before["step_s"], after["step_s"]]
  return {**before, "step_s": statistics.mean(runs), "step_s_runs": runs,
          "cpu_share": statistics.mean([before["cpu_share"], after["cpu_share"]]),
          "warmup_s": before["warmup_s"] + after["warmup_s"]}


def run_peer(config, dtype: str, steps: int, timeout: int) -> dict | str:
  """The torch peer's JSON line at the peer-matched settings of `config`, or why it was skipped.

  A run that takes longer than `timeout` seconds gives {"timed_out": True, "timeout_s": timeout}
  and no rate: its start-up and warmup steps (the first step allocates everything and builds the
  Adam moments) run slower than its timed steps, so the average over a cut-short run bounds
  nothing about those (a seed float32 peer that timed out at 90 s in other runs finished in
  another with 20.4 s steps, 1.12x ASTRA's, where the timeout had read ">= 1.24x").
  """
  if not _TORCH_PYTHON.value:
    return "skipped: no torch (pass --torch_python)"
  peer = _TORCH_PEER.value or next((p for p in _PEER_CANDIDATES if os.path.exists(p)), "")
  if not os.path.exists(peer):
    return "skipped: torch_seed_model.py not found (pass --torch_peer)"
  probe = subprocess.run([_TORCH_PYTHON.value, "-c", "import torch"], capture_output=True)
  if probe.returncode:
    return f"skipped: no torch in {_TORCH_PYTHON.value}"
  m, warmup = config.model, WARMUP_STEPS
  cmd = [_TORCH_PYTHON.value, peer, "--dim", str(m.dim), "--layers", str(m.num_layers),
         "--heads", str(m.num_heads), "--batch", str(config.batch_size), "--steps", str(steps),
         "--warmup", str(warmup), "--threads", str(cores())]
  cmd += ["--bf16"] if dtype == "bfloat16" else []
  cpu0, t = cpu_seconds(resource.RUSAGE_CHILDREN), time.perf_counter()
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"timed_out": True, "timeout_s": timeout}
  wall = time.perf_counter() - t
  cpu_share = (cpu_seconds(resource.RUSAGE_CHILDREN) - cpu0) / (wall * cores())
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not lines:
    return f"skipped: peer failed ({out.stderr.strip().splitlines()[-1:]})"
  return {**json.loads(lines[-1]), "cpu_share": cpu_share}


def step_counts(variant: str, quick: bool) -> tuple[int, int]:
  """(timed steps of ASTRA, timed steps of the peer) for a config variant.

  --quick times the small configs' steps (~0.5-6 s) 5 times, the peer's 3: with 2, one step
  slowed by the shared machine made the median (one run: small peer-matched float32 5.9 and
  3.6 s in warmup, then 6.2 s timed, 0.75x the peer against 1.16-1.77x in six other runs). The
  seed steps (~6-20 s) 2 times each, the peer's too: with 1 peer step a seed ratio rested on a
  single step of the peer's.
  """
  if _STEPS.value:
    return _STEPS.value, _STEPS.value
  if not quick:
    return 5, 5
  return (2, 2) if variant == "seed" else (5, 3)


def train_section(peaks: dict[str, float], timeout: int, quick: bool):
  """The train-step rows, emitted once the section's last step has run: their MFU divides by
  the highest matmul rate measured anywhere in the section (at the start, just before each step
  and once after the last). This shared machine's rate swings 10-25 % within minutes, in both
  directions; dividing by the rate measured up to a step only let a slow start inflate the MFU
  of the steps that followed (one run: a seed step at 98 % of the 126 GFLOP/s measured before
  it, 80 % of the 154 measured later in the same run)."""
  rows = []
  for variant in _CONFIGS.value:
    embeddings = _EMBEDDINGS.value or (["peer"] if quick and variant == "seed" else
                                       ["configured", "peer"])
    for dtype in _DTYPES.value:
      for embedding in embeddings:
        config = bench_config(variant, dtype, embedding)
        steps, peer_steps = step_counts(variant, quick)

        def adjacent_peak():  # The matmul rate just before a step, for the MFU denominator.
          rate = matmul_peak(reps=3, dtypes=(dtype,), quiet=True)[dtype] if peaks else None
          if rate:
            peaks[dtype] = max(peaks[dtype], rate)
          return rate

        def time_astra():
          return (time_train_step(config, steps) if _IN_PROCESS.value else
                  time_train_step_fresh(variant, dtype, embedding, steps))

        adjacent = adjacent_peak()
        timing = time_astra()
        adjacent_after = None
        batch = config.batch_size
        flops = train_flops(config)
        vs_torch = peer_samples = None
        timed_out = {}
        model = ("peer-matched conv1d" if embedding == "peer" else
                 config.model.patch_embedding)
        name = f"train_step {variant} {dtype} {model}"
        if embedding == "peer":
          peer = run_peer(config, dtype, peer_steps, timeout)
          if isinstance(peer, str):
            emit(f"torch_peer {variant} {dtype}", None, "samples/s", note=peer)
          elif peer.get("timed_out"):
            timed_out = {"peer_timed_out_s": peer["timeout_s"]}
            emit(f"torch_peer {variant} {dtype}", None, "samples/s",
                 note=f"timed out after {peer['timeout_s']} s, its start-up and "
                      f"{WARMUP_STEPS} warmup steps included: no rate (raise --torch_timeout)")
          else:
            if _BRACKET.value:
              adjacent_after = adjacent_peak()
              timing = bracketed(timing, time_astra())
            peer_samples = peer["samples_per_s"]
            peer_flops = train_flops(config, summary_only=False)
            detail = dict(batch=batch, gflop_per_s=round(peer_samples * peer_flops / 1e9, 1),
                          gflop_per_sample=round(peer_flops / 1e9, 2))
            detail.update(step_s=round(peer["step_s_median"], 3), torch=peer["torch"],
                          threads=peer["threads"], loss=round(peer["loss"], 4),
                          cpu_share=round(peer["cpu_share"], 2))
            emit(f"torch_peer {variant} {dtype}", round(peer_samples, 4), "samples/s", **detail)
        samples_s = batch / timing["step_s"]
        gflops_s = samples_s * flops / 1e9
        if peer_samples:
          vs_torch = round(samples_s / peer_samples, 3)
        runs = {}
        if "step_s_runs" in timing:
          runs = dict(step_s_runs=[round(t, 3) for t in timing["step_s_runs"]],
                      adjacent_peak_after_peer_gflop_s=(round(adjacent_after, 1)
                                                        if adjacent_after else None))
        xla = timing["xla_flops"] / batch
        rows.append((dtype, gflops_s, name, round(samples_s, 3), vs_torch, dict(
            batch=batch, step_s=round(timing["step_s"], 3), **runs,
            compile_s=round(timing["compile_s"], 1),
            warmup_s=[round(w, 1) for w in timing["warmup_s"]], gflop_per_s=round(gflops_s, 1),
            adjacent_peak_gflop_s=round(adjacent, 1) if adjacent else None,
            gflop_per_sample=round(flops / 1e9, 2), xla_gflop_per_sample=round(xla / 1e9, 2),
            xla_vs_analytic=round(xla / flops, 4), rng_impl=config.rng_impl,
            loss=round(timing["loss"], 4), cpu_share=round(timing["cpu_share"], 2), **timed_out)))
  if peaks:
    after = matmul_peak(reps=3, dtypes=tuple(_DTYPES.value), quiet=True)
    for dtype in _DTYPES.value:
      peaks[dtype] = max(peaks[dtype], after[dtype])
  for dtype, gflops_s, name, samples_s, vs_torch, detail in rows:
    peak = peaks.get(dtype)
    emit(name, samples_s, "samples/s", vs_torch, **detail,
         mfu=round(gflops_s / peak, 3) if peak else None,
         peak_gflop_s=round(peak, 1) if peak else None)


# ---------------------------------------------------------------- checkpoint


# The seed's TrainState saved by a process of its own, as training saves it
# (`train.checkpoint_managers`, asynchronous; `blocking_s` is what training waits, `seconds` lasts
# until the checkpoint is written, synced and renamed), then the params alone into `best/`. The
# process exits before the restores start, as a training run has before it is rerun.
_SAVE_SNIPPET = """
import json, os, sys, time
import jax, jax.numpy as jnp
import orbax.checkpoint as ocp
from astra_jax import sharding, train
from experiments.configs import baseline
workdir = sys.argv[1]
config = baseline.get_config("seed")
mesh = sharding.create_mesh(jax.devices()[:1])
model, tx = train.make_model(config), train.make_optimizer(config)
state = train.init_state(config, model, tx, mesh)
# A fresh state's Adam moments are zeros, which TensorStore does not write: noise makes the
# checkpoint as large as a trained state's.
leaves, treedef = jax.tree.flatten(state.opt_state)
keys = jax.random.split(jax.random.key(1), len(leaves))
leaves = [jax.random.normal(k, x.shape, x.dtype) * 1e-3 if jnp.issubdtype(x.dtype, jnp.floating)
          else x for k, x in zip(keys, leaves)]
state = jax.block_until_ready(state.replace(step=state.step + 1,
                                            opt_state=jax.tree.unflatten(treedef, leaves)))
del leaves
os.makedirs(workdir)
train.write_config(config, workdir)
latest, best = train.checkpoint_managers(workdir, config)
out = {}
for what, manager, item, metrics in [("state", latest, state, None),
                                     ("params", best, state.params, {"val_loss": 1.0})]:
  t = time.perf_counter()
  manager.save(1, args=ocp.args.StandardSave(item), metrics=metrics)
  blocking_s = time.perf_counter() - t
  manager.wait_until_finished()
  out[what] = {"seconds": time.perf_counter() - t, "blocking_s": blocking_s,
               "bytes": sum(x.nbytes for x in jax.tree.leaves(item))}
latest.close()
best.close()
print(json.dumps(out))
"""

# Restores a checkpoint in a fresh process, as a rerun of training (`train.restore_or_init`, the
# whole TrainState) or a notebook (`analysis.restore(best=True)`, the params) does; imports and
# config loading excluded.
_RESTORE_SNIPPET = """
import json, sys, time
import jax
from astra_jax import analysis, sharding, train
workdir, what = sys.argv[1], sys.argv[2]
config = analysis.load_config(workdir)
model, tx = train.make_model(config), train.make_optimizer(config)
mesh = sharding.create_mesh(jax.devices()[:1])
latest, _ = train.checkpoint_managers(workdir, config)
t = time.perf_counter()
if what == "state":
  restored = jax.block_until_ready(train.restore_or_init(latest, config, model, tx, mesh))
  assert int(restored.step) == 1
else:
  restored = jax.block_until_ready(analysis.restore(workdir, best=True)[2])
print(json.dumps({"seconds": time.perf_counter() - t}))
latest.close()
"""


def checkpoint_section(tmp: str):
  """Save + restore seconds of the seed model: its whole TrainState (what a rerun resumes from,
  `checkpoints/`) and its params alone (what `best/` holds and a notebook restores).

  Saved by one fresh process (`_SAVE_SNIPPET`), restored by another started after it exited
  (`_RESTORE_SNIPPET`), from the page cache: the sequence of a training run and its rerun. In
  this process (state built and saved here, restores in children) the TrainState took 6.0-7.6 s
  against 3.3-4.1 s so: on this VM a child restored up to 2x slower beside a process whose heap
  kept the pages it had freed.
  """
  workdir = os.path.join(tmp, "checkpoint")
  saves = run_snippet(_SAVE_SNIPPET, "checkpoint save", workdir)
  for what, label in [("state", "seed TrainState, checkpoints/"),
                      ("params", "seed model params, best/")]:
    restore_s = run_snippet(_RESTORE_SNIPPET, "restore", workdir, what)["seconds"]
    save = saves[what]
    emit(f"checkpoint save+restore ({label})", round(save["seconds"] + restore_s, 2), "s",
         save_s=round(save["seconds"], 2), save_blocking_s=round(save["blocking_s"], 2),
         restore_s=round(restore_s, 2), gbytes=round(save["bytes"] / 1e9, 2),
         note="saved and restored by fresh processes (training, then its rerun or a notebook), "
              "from the page cache")
  shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------- data


def mock_survey(tmp: str, num_galaxies: int) -> str:
  """The raw folder of a mock survey of `num_galaxies` (generated once per run)."""
  from astra_jax.data import mock  # pylint: disable=g-import-not-at-top
  raw = os.path.join(tmp, "raw")
  if not os.path.isdir(raw):
    t = time.perf_counter()
    mock.generate_survey(raw, num_galaxies, seed=0, num_workers=cores())
    print(f"# mock survey: {num_galaxies} galaxies in {time.perf_counter() - t:.1f} s", flush=True)
  return raw


# Times `prepare.prepare` in a fresh process whose __main__ is this snippet: spawned reader
# processes re-import the parent's main module, and this benchmark's imports jax and the models.
_PREPARE_SNIPPET = """
import json, resource, sys, time
from astra_jax.data import prepare
from astra_jax.data import astropixel
prepare.hide_gpus_from_tensorflow()
raw, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
cpu = lambda: sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF,
    resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))
if __name__ == "__main__":
  t, c = time.perf_counter(), cpu()
  summary = prepare.prepare(raw, out, image_size=288, num_workers=workers)
  print(json.dumps(dict(summary, seconds=time.perf_counter() - t, cpu_s=cpu() - c)))
"""


def time_prepare(raw: str, out: str, workers: int) -> dict:
  """prepare's summary plus `seconds` (wall) and `cpu_s` (with its workers), imports excluded.

  Without glibc's huge-page tunable, as prepare's command line runs (see astra_jax.hugepages).
  """
  return run_snippet(_PREPARE_SNIPPET, "prepare", raw, out, str(workers),
                     env=hugepages.environ_without_tunable())


def survey_subset(raw: str, num_galaxies: int) -> str:
  """A raw folder holding the first `num_galaxies` of `raw` (data.csv rows, linked folders)."""
  subset = f"{raw}-first{num_galaxies}"
  if not os.path.isdir(subset):
    os.makedirs(subset)
    catalog = os.path.join(raw, "data.csv")
    with open(catalog) as f:
      lines = f.readlines()  # The mock's: a header, then one line per galaxy.
    with open(os.path.join(subset, "data.csv"), "w") as f:
      f.writelines(lines[:1 + num_galaxies])
    for row in fits_io.read_catalog(catalog)[:num_galaxies]:
      name = f"Galaxy_{row.specobj_id}"
      os.symlink(os.path.join(raw, name), os.path.join(subset, name))
  return subset


def data_section(tmp: str, num_galaxies: int, quick: bool):
  """prepare galaxies/s (1 worker, and one worker per core); pipeline samples/s.

  prepare runs on the whole mock and on its first half: the end-to-end rate of the whole, and
  the steady rate (the second half's galaxies over the extra seconds they took), in which the
  fixed costs of a run (worker start-up, first-use imports, dataset metadata) cancel. Each run
  is repeated, half and whole alternating, and the fastest of each taken: the steady rate is a
  difference of a few seconds, and one slowed run of the half once read as a 40 % faster
  prepare.
  """
  from astra_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  raw = mock_survey(tmp, num_galaxies)
  half = num_galaxies // 2
  repeats = 2 if quick else 3
  dataset_dir = None  # The first whole mock prepared: the input pipeline's.
  first_half = survey_subset(raw, half)
  for workers in (1, cores()):
    halves, wholes = [], []
    for r in range(repeats):
      for runs, source, name in ((halves, first_half, "half"), (wholes, raw, "whole")):
        out = os.path.join(tmp, f"tfds-{name}-{workers}-{r}")
        runs.append(time_prepare(source, out, workers))
        if name == "whole" and dataset_dir is None:
          dataset_dir = runs[-1]["dataset_dir"]
        else:
          shutil.rmtree(out, ignore_errors=True)  # ~0.3 GB per whole run.
    small = min(halves, key=lambda run: run["seconds"])
    summary = min(wholes, key=lambda run: run["seconds"])
    seconds = summary["seconds"]
    extra_s = seconds - small["seconds"]
    steady = (num_galaxies - half) / extra_s / workers if extra_s > 0 else None
    emit(f"prepare {workers} worker(s), 288 px", round(steady, 2) if steady else None,
         "galaxies/s/core", galaxies=num_galaxies, written=sum(summary["written"].values()),
         rejected=summary["rejected"], seconds=round(seconds, 2),
         half_seconds=round(small["seconds"], 2),
         runs_seconds=[round(run["seconds"], 2) for run in wholes],
         runs_half_seconds=[round(run["seconds"], 2) for run in halves],
         end_to_end_per_core=round(num_galaxies / seconds / workers, 2),
         galaxies_per_s=round(num_galaxies / seconds, 2),
         galaxies_per_cpu_s=round(num_galaxies / summary["cpu_s"], 2),
         note=f"value: steady, galaxies {half + 1}-{num_galaxies} over the seconds they added "
              f"(fastest of {repeats} runs each)")
  batch = 32
  ds = pipeline.train_dataset(dataset_dir, global_batch=batch, seed=0, process_index=0,
                              process_count=1)
  iterator = pipeline.as_numpy(ds)
  for _ in range(5):  # tf.data warmup: threads, the first shuffle buffer fill.
    next(iterator)
  n = 30 if quick else 90
  t = time.perf_counter()
  for _ in range(n):
    example = next(iterator)
  seconds = time.perf_counter() - t
  rate = n * batch / seconds
  emit("input pipeline 288x288x5", round(rate / cores(), 1), "samples/s/core",
       samples_per_s=round(rate, 1), batch=batch, batches=n, cores=cores(),
       image_shape=list(example["image"].shape[1:]), image_dtype=str(example["image"].dtype),
       note="shuffle, parse, batch; augmentation runs in the train step")


# ---------------------------------------------------------------- predict


def predict_section(tmp: str, raw: str, num_galaxies: int, variant: str = "small"):
  """Image-only prediction (`predict.predict_folder`) of the mock's cutouts, galaxies/s/core.

  The model is `variant` with freshly initialised parameters, saved as a run's checkpoint (the
  rate does not depend on their values). Figures: the jitted forward pass alone (images in
  memory), reading + preprocessing alone (one process), and end to end with one reading worker
  per core: overall (start-up and compilation included) and steady (after the first batch).
  """
  from astra_jax import analysis  # pylint: disable=g-import-not-at-top
  from astra_jax import predict  # pylint: disable=g-import-not-at-top
  from astra_jax.data import examples  # pylint: disable=g-import-not-at-top
  config = baseline.get_config(variant)
  workdir = os.path.join(tmp, f"predict-{variant}")
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.create_mesh(jax.devices())
  model, tx = train.make_model(config), train.make_optimizer(config)
  train.write_config(config, workdir)
  latest, _ = train.checkpoint_managers(workdir, config)
  latest.save(0, args=ocp.args.StandardSave(train.init_state(config, model, tx, mesh)))
  latest.wait_until_finished()
  latest.close()
  batch = 32
  _, model, params = analysis.restore(workdir)
  images = np.random.default_rng(0).normal(size=(batch, *train.image_shape(config)))
  forward = lambda: analysis.predict(model, params, images.astype(np.float16), batch_size=batch)
  seconds = median_time(forward, reps=3)
  emit(f"predict forward {variant} {config.dtype}", round(batch / seconds / cores(), 1),
       "galaxies/s/core", batch=batch, batch_s=round(seconds, 3),
       image_shape=list(images.shape[1:]))
  data_config = examples.ExampleConfig(bands=tuple(config.bands.split(",")),
                                       image_size=config.image_size,
                                       stretch_beta=config.stretch_beta)
  jobs, _ = predict.find_galaxies(raw, data_config.bands)
  t = time.perf_counter()
  loaded = predict.load_task(jobs, data_config, "reject")
  seconds = time.perf_counter() - t
  emit("predict read+preprocess, 1 process", round(len(loaded["ids"]) / seconds, 1),
       "galaxies/s/core", galaxies=len(jobs), ms_per_galaxy=round(1e3 * seconds / len(jobs), 1),
       note="5 bands of 288x288 FITS, stretch, bin to the model size")
  summary = predict.predict_folder(workdir, raw, os.path.join(tmp, "predictions.fits"),
                                   batch_size=batch, num_workers=cores(), truth=None)
  assert summary["predicted"] == num_galaxies, summary
  steady = summary["steady_galaxies_per_s"]
  emit(f"predict end to end {variant}, {cores()} workers",
       round(steady / cores(), 1) if steady else None, "galaxies/s/core",
       galaxies=num_galaxies, batch=batch, steady_galaxies_per_s=steady,
       overall_galaxies_per_s=summary["galaxies_per_s"], startup_s=summary["startup_s"],
       seconds=summary["seconds"], note="steady: after the first batch; overall: start-up, "
       "restore and compilation included")


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
  isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
         if f" {f}" in flags_line]
  mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  malloc = f" + GLIBC_TUNABLES={tunables} (peer too)" if tunables else ""
  return (f"{model}, {cores()} cores ({', '.join(isa)}), {mem:.0f} GiB, transparent huge pages "
          f"{hugepages.thp_mode()}{malloc}; jax {jax.__version__}, {platform.python_version()}")


def table(rows) -> str:
  lines = ["| figure | value | unit | vs torch | details |", "|---|---:|---|---:|---|"]
  for r in rows:
    detail = ", ".join(f"{k}={v}" for k, v in r.items()
                       if k not in ("figure", "value", "unit", "vs_torch"))
    value = "—" if r["value"] is None else r["value"]
    vs = "" if r["vs_torch"] is None else f"{r['vs_torch']}x"
    lines.append(f"| {r['figure']} | {value} | {r['unit']} | {vs} | {detail} |")
  return "\n".join(lines)


def train_table(rows) -> str:
  """The train-step figures, one row per config, model and dtype, with the peer beside them."""
  peers = {r["figure"].split(" ", 1)[1]: r for r in rows if r["figure"].startswith("torch_peer")}
  lines = ["| config | model | dtype | batch | s/step | samples/s | GFLOP/s | MFU | "
           "torch samples/s | vs torch |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    if not r["figure"].startswith("train_step"):
      continue
    _, variant, dtype, model = r["figure"].split(" ", 3)
    peer = peers.get(f"{variant} {dtype}") if model.startswith("peer") else None
    peer_rate = "" if peer is None else (
        f"timed out ({r['peer_timed_out_s']} s)" if r.get("peer_timed_out_s") else
        "—" if peer["value"] is None else f"{peer['value']}")
    vs = "" if r["vs_torch"] is None else f"{r['vs_torch']}x"
    mfu = "" if r.get("mfu") is None else f"{r['mfu']:.0%}"
    lines.append(f"| {variant} | {model} | {dtype} | {r['batch']} | {r['step_s']} | {r['value']} | "
                 f"{r['gflop_per_s']} | {mfu} | {peer_rate} | {vs} |")
  return "\n".join(lines)


def goals() -> list[str]:
  """Each goal with the measured figure it is judged by."""
  out = []
  for r in FIGURES:
    if r["figure"].startswith("train_step") and r["vs_torch"] is not None:
      out.append(f"{r['figure']}: {r['vs_torch']}x torch (goal >= 1.2x): "
                 f"{'met' if r['vs_torch'] >= 1.2 else 'NOT met'}")
    if r["figure"].startswith("train_step") and r.get("peer_timed_out_s"):
      out.append(f"{r['figure']}: the torch peer timed out after {r['peer_timed_out_s']} s "
                 "(goal >= 1.2x): undetermined")
    if r["figure"].startswith("train_step seed bfloat16") and r.get("mfu") is not None:
      out.append(f"{r['figure']}: {r['mfu']:.1%} of the bf16 matmul peak (the highest rate "
                 f"measured in the run's train section, {r['peak_gflop_s']:.0f} GFLOP/s) "
                 f"(goal >= 80%): {'met' if r['mfu'] >= 0.8 else 'NOT met'}")
    if r["figure"].startswith("input pipeline"):
      out.append(f"input pipeline: {r['value']} samples/s/core (goal >= 400): "
                 f"{'met' if r['value'] >= 400 else 'NOT met'}")
    if r["figure"].startswith("prepare") and r["value"] is not None:
      out.append(f"{r['figure']}: {r['value']} galaxies/s/core steady, "
                 f"{r['end_to_end_per_core']} end to end for {r['galaxies']} (goal >= 50): "
                 f"{'met' if r['value'] >= 50 else 'NOT met'} (steady)")
    if r["figure"].startswith("predict end to end") and r["value"] is not None:
      out.append(f"{r['figure']}: {r['value']} galaxies/s/core (goal >= 50): "
                 f"{'met' if r['value'] >= 50 else 'NOT met'}")
    if r["figure"].startswith("checkpoint"):
      out.append(f"{r['figure']}: {r['value']} s (goal < 5 s): "
                 f"{'met' if r['value'] < 5 else 'NOT met'}")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quick = _QUICK.value
  sections = set(_SECTIONS.value)
  print(f"# {machine()}", flush=True)
  command = ["python", "-m", "experiments.benchmark"] + sys.argv[1:]
  print(f"# command: {' '.join(command)}", flush=True)
  tmp = tempfile.mkdtemp(prefix="astra-bench-", dir=_TMP_DIR.value or None)
  peaks = {}
  galaxies = _GALAXIES.value
  try:
    if "matmul" in sections:
      peaks = matmul_peak(reps=3 if quick else 5)
    if "train" in sections:
      timeout = _TORCH_TIMEOUT.value or (150 if quick else 600)
      train_section(peaks, timeout, quick)
    if "checkpoint" in sections:
      checkpoint_section(tmp)
    if "data" in sections:
      data_section(tmp, galaxies, quick)
    if "predict" in sections:
      predict_section(tmp, mock_survey(tmp, galaxies), galaxies)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
  emit("peak RSS (this process)", round(self_rss, 2), "GiB",
       children_gib=round(child_rss, 2),
       note="children: the largest train-step process, torch peer or worker")
  print(f"\n## Benchmark ({machine()})\n")
  if any(r["figure"].startswith("train_step") for r in FIGURES):
    print(train_table(FIGURES) + "\n")
  print(table(FIGURES))
  print("\n## Goals\n")
  for line in goals():
    print(f"- {line}")


if __name__ == "__main__":
  app.run(main)
