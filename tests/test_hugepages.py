"""Entry points re-execute themselves once with glibc's huge-page tunable."""

import os
import subprocess
import sys

import pytest

from astra_jax import hugepages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPORT = ("import os; from astra_jax import hugepages; before = os.getpid(); "
           "hugepages.reexec_with_huge_pages(); "
           "print(before == os.getpid(), os.environ.get('GLIBC_TUNABLES'))")


def child(**env):
  env = {k: v for k, v in dict(os.environ, PYTHONPATH=REPO, **env).items() if v is not None}
  out = subprocess.run([sys.executable, "-c", _REPORT], capture_output=True, text=True,
                       check=True, cwd=REPO, env=env, timeout=60)
  return out.stdout.split()


@pytest.mark.skipif(not (sys.platform.startswith("linux") and hugepages.thp_mode() == "madvise"
                         and hugepages._glibc_has_tunable()),  # pylint: disable=protected-access
                    reason="needs Linux, glibc >= 2.35 and THP mode 'madvise'")
def test_reexec_sets_the_tunable_once_and_keeps_other_tunables():
  same_pid, tunables = child(ASTRA_HUGEPAGES=None, GLIBC_TUNABLES="glibc.malloc.arena_max=4")
  assert same_pid == "True"  # execve: the same process (signals, parents' waits still apply).
  assert tunables == "glibc.malloc.arena_max=4:" + hugepages.TUNABLE


def test_opt_out_and_no_second_reexec():
  assert child(ASTRA_HUGEPAGES="0", GLIBC_TUNABLES=None) == ["True", "None"]
  assert child(ASTRA_HUGEPAGES=None, GLIBC_TUNABLES=hugepages.TUNABLE) == ["True",
                                                                         hugepages.TUNABLE]
