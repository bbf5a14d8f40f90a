"""Transparent huge pages for the host's large arrays: the command-line entry points re-execute
themselves once with glibc's `glibc.malloc.hugetlb=1` tunable (Linux with glibc >= 2.35).

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

`small_pages()` turns huge pages off for a block that touches much memory once: on the
Firecracker VM these figures come from, faulting in fresh 2 MiB pages was ~2x slower than 4 KiB
ones (restoring the seed TrainState: 3.6-4.7 s with them, 2.0-2.6 s without).
"""

import contextlib
import ctypes
import os
import platform
import sys
import threading

TUNABLE = "glibc.malloc.hugetlb=1"
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
  """Replaces this process (same pid, arguments and environment) by one with the tunable set.

  Call first thing in a `__main__` block, before importing jax or TensorFlow: the restart then
  costs only the interpreter's start. Returns without doing anything when `wanted()` is False.
  """
  if not wanted():
    return
  tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t] + [TUNABLE]
  env = dict(os.environ, GLIBC_TUNABLES=":".join(tunables), **{_DONE: "1"})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


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
