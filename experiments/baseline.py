r"""Train ASTRA: `python -m experiments.baseline [--workdir runs/baseline] [--config ...]`.

  python -m experiments.baseline --workdir=runs/baseline \
      --config=experiments/configs/baseline.py:small --config.batch_size=32

Rerunning the same command resumes from the workdir's latest checkpoint.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from astra_jax import distributed
from astra_jax import evaluate
from astra_jax import train

_CONFIG_PATH = os.path.join(os.path.dirname(__file__), "configs", "baseline.py")
_WORKDIR = flags.DEFINE_string("workdir", "runs/baseline", "Checkpoints, logs and results.")
config_flags.DEFINE_config_file("config", _CONFIG_PATH, "Training configuration.",
                                lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  distributed.initialize()
  config = flags.FLAGS.config
  logging.info("Config variant %r on %d %s device(s), %d process(es)", config.variant,
               jax.device_count(), jax.default_backend(), jax.process_count())
  results = train.train_and_evaluate(config, _WORKDIR.value)
  if jax.process_index() == 0:
    print(evaluate.format_results(results))


if __name__ == "__main__":
  app.run(main)
