"""Entry points re-execute themselves once with glibc's huge-page tunable."""

import os
import subprocess
import sys

import pytest

from astra_jax import hugepages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPORT = ("import os; from astra_jax import hugepages; hugepages.reexec_with_huge_pages(); "
           "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'))")


def child(**env):
  """[whether the process that reports is the one started, its GLIBC_TUNABLES]."""
  env = {k: v for k, v in dict(os.environ, PYTHONPATH=REPO, **env).items() if v is not None}
  proc = subprocess.Popen([sys.executable, "-c", _REPORT], stdout=subprocess.PIPE, text=True,
                          cwd=REPO, env=env)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0
  pid, tunables = out.split()
  return [str(int(pid) == proc.pid), tunables]


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
