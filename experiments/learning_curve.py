r"""Learning curve: ASTRA and every baseline against the number of training galaxies.

  python -m experiments.learning_curve --workdir=runs/learning_curve \
      [--sizes=2000,8000,16000] [--epochs=15] [--out_dir=docs] \
      [--config=experiments/configs/baseline.py:small] [--config.batch_size=32]

For each mock-survey size N in --sizes, in `WORKDIR/nN/`:
  1. generate  `mock.generate_survey(raw, N, config.mock_seed)` into raw/; generated.json after.
  2. prepare   `datasets.ensure_dataset` (the training job's own path) into tfds/ with the
               config's bands, image_size and softening; prepared.json after, then raw/ is
               deleted (16k raw galaxies take ~28 GB).
  3. train     `train.train_and_evaluate(config, WORKDIR/nN)` for `ceil(epochs x train galaxies
               / batch_size)` steps: the same number of epochs at every N (the default run:
               750 steps x 32 / ~1,590 training galaxies = 15). It scores ASTRA and every
               baseline (evaluate.compare_with_baselines: mean spectrum, colour kNN, photo
               trees, photo MLP), fitted on that point's training split, on its test split
               (results.json / results.md in the point's folder).
  4. record    one JSON line per finished point in WORKDIR/learning_curve.jsonl: N, split sizes,
               wall seconds of each stage, the machine and the test scalars of every predictor.
Then OUT_DIR/learning_curve.png (sigma_MAD, eta and spectrum R^2 against training galaxies) and
OUT_DIR/learning_curve.md (also printed) are written from every line of the jsonl.

Rerunning the command skips finished points (a line in the jsonl) and resumes an interrupted
one: generation is skipped when generated.json is there (or the point is already prepared),
preparation when prepared.json names a dataset whose dataset_info.json and manifest are there,
and training resumes from the point's latest checkpoint. A stage's wall time is kept in
timings.json as it finishes, so a resumed point still reports the stages it did not redo; a
training that was interrupted reports the time of its last attempt, from `resumed_from_step`.

The points share `config.mock_seed`. Galaxy i depends only on (seed, i), so galaxy i of an
N-survey has the same redshift, SED, shape, image pixels and spectrum as galaxy i of a larger
one; but plates, fibers and sky positions are drawn over the whole survey, so its specobj_id
differs, and the split is a hash of specobj_id: the training sets are not nested, and each
point is scored on its own test split (~10% of N).
"""

import copy
import datetime
import json
import math
import os
import platform
import shutil
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from astra_jax import evaluate
from astra_jax import train
from astra_jax.data import datasets
from astra_jax.data import mock

_CONFIG_PATH = os.path.join(os.path.dirname(__file__), "configs", "baseline.py")


def define_flags():
  """The command line's flags: defined only when this module runs as the program, so that tests
  can import it beside other entry points that define `--workdir` too."""
  flags.DEFINE_string("workdir", "runs/learning_curve",
                      "One folder per point (nN/) and learning_curve.jsonl.")
  flags.DEFINE_list("sizes", ["2000", "8000", "16000"], "Mock survey sizes N.")
  flags.DEFINE_float("epochs", 15.0, "Passes over each point's training split.")
  flags.DEFINE_string("out_dir", "docs", "Where learning_curve.png and .md go.")
  config_flags.DEFINE_config_file("config", f"{_CONFIG_PATH}:small", "Training configuration.",
                                  lock_config=True)


JSONL = "learning_curve.jsonl"
#: (scalar key, label) of the figure's panels and the table's cells.
METRICS = (("z_median_sigma_mad", r"redshift $\sigma_{\rm MAD}$"),
           ("z_median_outlier_fraction", r"outlier fraction $\eta$ (|dz| > 0.05)"),
           ("spectrum_r2", r"spectrum $R^2$"))


