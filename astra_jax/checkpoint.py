"""Checkpoints of a training run: Orbax `CheckpointManager`s with the standard handler.

A workdir holds `checkpoints/<step>` (the whole train state, the latest `max_to_keep` steps) and
`best/<step>` (the parameters of the lowest validation loss). Both are written and read with
`ocp.args.StandardSave` / `StandardRestore` in Orbax's default format.

Before restoring, the stored tree (Orbax's metadata) is compared with the target's, so that a
checkpoint of another model or optimiser is refused with every differing array named
(`CheckpointMismatchError`) rather than with Orbax's error for the first one it reaches. A
checkpoint Orbax cannot read (an array file cut short, metadata that does not parse) is refused
with `CheckpointDamagedError`, naming the step folder and what Orbax found wrong.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from astra_jax import paths


class CheckpointMismatchError(ValueError):
  """A checkpoint whose arrays (names or shapes) are not those of the state being restored: it
  was saved by another model or optimiser (another config). Dtypes may differ (Orbax casts)."""

  def __init__(self, directory: str, differences: list[str], advice: str = ""):
    self.directory = directory
    self.differences = differences
    super().__init__(f"{directory}: the checkpoint does not fit the state being restored "
                     f"({len(differences)} difference(s): {_first_few(differences)}); it was "
                     "saved with another model or optimiser config"
                     + (f". {advice}" if advice else ""))


class CheckpointDamagedError(ValueError):
  """A checkpoint that Orbax cannot read: an array file cut short or missing, metadata that does
  not parse (a copy cut short, a full or failing disk). `problems` says what Orbax found wrong,
  with the file where its error names one."""

  def __init__(self, directory: str, problems: list[str], advice: str = ""):
    self.directory = directory
    self.problems = problems
    super().__init__(f"{directory}: the checkpoint is damaged and cannot be restored "
                     f"({_first_few(problems)})" + (f". {advice}" if advice else ""))


def _first_few(items: list[str], n: int = 5) -> str:
  """The first `n` of `items` joined by "; ", and how many more there are."""
  more = f"; and {len(items) - n} more" if len(items) > n else ""
  return "; ".join(items[:n]) + more


def checkpoint_managers(workdir: str, config) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
  """(latest, best): the latest `config.max_to_keep` train states in `workdir/checkpoints`, and
  in `workdir/best` the params of the lowest `val_loss` metric. `workdir` may be a URL
  (gs://bucket/run): Orbax writes through epath and TensorStore."""
  # Each manager synchronises processes with its own barrier names: the two finalise their async
  # saves in concurrent threads, and a shared name fails ("barrier ... is already ongoing").
  multiprocessing = lambda name: ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)
  root = paths.absolute(workdir)
  # The handler is given up front (not inferred at the first save) so that a manager that has
  # saved nothing yet can read a checkpoint's metadata.
  latest = ocp.CheckpointManager(
      paths.join(root, "checkpoints"), item_handlers=ocp.StandardCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.max_to_keep, create=True,
                                           multiprocessing_options=multiprocessing("latest")))
  best = ocp.CheckpointManager(
      paths.join(root, "best"), item_handlers=ocp.StandardCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["val_loss"],
                                           best_mode="min", create=True,
                                           multiprocessing_options=multiprocessing("best")))
  return latest, best


def read_only_manager(directory: str, best: bool = False) -> ocp.CheckpointManager:
  """A manager of `directory` that never creates, saves or deletes anything; with `best`, its
  `best_step()` ranks steps as training's best manager does."""
  options = ocp.CheckpointManagerOptions(
      read_only=True, create=False, save_interval_steps=0, max_to_keep=None,
      best_fn=(lambda m: m["val_loss"]) if best else None, best_mode="min")
  return ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler(),
                               options=options)


def step_folder(manager: ocp.CheckpointManager, step: int) -> str:
  """The folder of `step`'s checkpoint (Orbax's default step names: the number)."""
  return paths.join(os.fspath(manager.directory), str(step))


