"""The one reporting module: run logs, results files, tables, statistics and figures.

Everything an experiment writes for people goes through here:

* run logs: ``MetricWriter`` (``metrics.jsonl``, TensorBoard, progress), ``read_metrics``,
  ``plot_curves``, ``write_summary`` (``metrics.json``), re-exported from ``writers``;
* results: :func:`write_results` writes ``results.json`` (strict JSON, atomic), ``results.md`` and the
  figures of an experiment in one call; :func:`write_json` / :func:`read_json` for any other file;
* tables: :func:`markdown_table`, :func:`mean_std`, :func:`fmt_mean_std`;
* statistics: :func:`paired_comparison` (paired by seed: mean difference, Student-t 95% interval,
  paired t-test, verdict);
* figures: :func:`figure` / :func:`save_figure` (matplotlib, Agg backend, PNG).

Only the main process (``jax.process_index() == 0``) writes.
"""
from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from etils import epath

from prox.experiments.writers import (  # noqa: F401  (re-exported: one module for experiments)
    MetricWriter,
    dumps,
    plot_curves,
    read_metrics,
    to_json,
    write_summary,
)


def _main() -> bool:
  return jax.process_index() == 0


def _atomic_write(path: str | os.PathLike, data: bytes) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if "://" in os.fspath(path):
    path.write_bytes(data)            # object stores replace whole objects
    return
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  tmp.write_bytes(data)
  tmp.replace(path)


def write_json(path: str | os.PathLike, value: Any) -> None:
  """Writes ``value`` as strict JSON (non-finite floats as strings; tuples as lists), atomically."""
  if _main():
    text = json.dumps(to_json(_plain(value)), indent=1, sort_keys=True, allow_nan=False) + "\n"
    _atomic_write(path, text.encode())


def read_json(path: str | os.PathLike) -> Any:
  return json.loads(epath.Path(path).read_text())


def write_text(path: str | os.PathLike, text: str) -> None:
  if _main():
    _atomic_write(path, text.encode())


def _plain(value: Any) -> Any:
  """Containers and numpy values as JSON-ready Python values."""
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.ndarray):
    return _plain(value.tolist())
  if isinstance(value, (np.integer, np.bool_)):
    return value.item()
  if isinstance(value, np.floating):
    return float(value)
  if hasattr(value, "to_dict"):      # ConfigDict
    return _plain(value.to_dict())
  return value


def write_results(workdir: str | os.PathLike, results: Mapping[str, Any], markdown: str,
                  figures: Mapping[str, Callable[[str], None]] = ()) -> None:
  """``results.json``, ``results.md`` and each ``figures[name](path)`` as ``workdir/name``."""
  workdir = os.fspath(workdir)
  write_json(os.path.join(workdir, "results.json"), results)
  write_text(os.path.join(workdir, "results.md"), markdown)
  if _main():
    for name, draw in dict(figures).items():
      draw(os.path.join(workdir, name))


# --- tables -------------------------------------------------------------------------------------------

def mean_std(values: Iterable[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (``ddof=1``; 0 for one value)."""
  a = np.asarray(list(values), np.float64)
  if a.size == 0:
    return float("nan"), float("nan")
  return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else 0.0)


def fmt_mean_std(values: Iterable[float], *, digits: int = 3, percent: bool = False,
                 signed: bool = False) -> str:
  """``0.912 ± 0.004`` (``91.2 ± 0.4`` with ``percent``); a single value without the spread."""
  values = list(values)
  mean, std = mean_std(values)
  scale = 100.0 if percent else 1.0
  if math.isnan(mean):
    return "n/a"
  spec = f"{'+' if signed else ''}.{digits}f"
  text = format(mean * scale, spec)
  return text if len(values) < 2 else f"{text} ± {std * scale:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                   align: str | None = None) -> str:
  """A GitHub markdown table; ``align`` is one character per column (``l``, ``r``, ``c``)."""
  headers = [str(h) for h in headers]
  align = align or "l" + "r" * (len(headers) - 1)
  marks = {"l": ":---", "r": "---:", "c": ":---:"}
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
  for row in rows:
    cells = ["" if c is None else str(c) for c in row]
    if len(cells) != len(headers):
      raise ValueError(f"row {cells} has {len(cells)} cells for {len(headers)} columns")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# --- statistics ---------------------------------------------------------------------------------------

def paired_comparison(ours: Mapping[Any, float], baseline: Mapping[Any, float]) -> dict[str, Any]:
  """``ours - baseline`` paired by key (a seed: same initialisation and data order).

  Returns the number of pairs, the mean and standard deviation of the differences, the 95% confidence
  interval of the mean (Student t with ``n - 1`` degrees of freedom), the two-sided paired t-test p-value
  and a verdict: ``better`` / ``worse`` when the interval excludes 0, else ``no difference``. With one
  pair, or identical nonzero differences, the interval is undefined (infinite): ``no difference``.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top
  keys = [k for k in ours if k in baseline]
  d = np.asarray([ours[k] - baseline[k] for k in keys], np.float64)
  n = d.size
  if n == 0:
    return {"num_pairs": 0, "diff_mean": float("nan"), "diff_std": float("nan"),
            "ci95": [float("-inf"), float("inf")], "p_value": float("nan"), "verdict": "no difference",
            "wins": 0, "ties": 0, "losses": 0}
  mean = float(d.mean())
  std = float(d.std(ddof=1)) if n > 1 else 0.0
  if n > 1 and std > 0:
    half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n))
    p = float(stats.ttest_rel([ours[k] for k in keys], [baseline[k] for k in keys]).pvalue)
  else:
    half, p = (0.0, 1.0) if mean == 0 else (float("inf"), float("nan"))
  low, high = mean - half, mean + half
  verdict = "better" if low > 0 else "worse" if high < 0 else "no difference"
  return {"num_pairs": n, "diff_mean": mean, "diff_std": std, "ci95": [low, high], "p_value": p,
          "verdict": verdict, "wins": int(np.sum(d > 0)), "ties": int(np.sum(d == 0)),
          "losses": int(np.sum(d < 0))}


# --- figures ------------------------------------------------------------------------------------------

def figure(width: float, height: float, *, nrows: int = 1, ncols: int = 1, **kwargs: Any):
  """A matplotlib figure and its axes on the Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  kwargs.setdefault("layout", "constrained")
  return plt.subplots(nrows, ncols, figsize=(width, height), **kwargs)


def save_figure(fig: Any, path: str | os.PathLike, *, dpi: int = 80) -> None:
  """Writes ``fig`` as a PNG (atomically) and closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  plt.close(fig)
  if _main():
    _atomic_write(path, buf.getvalue())
