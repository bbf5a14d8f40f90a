"""Transparent huge pages for the host's large arrays, kept between steps: the command-line entry
points re-execute themselves once with glibc's `glibc.malloc.hugetlb=1` tunable and the
`KEEP_MEMORY` ones (Linux with glibc >= 2.35).

XLA:CPU allocates every large buffer of a step (activations of hundreds of MB) afresh, and glibc
serves such sizes with mmap: the kernel then faults in and zeroes each 4 KiB page, every step. With
the tunable glibc asks for transparent huge pages (madvise(MADV_HUGEPAGE)), which a kernel whose
THP mode is "madvise" (Debian's and Ubuntu's default) then backs with 2 MiB pages: 512x fewer
faults and TLB misses. Measured on a 2-core AMD EPYC (THP "madvise"): the peer-matched patch
embedding's forward + backward pass at batch 32 took 6.0 s with 4 KiB pages, 3.5 s with huge
pages; the torch peer's step, 8.9 and 5.3 s; reading and preprocessing a galaxy, 18-22 and
12-17 ms. Nothing changes where THP is "always" (already huge) or "never" (unavailable), and no
results change. Set ASTRA_HUGEPAGES=0 to keep a process as it was started (e.g. in a debugger);
in a notebook, start Jupyter with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 for the same effect.

Data preparation runs without the tunable: `astra_jax.data.prepare` does not re-execute, and
`spawn_context` keeps it from the reader processes that a huge-page process spawns (prepare's and
predict's). Those processes allocate and free a galaxy's few MB for each galaxy, and there the
tunable cost more than the faults it saved: in a profile of one-worker preparation, the
`np.empty` of each galaxy's stretched image (1.7 MB) took 1.2 ms with it (malloc touching a
fresh 2 MiB page) and 0.02 ms without. Measured on 2026-12-02 (alternating fresh processes,
`prepare.prepare` of mock galaxies): two workers, 768 galaxies, 9.1-10.8 s with the tunable and
8.6-9.5 s without (each of 4 pairs faster without); one worker, 384 galaxies, 6.2-7.9 and
5.7-7.1 s (6 of 7 pairs). (The 18-22 against 12-17 ms above predate the readers keeping their
freed memory, `examples.keep_freed_memory`.)

Keeping freed memory (`KEEP_MEMORY`: one malloc arena, never mmap, never trim). With huge pages
alone, every step of XLA:CPU still mmaps its buffers afresh and unmaps them at the end: the
small peer-matched bf16 step faulted in 3,700 huge pages (7.4 GB) each time, and on the 2-core
Firecracker VM of these figures that took 0.25 s of kernel time in one step and 1.1-1.8 s in the
next (steps alternated 1.7 and 2.7 s; the guest hands freed memory back to the host, which must
then supply it again). With every buffer carved from one heap that is never trimmed, steps after
the heap has grown to fit them fault nothing: 1.63 s each (8 steps). Measured on 2026-12-02 with
the step in fresh processes: each of the three was needed (without `arena_max=1` XLA's threads
allocate in arenas of their own, which glibc trims; without `mmap_max=0` large blocks are still
mmapped; with the default trim threshold, 240 faults a step remained). The cost is memory: the
heap keeps its high-water mark plus fragmentation (small peer-matched step, RSS 3.4 GB at the
first step and 8.2 GB from the fifth on; seed-size bf16 step, 4.9 and 9.3 GB), and the first few
steps, which grow it, are the slower for it.

`small_pages()` turns huge pages off for a block that touches much memory once: on the
Firecracker VM these figures come from, faulting in fresh 2 MiB pages was ~2x slower than 4 KiB
ones (restoring the seed TrainState: 3.6-4.7 s with them, 2.0-2.6 s without).
"""

import contextlib
import ctypes
import multiprocessing.context
import os
import platform
import sys
import threading

TUNABLE = "glibc.malloc.hugetlb=1"
KEEP_MEMORY = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
               f"glibc.malloc.trim_threshold={1 << 40}")
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
# Set in the re-executed process (and inherited by its children): never re-execute twice.
_DONE = "ASTRA_HUGEPAGES"


def thp_mode() -> str | None:
  """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None if unknown."""
  try:
    with open(_THP_MODE) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def _glibc_has_tunable() -> bool:
  libc, version = platform.libc_ver()
  try:
    return libc == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 35)
  except ValueError:
    return False


def wanted() -> bool:
  """Whether re-executing with the tunable would change anything for this process."""
  if os.environ.get(_DONE) is not None or TUNABLE.split("=")[0] in os.environ.get(
      "GLIBC_TUNABLES", ""):
    return False
  return sys.platform.startswith("linux") and thp_mode() == "madvise" and _glibc_has_tunable()