def restore(manager: ocp.CheckpointManager, step: int, target) -> Any:
  """`target` (a pytree of `jax.ShapeDtypeStruct` with shardings, or of numpy arrays) read from
  `manager`'s checkpoint at `step`; leaves come back as the target's dtype and sharding.

  Raises `CheckpointMismatchError` when the stored arrays' names or shapes are not the target's,
  and `CheckpointDamagedError` when Orbax cannot read the metadata or an array.
  """
  folder = step_folder(manager, step)
  try:
    stored = manager.metadata(step).item_metadata
  except ValueError as e:  # json.JSONDecodeError (names no file), TensorStore's DATA_LOSS.
    raise CheckpointDamagedError(folder, [f"unreadable metadata: {_orbax_error(e)}"]) from e
  if stored is None:
    raise CheckpointDamagedError(folder, ["Orbax found no metadata of the saved tree"])
  differences = checkpoint_differences(stored, target)
  if differences:
    raise CheckpointMismatchError(folder, differences)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(target))
  except Exception as e:  # pylint: disable=broad-except
    # Orbax raises a bare Exception for an array TensorStore cannot read; its cause names the
    # array's file.
    raise CheckpointDamagedError(folder, [_orbax_error(e)]) from e


def _orbax_error(error: BaseException) -> str:
  """The first line of the innermost error in `error`'s chain (TensorStore's, naming the file)."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines() or [type(error).__name__]
  return lines[0]


def incomplete_checkpoints(directory) -> list[str]:
  """Checkpoint folders that a killed save left behind (Orbax renames a folder when complete)."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  return sorted(p.name for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)


def restore_or_init(manager: ocp.CheckpointManager, target, init: Callable[[], Any]) -> Any:
  """The latest complete checkpoint in `manager` read as `target` (see `restore`), or `init()`
  when there is none.

  Raises `CheckpointMismatchError` naming the workdir's config.json for a checkpoint that another
  model or optimiser config saved, and `CheckpointDamagedError` naming the step to resume from
  instead for one that cannot be read.
  """
  step = manager.latest_step()
  incomplete = incomplete_checkpoints(manager.directory)
  if incomplete:
    logging.warning("Ignoring incomplete checkpoint(s) %s in %s (a save was interrupted); %s",
                    ", ".join(incomplete), manager.directory,
                    f"resuming from step {step}" if step is not None else "starting afresh")
  if step is None:
    return init()
  logging.info("Resuming from checkpoint at step %d in %s", step, manager.directory)
  try:
    return restore(manager, step, target)
  except CheckpointMismatchError as e:
    workdir = os.fspath(epath.Path(manager.directory).parent)
    raise CheckpointMismatchError(e.directory, e.differences, advice=(
        f"To resume {workdir}, rerun with the config in {paths.join(workdir, 'config.json')} "
        "(settings that leave the model and optimiser state as they are, such as "
        "num_train_steps, may change), or start a new workdir")) from None
  except CheckpointDamagedError as e:
    # Not done silently: a damaged checkpoint may mean a failing disk, and resuming from an
    # earlier step repeats the steps since.
    earlier = [s for s in manager.all_steps() if s < step]
    then = f"resume from step {max(earlier)}" if earlier else "start afresh"
    raise CheckpointDamagedError(e.directory, e.problems, advice=(
        f"Move {e.directory} out of {manager.directory} to {then}")) from e


def checkpoint_differences(stored, target) -> list[str]:
  """How the arrays of a checkpoint (`stored`: Orbax's metadata of its tree) differ from
  `target`'s by name and shape: "NAME: stored SHAPE, expected SHAPE", "NAME: missing from the
  checkpoint", "NAME: not expected"; [] when they agree. Names are Orbax's, dotted
  ("params.decoder.hidden.bias")."""
  leaves, treedef = jax.tree.flatten(target)
  names = treedef.flatten_up_to(ocp.tree.get_param_names(target, include_empty_nodes=False))
  expected = {name: tuple(np.shape(x)) for name, x in zip(names, leaves)}
  found = {m.name: tuple(m.shape) for m in jax.tree.leaves(stored)
           if getattr(m, "shape", None) is not None}
  return ([f"{n}: stored {found[n]}, expected {expected[n]}"
           for n in expected if n in found and found[n] != expected[n]]
          + [f"{n}: missing from the checkpoint" for n in expected if n not in found]
          + [f"{n}: not expected" for n in found if n not in expected])
