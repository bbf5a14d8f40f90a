r"""Execute notebooks/analysis.ipynb against a training workdir and save it with its outputs.

  .venv/bin/python notebooks/run.py --workdir runs/baseline [--num 4] \
      [--out notebooks/analysis.ipynb] [--figures_dir docs [--figures spectra,redshift]] \
      [--set DATA_DIR=/data/tfds]

The notebook's cell tagged "parameters" is rewritten with the workdir (made absolute), the
number of galaxies and each `--set NAME=VALUE` (VALUE a Python literal, else a string); the
notebook then runs top to bottom in a fresh kernel, from the notebooks/ folder, and is written
to `--out` (by default in place) with its outputs. With `--figures_dir`, the PNG of each cell
tagged "figure-NAME" for NAME in `--figures` (default: spectra; "all": every one) is also
written there as notebook_NAME.png (the README shows docs/notebook_spectra.png).
"""

from __future__ import annotations

import argparse
import ast
import base64
import os
import re
from typing import Iterable

import nbclient
import nbformat

NOTEBOOK_DIR = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK = os.path.join(NOTEBOOK_DIR, "analysis.ipynb")
FIGURE_TAG = "figure-"

_ASSIGNMENT = re.compile(r"^(?P<name>[A-Z_][A-Z0-9_]*)\s*=\s*(?P<value>.*?)(?P<comment>\s*#.*)?$")


def set_parameters(nb: nbformat.NotebookNode, **params) -> nbformat.NotebookNode:
  """Rewrites the values of the cell tagged "parameters" (`NAME = value  # comment` lines).

  Each given NAME must be assigned there; its value becomes repr(value), comments are kept.
  Raises KeyError naming parameters the cell does not have. Returns `nb`, changed in place.
  """
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", ())]
  if len(cells) != 1:
    raise ValueError(f"the notebook has {len(cells)} cells tagged 'parameters', not 1")
  lines, seen = [], set()
  for line in cells[0].source.splitlines():
    match = _ASSIGNMENT.match(line)
    if match and match["name"] in params:
      seen.add(match["name"])
      line = f"{match['name']} = {params[match['name']]!r}{match['comment'] or ''}"
    lines.append(line)
  missing = sorted(set(params) - seen)
  if missing:
    raise KeyError(f"not parameters of the notebook: {missing}")
  cells[0].source = "\n".join(lines)
  return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 1800) -> nbformat.NotebookNode:
  """Runs every cell in a fresh python3 kernel whose working directory is notebooks/.

  Raises `nbclient.exceptions.CellExecutionError` (with the cell and its traceback) on the first
  cell that fails. Returns `nb` with its outputs.
  """
  client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                   record_timing=False,
                                   resources={"metadata": {"path": NOTEBOOK_DIR}})
  return client.execute()


def figures(nb: nbformat.NotebookNode) -> dict[str, list[bytes]]:
  """{NAME: [PNG bytes, ...]} of the outputs of every cell tagged "figure-NAME"."""
  out = {}
  for cell in nb.cells:
    for tag in cell.metadata.get("tags", ()):
      if tag.startswith(FIGURE_TAG):
        out[tag[len(FIGURE_TAG):]] = [base64.b64decode(o["data"]["image/png"])
                                      for o in cell.get("outputs", ())
                                      if "image/png" in o.get("data", {})]
  return out


def write_figures(nb: nbformat.NotebookNode, out_dir: str,
                  names: Iterable[str] | None = None) -> list[str]:
  """Writes the first PNG of the figure cell of each of `names` (None: all) as
  out_dir/notebook_NAME.png; returns the paths. Raises KeyError naming an unknown figure."""
  drawn = figures(nb)
  names = list(drawn) if names is None else list(names)
  unknown = sorted(set(names) - set(drawn))
  if unknown:
    raise KeyError(f"no figure cells {unknown}; the notebook's are {sorted(drawn)}")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name in names:
    pngs = drawn[name]
    if pngs:
      paths.append(os.path.join(out_dir, f"notebook_{name}.png"))
      with open(paths[-1], "wb") as f:
        f.write(pngs[0])
  return paths


def run(workdir: str, out: str = NOTEBOOK, num: int | None = None,
        figures_dir: str | None = None, figure_names: Iterable[str] | None = None,
        timeout: int = 1800, **params) -> nbformat.NotebookNode:
  """Executes the notebook against `workdir`, writes it to `out`; returns it."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params["WORKDIR"] = os.path.abspath(workdir)
  if num is not None:
    params["NUM_GALAXIES"] = num
  nb = execute(set_parameters(nb, **params), timeout=timeout)
  nbformat.write(nb, out)
  if figures_dir:
    write_figures(nb, figures_dir, figure_names)
  return nb


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="Training workdir to analyse.")
  parser.add_argument("--num", type=int, default=None, help="Test galaxies drawn (NUM_GALAXIES).")
  parser.add_argument("--out", default=NOTEBOOK, help="Executed notebook (default: in place).")
  parser.add_argument("--figures_dir", default=None, help="Also write notebook_NAME.png here.")
  parser.add_argument("--figures", default="spectra",
                      help="Comma-separated figure names to write, or 'all'.")
  parser.add_argument("--timeout", type=int, default=1800, help="Seconds per cell.")
  parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                      help="Another parameter of the notebook (repeatable).")
  args = parser.parse_args(argv)
  params = {}
  for item in args.set:
    name, sep, value = item.partition("=")
    if not sep:
      parser.error(f"--set {item!r}: expected NAME=VALUE")
    params[name] = _literal(value)
  names = None if args.figures == "all" else args.figures.split(",")
  run(args.workdir, args.out, args.num, args.figures_dir, names, args.timeout, **params)
  print(args.out)


if __name__ == "__main__":
  main()