def reexec_with_huge_pages():
  """Replaces this process (same pid, arguments and environment) by one with the tunable and
  `KEEP_MEMORY` set (those of `KEEP_MEMORY` that GLIBC_TUNABLES names already keep its value).

  Call first thing in a `__main__` block, before importing jax or TensorFlow: the restart then
  costs only the interpreter's start. Returns without doing anything when `wanted()` is False.
  """
  if not wanted():
    return
  tunables = _tunables(os.environ.get("GLIBC_TUNABLES"))
  named = {t.split("=")[0] for t in tunables}
  tunables += [t for t in KEEP_MEMORY if t.split("=")[0] not in named] + [TUNABLE]
  env = dict(os.environ, GLIBC_TUNABLES=":".join(tunables), **{_DONE: "1"})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _tunables(value: str | None) -> list[str]:
  """The entries ("name=value") of a GLIBC_TUNABLES value."""
  return [t for t in (value or "").split(":") if t]


def _without_tunable(value: str | None) -> str | None:
  """A GLIBC_TUNABLES value without the huge-page tunable (any value) and the `KEEP_MEMORY`
  entries (these values); None when no other is left."""
  key = TUNABLE.split("=")[0]
  return ":".join(t for t in _tunables(value)
                  if t.split("=")[0] != key and t not in KEEP_MEMORY) or None


def _set_tunables(environ, value: str | None):
  """Sets GLIBC_TUNABLES in `environ` to `value`, or removes it for None."""
  if value is None:
    environ.pop("GLIBC_TUNABLES", None)
  else:
    environ["GLIBC_TUNABLES"] = value


def environ_without_tunable(environ=None) -> dict[str, str]:
  """`environ` (default `os.environ`) as a new dict with glibc's huge-page tunable and the
  `KEEP_MEMORY` ones taken out of GLIBC_TUNABLES: other tunables stay, and the variable goes when
  none is left."""
  env = dict(os.environ if environ is None else environ)
  _set_tunables(env, _without_tunable(env.get("GLIBC_TUNABLES")))
  return env


_environ_lock = threading.RLock()


@contextlib.contextmanager
def _withheld_from_children():
  """Processes started inside the block start without the huge-page tunable: glibc reads
  GLIBC_TUNABLES once, when a program starts, and a spawned process gets `os.environ`, which
  lacks the tunable inside the block. Blocks of different threads take turns."""
  with _environ_lock:
    before = os.environ.get("GLIBC_TUNABLES")
    _set_tunables(os.environ, _without_tunable(before))
    try:
      yield
    finally:
      _set_tunables(os.environ, before)


class _SpawnProcess(multiprocessing.context.SpawnProcess):
  """A spawned process that starts without the huge-page tunable."""

  def start(self):
    with _withheld_from_children():
      super().start()


class _SpawnContext(multiprocessing.context.SpawnContext):
  Process = _SpawnProcess


def spawn_context() -> multiprocessing.context.SpawnContext:
  """multiprocessing's "spawn" context, except that its processes start without the huge-page
  tunable: for a `Pool` (`ctx.Pool(...)`) or a `ProcessPoolExecutor(mp_context=...)`, whenever
  they start a worker (at once, on demand, or to replace one that died)."""
  return _SpawnContext()


_PR_SET_THP_DISABLE, _PR_GET_THP_DISABLE = 41, 42  # <linux/prctl.h>
_lock = threading.Lock()
_blocks = 0  # Threads inside small_pages().
_turned_off = False  # Whether the first of them turned THP off (the last turns it back on).


@contextlib.contextmanager
def small_pages():
  """Memory this process first touches inside the block gets 4 KiB pages, not transparent huge
  pages (Linux's per-process PR_SET_THP_DISABLE; elsewhere, or if THP was already off, nothing
  changes). For memory written once and then kept, such as a restored checkpoint: there the fault
  cost is all, and TLB reach did not matter (an update streaming over the restored seed TrainState
  took 0.09-0.11 s per pass either way). Process-wide while any thread is inside a block.
  """
  global _blocks, _turned_off
  with _lock:
    if _blocks == 0:
      libc = _libc()
      _turned_off = (libc is not None and libc.prctl(_PR_GET_THP_DISABLE, 0, 0, 0, 0) == 0
                     and libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0)
    _blocks += 1
  try:
    yield
  finally:
    with _lock:
      _blocks -= 1
      if _blocks == 0 and _turned_off:
        _libc().prctl(_PR_SET_THP_DISABLE, 0, 0, 0, 0)
        _turned_off = False


def _libc() -> ctypes.CDLL | None:
  if not sys.platform.startswith("linux"):
    return None
  try:
    return ctypes.CDLL(None, use_errno=True)
  except OSError:
    return None
