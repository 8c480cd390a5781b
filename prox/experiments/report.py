"""The one reporting module: run logs, results files, tables, statistics and figures.

Everything an experiment writes for people goes through here:

* run logs: ``MetricWriter`` (``metrics.jsonl``, TensorBoard, progress), ``read_metrics``,
  ``plot_curves``, ``write_summary`` (``metrics.json``); strict JSON (``to_json``, ``dumps``);
* results: :func:`write_results` writes ``results.json`` (strict JSON, atomic), ``results.md`` and the
  figures of an experiment in one call; :func:`write_json` / :func:`read_json` for any other file;
* tables: :func:`markdown_table`, :func:`mean_std`, :func:`fmt_mean_std`;
* statistics: :func:`paired_comparison` (paired by seed: mean difference, Student-t 95% interval,
  paired t-test, verdict);
* figures: :func:`figure` / :func:`save_figure` (matplotlib, Agg backend, PNG).

Only the main process (``jax.process_index() == 0``) writes.

Run logs in detail:
What a run writes for people to read: metric logs, TensorBoard events, a progress bar, plots.

``MetricWriter(workdir, total_steps=...)`` appends one JSON line per ``write`` to
``workdir/metrics.jsonl``, mirrors the scalars to TensorBoard (``workdir/tb``, tags ``split/name``)
and drives a tqdm bar; ``plot_curves`` draws the JSON lines to a PNG; ``write_summary`` writes the
final ``workdir/metrics.json``. Layout of one run's workdir::

  metrics.jsonl   {"step": 100, "split": "train", "time": 1718000000.0, "loss": 0.31, ...} per line
  metrics.json    final summary (``write_summary``)
  curves.png      ``plot_curves(workdir/"metrics.jsonl", workdir/"curves.png")``
  tb/             TensorBoard event files: ``tensorboard --logdir workdir/tb``

Every JSON file is strict JSON (RFC 8259, readable by any parser): a non-finite float is written as
the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` (the spellings Python's ``float()`` reads back;
``read_metrics`` returns them as floats again), never as the bare ``NaN``/``Infinity`` tokens
Python's ``json`` emits by default, which strict parsers (JavaScript's ``JSON.parse``, Go's
``encoding/json``, Rust's ``serde_json``) reject. A string keeps what the value was: ``null`` would merge a diverged loss (``inf``) with a
missing one.

Progress: on a terminal (stderr) a tqdm bar; when stdout is not a terminal (CI, SLURM logs) or the bar
is off because stderr is not one, one line per train record on stdout, at most one every
``line_interval`` seconds (the last step always), e.g.
``step 500/1500 (33%) loss=0.1234 acc=0.9688 2.1 s/100 steps``.

Only the main process (``jax.process_index() == 0``) writes; on the others the writer does nothing.
Workdirs may be URLs (``gs://...``) through ``etils.epath`` (needs ``gcsfs``; TensorBoard events there
need ``google-cloud-storage``). Object stores cannot append, so there ``metrics.jsonl`` is rewritten
whole on each ``write`` (fine at logging frequency).
"""
from __future__ import annotations

import io
import json
import math
import numbers
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

_RESERVED = ("step", "split", "time")
_BAR_KEYS = {"loss": "loss", "accuracy": "acc"}   # train metrics shown on the progress bar