def learning_curve(config, workdir: str, sizes, epochs: float, out_dir: str) -> list[dict]:
  """Runs (or resumes) every point of `sizes`, then writes the figure and the table.

  Returns the records of the jsonl (every finished point, in N order).
  """
  if jax.process_count() > 1:  # Each host would generate and prepare; only one scores baselines.
    raise ValueError("the learning curve runs on one host")
  os.makedirs(workdir, exist_ok=True)
  done = {r["num_galaxies"] for r in read_records(workdir)}
  for n in sizes:
    if n in done:
      logging.info("N=%d: finished (a line in %s); skipped", n, JSONL)
      continue
    record = run_point(config, workdir, n, epochs)
    with open(os.path.join(workdir, JSONL), "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
  records = sorted(read_records(workdir), key=lambda r: r["num_galaxies"])
  os.makedirs(out_dir, exist_ok=True)
  plot(records, os.path.join(out_dir, "learning_curve.png"))
  table = markdown_table(records)
  with open(os.path.join(out_dir, "learning_curve.md"), "w") as f:
    f.write(f"# Learning curve: ASTRA and the baselines against training-set size\n\n{table}\n")
  print(table)
  return records


def read_records(workdir: str) -> list[dict]:
  """The finished points of `workdir`'s jsonl ([] when there is none)."""
  path = os.path.join(workdir, JSONL)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_point(config, workdir: str, n: int, epochs: float) -> dict:
  """Generates, prepares, trains and evaluates one point of N galaxies; returns its record."""
  point = os.path.join(workdir, f"n{n}")
  os.makedirs(point, exist_ok=True)
  timings = _read_json(os.path.join(point, "timings.json")) or {}
  prepared = prepared_summary(point)
  if prepared is None:
    if not generated(point, n, config.mock_seed):
      timings["generate_s"] = _timed(generate, point, n, config.mock_seed)
      _write_json(os.path.join(point, "timings.json"), timings)
    t = time.perf_counter()
    prepared = prepare(config, point)
    timings["prepare_s"] = time.perf_counter() - t
    _write_json(os.path.join(point, "timings.json"), timings)
  # After prepared.json, so that an interruption here never loses the only copy of the data.
  shutil.rmtree(os.path.join(point, "raw"), ignore_errors=True)

  written = prepared["written"]
  cfg = point_config(config, prepared["dataset_dir"], n, written["train"], epochs)
  resumed_from = latest_checkpoint_step(point)
  t = time.perf_counter()
  results = train.train_and_evaluate(cfg, point)
  timings["train_evaluate_s"] = time.perf_counter() - t
  _write_json(os.path.join(point, "timings.json"), timings)
  if "baselines" not in results:
    raise ValueError(f"N={n}: {prepared['dataset_dir']} has no test split ({written}); "
                     "a point needs one (use more galaxies or another mock_seed)")
  seconds = {k[:-2]: timings.get(k) for k in ("generate_s", "prepare_s", "train_evaluate_s")}
  seconds["total"] = sum(v for v in seconds.values() if v is not None)
  return {
      "num_galaxies": n, "num_train": written["train"], "num_validation": written["validation"],
      "num_test": written["test"], "num_rejected": prepared["rejected"],
      "mock_seed": config.mock_seed, "variant": config.variant, "image_size": config.image_size,
      "epochs": epochs, "batch_size": cfg.batch_size, "num_train_steps": cfg.num_train_steps,
      "resumed_from_step": resumed_from, "seconds": seconds, "machine": machine(),
      "results": results["baselines"], "dataset_dir": prepared["dataset_dir"],
      "workdir": point, "finished": datetime.datetime.now().isoformat(timespec="seconds"),
  }


def generated(point: str, n: int, seed: int) -> bool:
  """Whether raw/ holds the whole survey: its data.csv and the marker written after it."""
  marker = _read_json(os.path.join(point, "generated.json"))
  return (marker == {"num_galaxies": n, "mock_seed": seed}
          and os.path.exists(os.path.join(point, "raw", "data.csv")))


def generate(point: str, n: int, seed: int):
  """The mock survey of `n` galaxies into point/raw, from scratch; then generated.json."""
  marker, raw = os.path.join(point, "generated.json"), os.path.join(point, "raw")
  if os.path.exists(marker):
    os.remove(marker)
  shutil.rmtree(raw, ignore_errors=True)  # A survey cut short: its files are not trusted.
  logging.info("N=%d: generating the mock survey (seed %d) in %s", n, seed, raw)
  mock.generate_survey(raw, n, seed, progress=n >= 50)
  _write_json(marker, {"num_galaxies": n, "mock_seed": seed})


def prepared_summary(point: str) -> dict | None:
  """prepare's summary of the point's dataset when the preparation finished, else None."""
  summary = _read_json(os.path.join(point, "prepared.json"))
  if summary is None:
    return None
  dataset_dir = summary["dataset_dir"]
  if not all(os.path.exists(os.path.join(dataset_dir, name))
             for name in ("dataset_info.json", "manifest.jsonl")):
    return None
  return summary


def prepare(config, point: str) -> dict:
  """Prepares point/raw into point/tfds as the training job would; then prepared.json."""
  from astra_jax.data import prepare as prepare_lib  # pylint: disable=g-import-not-at-top (TF)
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.raw_dir, cfg.data_dir = os.path.join(point, "raw"), os.path.join(point, "tfds")
  dataset_dir = datasets.ensure_dataset(cfg, point)
  summary = prepare_lib.summary(dataset_dir)
  _write_json(os.path.join(point, "prepared.json"), summary)
  return summary


def point_config(config, dataset_dir: str, n: int, num_train: int, epochs: float):
  """`config` on the point's dataset, trained `epochs` passes over its `num_train` galaxies."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.data_dir, cfg.raw_dir = dataset_dir, ""
    cfg.num_galaxies = n
    cfg.num_train_steps = max(1, math.ceil(epochs * num_train / cfg.batch_size))
  return cfg


def latest_checkpoint_step(point: str) -> int:
  """The step training resumes from: the newest checkpoint in point/checkpoints (0: none)."""
  folder = os.path.join(point, "checkpoints")
  steps = [int(s) for s in os.listdir(folder) if s.isdigit()] if os.path.isdir(folder) else []
  return max(steps, default=0)


def machine() -> dict:
  """What ran the point: OS, processor, accelerator kind and core count."""
  device = jax.devices()[0]
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "backend": device.platform, "device_kind": device.device_kind,
          "device_count": jax.device_count(), "cores": os.cpu_count() or 1}


def machine_label(m: dict) -> str:
  """e.g. 'x86_64 CPU, 2 cores' or 'NVIDIA H100 80GB HBM3 x1, 16 cores'."""
  if m["backend"] == "cpu":
    return f"{m['processor']} CPU, {m['cores']} cores"
  return f"{m['device_kind']} x{m['device_count']}, {m['cores']} cores"


def predictors(records: list[dict]) -> list[str]:
  """The predictors of any record, in evaluate.PREDICTORS order (then any other)."""
  seen = {p for r in records for p in r["results"]}
  return ([p for p in evaluate.PREDICTORS if p in seen]
          + sorted(seen - set(evaluate.PREDICTORS)))


def markdown_table(records: list[dict]) -> str:
  """One row per point: each predictor's sigma_MAD / eta / R^2 on the test split, wall time
  (generate + prepare + train and evaluate) and machine."""
  names = predictors(records)
  lines = ["Each predictor's cell: redshift sigma_MAD / outlier fraction eta (|dz| > 0.05) / "
           "spectrum R^2, on the point's test split.", "",
           "| N | train / val / test | " + " | ".join(names) + " | steps | wall time | machine |",
           "|---:|---|" + "---|" * len(names) + "---:|---:|---|"]
  for r in records:
    cells = []
    for name in names:
      scalars = r["results"].get(name, {})
      cells.append(" / ".join(_fmt(scalars.get(key)) for key, _ in METRICS))
    lines.append(f"| {r['num_galaxies']} | {r['num_train']} / {r['num_validation']} / "
                 f"{r['num_test']} | " + " | ".join(cells) + f" | {r['num_train_steps']} | "
                 f"{_duration(r['seconds']['total'])} | {machine_label(r['machine'])} |")
  return "\n".join(lines)


def plot(records: list[dict], path: str) -> str:
  """sigma_MAD, eta and spectrum R^2 of every predictor against training galaxies (log x)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # Files only: no display.
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.8))
  x = [r["num_train"] for r in records]
  for name in predictors(records):
    style = dict(lw=2.2, color="black") if name == "ASTRA" else dict(lw=1.2)
    for ax, (key, _) in zip(axes, METRICS):
      y = [r["results"].get(name, {}).get(key, float("nan")) for r in records]
      ax.plot(x, y, marker="o", ms=4, label=name, **style)
  for ax, (_, label) in zip(axes, METRICS):
    ax.set(xscale="log", xlabel="training galaxies", title=label)
    # Ticks at the points, as plain numbers (log ticks within a decade read 1.6x10^3).
    ax.set_xticks(x, [str(v) for v in x])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def _fmt(value) -> str:
  return "–" if value is None or not math.isfinite(value) else f"{value:.3g}"


def _duration(seconds: float) -> str:
  return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _timed(fn, *args) -> float:
  t = time.perf_counter()
  fn(*args)
  return time.perf_counter() - t


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value):
  """Written whole or not at all (a rename), since markers and timings decide what reruns."""
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  learning_curve(f.config, f.workdir, [int(n) for n in f.sizes], f.epochs, f.out_dir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
