"""A run's record (``config.json``): the experiment and the effective config that made a directory.

``prox`` writes ``<workdir>/config.json`` the first time it starts in a workdir and compares it on
every later start: a changed config would otherwise resume the checkpoints with other settings (a new
learning rate silently mixing two runs) or fail deep inside orbax (another model or optimizer), and a
second experiment would overwrite the first one's results. The same check serves sweeps for their
sub-runs: ``check_config(run_dir, record(...), resumable)``.

Record format (strict JSON, keys sorted, two-space indent)::

  {"config": {"batch_size": 128, "learning_rate": 0.001, "model_kwargs": {"hidden": [256, 256]}, ...},
   "experiment": "classify"}

Fields compare by their dotted path (``model_kwargs.hidden``). A field may change on resume when its
path, or the path of a field containing it, is in ``resumable``: ``RESUMABLE`` below (how long to train
and how to log, checkpoint and show progress, where the data lives) plus what an experiment adds with a
module-level ``RESUMABLE`` tuple. ``num_steps`` is resumable so that a run can be extended, but with a
schedule that depends on it (``cosine``) the rest of the run follows the new schedule.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

from etils import epath

# JAX-free at import (``prox --help`` lists RESUMABLE without importing JAX): the helpers below import
# ``report`` when they run. The one ``ConfigError`` lives here; ``common`` re-exports it.


class ConfigError(ValueError):
  """A bad flag or config value; ``main`` prints it as one line and exits with status 2."""

RECORD = "config.json"

# Fields that may change when a run resumes: they do not change what is being trained (or they extend
# it: num_steps), only how long, how it is logged, checkpointed and shown, and where data is read.
RESUMABLE: tuple[str, ...] = (
    "num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "progress",
    "tensorboard", "plot_curves", "data_dir", "compilation_cache", "keep_run_checkpoints",
)

_SHOWN = 6   # changed fields named in the error; the rest are counted


def _config_error(message: str) -> Exception:
  return ConfigError(message)


def _plain(value: Any) -> Any:
  """``value`` as strict-JSON-able values; what JSON cannot hold (a callable, say) as its ``repr``."""
  from prox.experiments import report  # pylint: disable=g-import-not-at-top
  if hasattr(value, "to_dict"):   # a ConfigDict (not a Mapping), anywhere in the tree
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  try:
    return report.to_json(value)
  except ValueError:
    return repr(value)


def record(experiment: str, config: Any) -> dict[str, Any]:
  """The record of a run of ``experiment`` with ``config`` (a ``ConfigDict`` or a mapping), as it reads
  back from ``config.json`` (tuples become lists)."""
  return json.loads(json.dumps({"experiment": experiment, "config": _plain(config)}, allow_nan=False))


def read_record(directory: str | os.PathLike) -> dict[str, Any] | None:
  """The record in ``directory``; ``None`` if there is none. A damaged one is a ``ConfigError``."""
  path = epath.Path(directory) / RECORD
  if not path.exists():
    return None
  try:
    value = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise _config_error(f"{path} is damaged ({type(e).__name__}: {' '.join(str(e).split())}); "
                      f"restore it or use a new --workdir") from None
  if not (isinstance(value, dict) and isinstance(value.get("config"), dict)
          and isinstance(value.get("experiment"), str)):
    raise _config_error(f"{path} is not a prox run record (no experiment and config); "
                      f"use a new --workdir")
  return value


def write_record(directory: str | os.PathLike, run_record: Mapping[str, Any], *,
                 main_process: bool | None = None) -> None:
  """Writes ``directory/config.json`` atomically (a temporary file renamed over it); only on the main
  process (default ``jax.process_index() == 0``)."""
  if main_process is None:
    import jax  # pylint: disable=g-import-not-at-top
    main_process = jax.process_index() == 0
  if not main_process:
    return
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  text = json.dumps(_plain(run_record), indent=2, sort_keys=True, allow_nan=False) + "\n"
  tmp = directory / f".{RECORD}.tmp-{os.getpid()}"
  tmp.write_text(text)
  tmp.replace(directory / RECORD)   # atomic on POSIX; overwrites


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Leaves by dotted path (an empty mapping has none: ``{}`` and an absent mapping compare equal)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


_ABSENT = object()


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
  """``(dotted field, old value, new value)`` of every field that differs between two configs (a field
  only one of them has included, with the other value ``_ABSENT``), in sorted order."""
  a, b = _flatten(old), _flatten(new)
  return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(a.keys() | b.keys())
          if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def is_resumable(field: str, resumable: Iterable[str]) -> bool:
  """Whether ``field`` (dotted) or a field containing it is in ``resumable``."""
  parts = field.split(".")
  allowed = set(resumable)
  return any(".".join(parts[:i]) in allowed for i in range(1, len(parts) + 1))


def _show(value: Any) -> str:
  if value is _ABSENT:
    return "(unset)"
  return value if isinstance(value, str) else json.dumps(value)


def check_config(directory: str | os.PathLike, run_record: Mapping[str, Any],
                 resumable: Iterable[str] = RESUMABLE, *, main_process: bool | None = None) -> None:
  """Records ``run_record`` in ``directory`` or checks it against the record already there.

  The first time, writes ``directory/config.json``. Later, a record of another experiment, or one whose
  config differs in a field that is not ``resumable``, raises a one-line ``ConfigError`` naming the
  changed fields, e.g. ``workdir runs/x holds a run of classify with learning_rate=0.001 (now 0.01),
  model=mlp (now cnn); use a new --workdir or set them back``; changes of resumable fields only are
  accepted and written to the record. Every process reads and decides alike; only the main process
  writes (atomically, so another process reads the old record or the new one, never a part).

  Args:
    directory: the run's directory (``--workdir``, or a sweep's sub-run directory).
    run_record: ``record(experiment, config)``.
    resumable: dotted fields that may change (a field inside one of them may change too).
    main_process: whether this process writes; default ``jax.process_index() == 0``.
  """
  new = record(run_record["experiment"], run_record["config"])
  old = read_record(directory)
  if old is None:
    write_record(directory, new, main_process=main_process)
    return
  where = os.fspath(directory)
  if old["experiment"] != new["experiment"]:
    raise _config_error(f"workdir {where} holds a run of {old['experiment']} (now "
                      f"{new['experiment']}); use a new --workdir")
  changes = changed_fields(old["config"], new["config"])
  blocking = [c for c in changes if not is_resumable(c[0], resumable)]
  if blocking:
    shown = ", ".join(f"{k}={_show(a)} (now {_show(b)})" for k, a, b in blocking[:_SHOWN])
    more = f" and {len(blocking) - _SHOWN} more fields" if len(blocking) > _SHOWN else ""
    them = "it" if len(blocking) == 1 else "them"
    raise _config_error(f"workdir {where} holds a run of {old['experiment']} with {shown}{more}; "
                      f"use a new --workdir or set {them} back")
  if changes:
    write_record(directory, new, main_process=main_process)


def remove_record(directory: str | os.PathLike, *, main_process: bool | None = None) -> None:
  """Deletes ``directory/config.json`` (a start that wrote it and then refused its config)."""
  if main_process is None:
    import jax  # pylint: disable=g-import-not-at-top
    main_process = jax.process_index() == 0
  path = epath.Path(directory) / RECORD
  if main_process and path.exists():
    path.unlink()