def _is_remote(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def _scalar(name: str, value: Any) -> int | float:
  """A metric value as a JSON number: ints stay ints, everything else (0-d arrays too) is a float."""
  if isinstance(value, (bool, str, bytes)) or np.ndim(value) != 0:
    raise ValueError(f"metric {name!r} must be a real scalar, got {value!r}")
  value = np.asarray(value)
  if jnp.issubdtype(value.dtype, jnp.integer):
    return int(value)
  if not jnp.issubdtype(value.dtype, jnp.floating):   # jnp's also knows bfloat16
    raise ValueError(f"metric {name!r} must be a real scalar, got {value!r}")
  return float(value)


NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _finite_or_name(value: float) -> float | str:
  """A float as strict JSON allows: itself if finite, else ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``."""
  if math.isfinite(value):
    return value
  return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def to_json(value: Any, name: str = "value") -> Any:
  """``value`` as strict-JSON-able Python values: mappings (keys as strings), lists, tuples, strings,
  bools, ``None`` and real scalars (Python, NumPy or 0-d JAX; non-finite floats become strings, see
  the module docstring). Anything else raises a ``ValueError`` naming its place (``name``)."""
  if isinstance(value, Mapping):
    return {str(k): to_json(v, f"{name}.{k}") for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json(v, f"{name}[{i}]") for i, v in enumerate(value)]
  if isinstance(value, (str, bool)) or value is None:
    return value
  scalar = _scalar(name, value)
  return _finite_or_name(scalar) if isinstance(scalar, float) else scalar


def dumps(value: Any, **kwargs: Any) -> str:
  """``json.dumps`` of ``to_json(value)``; the text is strict JSON (``allow_nan=False`` checks it)."""
  return json.dumps(to_json(value), allow_nan=False, **kwargs)


def _complete_lines(text: str) -> str:
  """``text`` without a trailing partial line (what a run killed in the middle of a write leaves)."""
  return text[:text.rfind("\n") + 1]


class _AppendLines:
  """Appends text lines to a local file, flushed after each line (a killed run keeps them)."""

  def __init__(self, path: epath.Path):
    self._file = open(path, "a+", encoding="utf-8")
    self._file.seek(0)
    kept = len(_complete_lines(self._file.read()).encode("utf-8"))
    self._file.truncate(kept)

  def append(self, line: str) -> None:
    self._file.write(line + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class _RewriteLines:
  """Appends text lines to an object-store file by rewriting it whole (object stores cannot append)."""

  def __init__(self, path: epath.Path):
    self._path = path
    self._text = _complete_lines(path.read_text()) if path.exists() else ""

  def append(self, line: str) -> None:
    self._text += line + "\n"
    self._path.write_text(self._text)

  def close(self) -> None:
    pass


class MetricWriter:
  """Writes metrics to ``metrics.jsonl`` and TensorBoard, and shows a progress bar.

  Args:
    workdir: the run's directory (created if missing); a local path or a ``gs://`` URL.
    total_steps: length of the progress bar.
    tensorboard: also write TensorBoard event files under ``workdir/tb``.
    progress: show progress: a tqdm bar on stderr when stderr is a terminal; progress lines on stdout
      when stdout is not a terminal or stderr is not one (see the module docstring).
    main_process: whether this process writes; default ``jax.process_index() == 0``.
    line_interval: seconds at least between two progress lines (the last step is always printed).

  Example::

    writer = MetricWriter(workdir, total_steps=cfg.steps)
    for step in range(start, cfg.steps):
      state, metrics = train_step(state, batch)
      writer.update(step + 1, num_examples=batch_size)
      if (step + 1) % cfg.log_every == 0:
        writer.write(step + 1, jax.device_get(metrics))
    writer.write(cfg.steps, {"accuracy": test_acc}, split="test")
    writer.close()
  """

  def __init__(self, workdir: str | os.PathLike, *, total_steps: int, tensorboard: bool = True,
               progress: bool = True, main_process: bool | None = None, line_interval: float = 10.0):
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 0:
      raise ValueError(f"total_steps must be a non-negative int, got {total_steps!r}")
    if not line_interval >= 0:
      raise ValueError(f"line_interval must be >= 0 seconds, got {line_interval!r}")
    self.active = jax.process_index() == 0 if main_process is None else main_process
    self.workdir = epath.Path(workdir)
    self._total = total_steps
    self._lines = self._tb = self._bar = None
    self._postfix: dict[str, float] = {}
    self._last_time = time.perf_counter()
    self._print_lines = False
    self._line_interval = line_interval
    self._line_step: int | None = None       # step and time of the last progress line (or the start)
    self._line_time = self._last_time
    self._line_printed = False
    if not self.active:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    jsonl = self.workdir / "metrics.jsonl"
    self._lines = _RewriteLines(jsonl) if _is_remote(workdir) else _AppendLines(jsonl)
    if tensorboard:
      from tensorboardX import SummaryWriter   # pylint: disable=g-import-not-at-top
      # A unique suffix: a resumed run must not overwrite an event file named after the same second.
      # tensorboardX writes events on a thread and its flush() does not wait for that thread, so events
      # could sit unflushed for flush_secs (default 120 s); 1 s bounds what a killed run loses.
      self._tb = SummaryWriter(os.fspath(self.workdir / "tb"), filename_suffix=f".{time.time_ns()}",
                               flush_secs=1)
    if progress and sys.stderr.isatty():
      from tqdm import tqdm   # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
    self._print_lines = progress and (self._bar is None or not sys.stdout.isatty())

  def write(self, step: int, metrics: Mapping[str, Any], *, split: str = "train") -> None:
    """Appends ``{"step", "split", "time", **metrics}`` as one JSON line and as TensorBoard scalars.

    Metric values are real scalars (Python, NumPy or 0-d JAX); non-finite floats are written as the
    strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (strict JSON; ``read_metrics`` decodes them).
    A train record also prints a progress line when lines are on (see the class docstring).
    """
    if not self.active:
      return
    bad = [name for name in metrics if name in _RESERVED]
    if bad:
      raise ValueError(f"metric names {bad} clash with the reserved keys {_RESERVED}")
    values = {name: _scalar(name, value) for name, value in metrics.items()}
    step = int(step)
    record = {"step": step, "split": split, "time": time.time(), **values}
    self._lines.append(dumps(record))
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(f"{split}/{name}", value, step)
    if split == "train":
      self._postfix.update({short: values[name] for name, short in _BAR_KEYS.items()
                            if name in values})
    elif "accuracy" in values:
      self._postfix[f"{split}_acc"] = values["accuracy"]
    if split == "train" and self._print_lines:
      self._progress_line(step)

  def _progress_line(self, step: int) -> None:
    """Prints ``step 500/1500 (33%) loss=0.1234 acc=0.9688 2.1 s/100 steps`` to stdout (rate-limited)."""
    now = time.perf_counter()
    if (self._line_printed and now - self._line_time < self._line_interval
        and step != self._total):
      return
    parts = [f"step {step}/{self._total}"]
    if self._total:
      parts[0] += f" ({100 * step // self._total}%)"
    parts += [f"{k}={v:.4g}" for k, v in self._postfix.items()]
    previous = 0 if self._line_step is None else self._line_step
    if step > previous:
      per_100 = (now - self._line_time) / (step - previous) * 100
      parts.append(f"{per_100:.3g} s/100 steps")
    print(" ".join(parts), file=sys.stdout, flush=True)
    self._line_step, self._line_time, self._line_printed = step, now, True

  def update(self, step: int, num_examples: int) -> float:
    """Moves the progress bar to ``step``; returns examples per second since the previous call."""
    now = time.perf_counter()
    rate = num_examples / max(now - self._last_time, 1e-9)
    self._last_time = now
    if self._line_step is None:   # the first call gives the step a (resumed) run starts from
      self._line_step, self._line_time = int(step), now
    if self._bar is not None:
      self._bar.set_postfix({**{k: f"{v:.4g}" for k, v in self._postfix.items()},
                             "ex/s": f"{rate:.4g}"}, refresh=False)
      self._bar.update(int(step) - self._bar.n)   # redraws (at most every 0.1 s)
    return rate

  def close(self) -> None:
    """Flushes and closes the files and the bar."""
    for part in (self._bar, self._tb, self._lines):
      if part is not None:
        part.close()
    self._lines = self._tb = self._bar = None
    self.active = False

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _decode_non_finite(record: dict) -> dict:
  return {k: NON_FINITE[v] if k not in _RESERVED and isinstance(v, str) and v in NON_FINITE else v
          for k, v in record.items()}


def read_metrics(jsonl_path: str | os.PathLike) -> list[dict]:
  """The records of a ``metrics.jsonl``; a truncated last line (a run killed mid-write) is dropped.

  Metric values written as ``"NaN"``/``"Infinity"``/``"-Infinity"`` come back as floats.
  """
  lines = epath.Path(jsonl_path).read_text().splitlines()
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(_decode_non_finite(json.loads(line)))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise
  return records


def plot_curves(jsonl_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
  """Draws every metric of a ``metrics.jsonl`` against step to a PNG, one panel per metric.

  Loss and accuracy panels come first; each panel has one line per split (train, test, ...). When a
  resumed run wrote a (split, step) twice, the later record wins.
  """
  from matplotlib.figure import Figure   # pylint: disable=g-import-not-at-top (Agg, no pyplot)

  series: dict[str, dict[str, dict[int, float]]] = {}   # metric -> split -> step -> value
  for record in read_metrics(jsonl_path):
    for name, value in record.items():
      if name not in _RESERVED and isinstance(value, numbers.Real):
        series.setdefault(name, {}).setdefault(record["split"], {})[record["step"]] = value
  if not series:
    raise ValueError(f"no metrics to plot in {os.fspath(jsonl_path)}")
  names = sorted(series, key=lambda n: ("loss" not in n, "accuracy" not in n, n))
  ncols = min(3, len(names))
  nrows = math.ceil(len(names) / ncols)
  fig = Figure(figsize=(4.5 * ncols, 3.2 * nrows), layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  for ax, name in zip(axes, names):
    for split, points in sorted(series[name].items(), key=lambda kv: (kv[0] != "train", kv[0])):
      steps = sorted(points)
      ax.plot(steps, [points[s] for s in steps], label=split, marker="." if len(steps) < 30 else None)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
  for ax in axes[len(names):]:
    ax.set_visible(False)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  epath.Path(png_path).write_bytes(buf.getvalue())


def write_summary(workdir: str | os.PathLike, metrics: Mapping[str, Any]) -> None:
  """Writes ``workdir/metrics.json``: the final metrics (scalars, or nested JSON-able values), strict
  JSON (non-finite floats as strings, see the module docstring)."""
  text = json.dumps(to_json(metrics, "metrics"), indent=2, sort_keys=True, allow_nan=False) + "\n"
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / "metrics.json").write_text(text)


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
