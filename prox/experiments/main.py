"""``prox``: run an experiment from an ml_collections config file.

  prox --config=prox/experiments/configs/classify.py --workdir=runs/classify [--config.field=value ...]
  prox --help                                       the experiments, their config files, the flags
  prox --help --config=prox/experiments/configs/classify.py     that config's fields and their meaning

The config's ``experiment`` field names the experiment (``EXPERIMENTS``: name -> module), which has
``validate(config, workdir)`` (every check, before anything compiles) and ``run(config, workdir)``; it
may define ``QUICK`` (a flattened ``{field: value}`` applied by ``--config.quick=True``) and
``RESUMABLE`` (more fields that may change when a run resumes).

Every bad command line (flags, config file, field names and values) prints one line, ``prox: error:
...``, and exits with status 2 before anything compiles.

Quick mode: when ``config.quick`` is True, main applies the experiment's ``QUICK`` fields to the config,
except the fields given on the command line (``--config.sparsities=8:4 --config.quick=True`` keeps 8:4),
and passes the result on.

Runs and resuming: the first start in a workdir writes ``workdir/config.json`` (the experiment and the
effective config); a later start compares its config with it and refuses, in one line naming the
changed fields, unless only fields of ``_runs.RESUMABLE`` (and the experiment's ``RESUMABLE``) changed.

Multi-host: every process runs the same command; ``jax.distributed`` is initialised from the cluster's
environment (SLURM, TPU pods) or from --coordinator_address/--num_processes/--process_id.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import importlib.machinery
import importlib.util
import inspect
import io
import os
import re
import sys
import textwrap
import tokenize
import traceback
from typing import Any, Iterable, Mapping, NoReturn

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

# name -> module (imported only when the experiment runs). Each config file sets ``experiment``.
EXPERIMENTS: dict[str, str] = {
    "classify": "prox.experiments.classify",
    "adadagrad": "prox.experiments.adadagrad",
    "continual": "prox.experiments.continual",
    "curriculum": "prox.experiments.curriculum",
    "nm_sparsity": "prox.experiments.nm_sparsity",
    "compose": "prox.experiments.compose",
    "distill": "prox.experiments.distill",
    "budgets": "prox.experiments.budgets",
    "shrink": "prox.experiments.shrink",
}

_CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

# Unlocked while flags are parsed so that keyword-argument mappings (``*_kwargs``) accept new keys
# (``--config.optimizer_kwargs.momentum=0.9``); every other new field is refused before parsing, and
# the parsed config is locked.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The experiment's ml_collections config file, FILE[:VARIANT] (VARIANT is passed to "
    "its get_config).", lock_config=False, accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory: metrics, plots, checkpoints, "
                               "config.json (the run's record).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-host: host:port of process 0 (default: from the cluster).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")

_HELP_ARG = re.compile(r"^--?(help|helpshort|helpfull|h|\?)$")
_CONFIG_ARG = re.compile(r"^--?config(=(.*))?$")
_OVERRIDE_ARG = re.compile(r"^--?(no)?config\.([^=]+)(=(.*))?$", re.S)
_OPEN_SUFFIX = "_kwargs"   # mappings of keyword arguments: overrides may add keys under them


class UsageError(ValueError):
  """A bad command line; printed as ``prox: error: <message>`` (exit status 2)."""


def _fail(message: str) -> NoReturn:
  print(f"prox: error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(2)


# --- the config file -------------------------------------------------------------------------------

def _config_arg(argv: list[str]) -> str | None:
  """The value of ``--config`` in ``argv`` (``--config=X`` or ``--config X``); the last one wins."""
  value = None
  for i, arg in enumerate(argv):
    match = _CONFIG_ARG.match(arg)
    if match:
      if match.group(1) is not None:
        value = match.group(2)
      elif i + 1 < len(argv):
        value = argv[i + 1]
      else:
        raise UsageError("--config needs a value, e.g. --config=prox/experiments/configs/classify.py")
  return value


def _error_line_in(path: str, error: BaseException) -> str:
  """`` (line N)`` of the innermost frame of ``error``'s traceback that is in the file ``path``."""
  lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(f.filename) == os.path.abspath(path)]
  return f" (line {lines[-1]})" if lines else ""


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads ``FILE[:VARIANT]`` as ml_collections does; every failure is a one-line ``UsageError``."""
  path, _, variant = spec.partition(":")
  args = (variant,) if ":" in spec else ()
  if not path:
    raise UsageError("--config is empty; give a config file, e.g. "
                     "--config=prox/experiments/configs/classify.py")
  if not os.path.exists(path):
    raise UsageError(f"config file {path!r} does not exist (the experiments' config files are in "
                     f"{os.path.relpath(_CONFIGS_DIR)}/)")
  if not os.path.isfile(path):
    raise UsageError(f"config file {path!r} is not a file")
  try:
    loader = importlib.machinery.SourceFileLoader("prox_config", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
  except SyntaxError as e:
    raise UsageError(f"config file {path} line {e.lineno}: {e.msg}") from None
  except Exception as e:  # pylint: disable=broad-exception-caught (the file's own error, as one line)
    raise UsageError(f"config file {path} failed to load: {e} ({type(e).__name__}"
                     f"{', ' + _error_line_in(path, e).strip(' ()') if _error_line_in(path, e) else ''})"
                     ) from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise UsageError(f"config file {path} has no get_config() function")
  try:
    inspect.signature(get_config).bind(*args)
  except TypeError:
    raise UsageError(f"config file {path} takes no variant (got :{variant})" if args else
                     f"config file {path} needs a variant, {path}:<variant>") from None
  except ValueError:
    pass   # no signature to check (a builtin): call it
  try:
    config = get_config(*args)
  except Exception as e:  # pylint: disable=broad-exception-caught
    where = _error_line_in(path, e).strip(" ()")
    raise UsageError(f"config file {spec}: {e} ({type(e).__name__}{', ' + where if where else ''})"
                     ) from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise UsageError(f"config file {spec}: get_config() returned {type(config).__name__}, "
                     f"not an ml_collections.ConfigDict")
  return config


def _lookup(config: Any, dotted: str) -> tuple[bool, Any]:
  """``(found, value)`` of a dotted field; a missing field under a ``*_kwargs`` mapping counts as
  found (``value`` None): such mappings take new keys."""
  node = config
  parts = dotted.split(".")
  for i, part in enumerate(parts):
    if isinstance(node, (ml_collections.ConfigDict, Mapping)) and part in node:
      node = node[part]
      continue
    open_mapping = any(p.endswith(_OPEN_SUFFIX) for p in parts[:i])
    return open_mapping and isinstance(node, (ml_collections.ConfigDict, Mapping)), None
  return True, node


def flat_fields(config: Any, prefix: str = "") -> dict[str, Any]:
  """Every leaf field of a config by dotted name, in the config's order (empty mappings are leaves)."""
  out = {}
  for key, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, Mapping)) and len(value):
      out.update(flat_fields(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _check_overrides(argv: list[str], config: ml_collections.ConfigDict, spec: str) -> None:
  """Every ``--config.<field>`` must name a field of ``config`` (or a key of a ``*_kwargs`` mapping)."""
  for arg in argv:
    match = _OVERRIDE_ARG.match(arg)
    if not match:
      continue
    field = match.group(2)
    found, _ = _lookup(config, field)
    if not found:
      names = list(dict.fromkeys(list(config.keys()) + list(flat_fields(config))))
      close = difflib.get_close_matches(field, names, n=3, cutoff=0.6)
      hint = f"; did you mean {' or '.join(close)}?" if close else ""
      raise UsageError(f"{arg.split('=', 1)[0]}: {spec} has no field {field!r}{hint} "
                       f"(prox --help --config={spec} lists them)")


def _kind(value: Any) -> str:
  name = type(value).__name__
  return ("an " if name[0] in "aeiou" else "a ") + name


def _shown(value: Any) -> str:
  return repr(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value)


def _flag_error(error: flags.Error, config: ml_collections.ConfigDict | None) -> str:
  """absl's message as one line; a bad ``--config.<field>`` value names the field's type."""
  message = " ".join(str(error).split())
  match = re.match(r"^flag --(no)?config\.([^=\s]+)=", message)
  if match and config is not None:
    found, value = _lookup(config, match.group(2))
    if found and value is not None:
      reason = message[match.end():]
      given, sep, why = reason.partition(": ")
      if sep:
        return (f"--config.{match.group(2)}={given}: {why} (the field holds {_kind(value)}, "
                f"default {_shown(value)})")
  if isinstance(error, flags.UnrecognizedFlagError):
    return f"{message} (prox --help lists the flags)"
  order = re.match(r"^Found (\S+) in argv before a value for --config was specified", message)
  if order:
    return f"{order.group(1)} comes before --config=FILE; give --config first"
  return message


# --- quick mode ------------------------------------------------------------------------------------

def _overlaps(a: str, b: str) -> bool:
  """Whether dotted fields ``a`` and ``b`` are the same or one contains the other."""
  return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def quick_overrides(quick: Mapping[str, Any] | None, given: Iterable[str]) -> dict[str, Any]:
  """The fields of an experiment's ``QUICK`` to apply: all but those given on the command line (a
  given field also keeps the fields inside it, and a given ``a.b`` keeps a ``QUICK`` entry ``a``)."""
  given = list(given)
  return {k: v for k, v in (quick or {}).items() if not any(_overlaps(k, g) for g in given)}


def effective_config(config: ml_collections.ConfigDict, quick: Mapping[str, Any] | None,
                     given: Iterable[str]) -> ml_collections.ConfigDict:
  """``config`` with ``quick_overrides(quick, given)`` applied when ``config.quick`` is True."""
  if config.get("quick", False) is True and quick:
    config.update_from_flattened_dict(quick_overrides(quick, given))
  return config


def _given_fields() -> list[str]:
  """The config fields given on the command line (ml_collections records the overrides)."""
  return list(config_flags.get_override_values(flags.FLAGS["config"]))


# --- help ------------------------------------------------------------------------------------------

def _module_docstring(path: str | None) -> str:
  if not path or not os.path.isfile(path):
    return ""
  try:
    with open(path, encoding="utf-8") as f:
      return ast.get_docstring(ast.parse(f.read())) or ""
  except (OSError, SyntaxError, ValueError):
    return ""


def _shown_path(path: str) -> str:
  rel = os.path.relpath(path)
  return path if rel.startswith("..") else rel


def _experiment_summary(name: str) -> tuple[str, str | None]:
  """The first line of an experiment module's docstring (without importing it) and its config file."""
  spec = importlib.util.find_spec(EXPERIMENTS[name])
  first = (_module_docstring(spec.origin if spec else None).strip().splitlines() or [""])[0]
  first = re.sub(rf"^Experiment ``{re.escape(name)}``[^:]*:\s*", "", first)
  config = os.path.join(_CONFIGS_DIR, f"{name}.py")
  return first, (_shown_path(config) if os.path.isfile(config) else None)


def _usage() -> str:
  lines = ["usage: prox --config=FILE[:VARIANT] --workdir=DIR [--config.<field>=<value> ...]",
           "       prox --help [--config=FILE[:VARIANT]]   (the config's fields and their meaning)",
           "", "Runs the experiment that the config's `experiment` field names.", "", "Experiments:"]
  for name in EXPERIMENTS:
    summary, config = _experiment_summary(name)
    lines.append(f"  {name:<13}{summary}")
    if config:
      lines.append(f"  {'':<13}--config={config}")
  from prox.experiments import _runs  # pylint: disable=g-import-not-at-top
  lines += ["", "Flags:"]
  for flag, text in (
      ("--config=FILE[:VARIANT]", flags.FLAGS["config"].help),
      ("--config.<field>=<value>", "Overrides a field of the config (after --config). Keys of a "
       "*_kwargs mapping may be new: --config.optimizer_kwargs.nesterov=True."),
      ("--workdir=DIR", flags.FLAGS["workdir"].help),
      ("--coordinator_address=H:P, --num_processes=N, --process_id=I",
       "Multi-host set-up (default: from the cluster's environment)."),
      ("--verbosity=0", "absl/orbax INFO logs (default: warnings only)."),
      ("--helpfull", "Also lists every absl flag.")):
    lines.append(f"  {flag}")
    lines += textwrap.wrap(text, 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
  lines.append("")
  lines += textwrap.wrap(
      "Quick mode: --config.quick=True applies the experiment's QUICK fields (a small run), except the "
      "fields given on the command line.", 102)
  lines += textwrap.wrap(
      "Resuming: the first start writes WORKDIR/config.json (the experiment and its effective config); "
      "a later start with another experiment or config is refused, except for changes of "
      + ", ".join(_runs.RESUMABLE) + " (and fields the experiment adds; prox --help --config=FILE "
      "lists them).", 102)
  return "\n".join(lines)


def config_comments(path: str) -> tuple[list[str], dict[str, str], dict[str, str]]:
  """``(fields, trailing, group)`` of a config file's ``<var>.<field> = ...`` lines: the fields in
  the order the file assigns them, and by field the comment at the end of its line and the comment
  block right above it."""
  try:
    with open(path, encoding="utf-8") as f:
      source = f.read()
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
  except (OSError, SyntaxError, tokenize.TokenError, UnicodeDecodeError):
    return [], {}, {}
  comment_at = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}
  fields, trailing, group, block = [], {}, {}, []
  for number, line in enumerate(source.splitlines(), 1):
    stripped = line.strip()
    if stripped.startswith("#"):
      block.append(stripped.lstrip("#").strip())
      continue
    match = re.match(r"^\s*[A-Za-z_]\w*\.([A-Za-z_][\w.]*)\s*=[^=]", line)
    if match:
      field = match.group(1)
      if field not in fields:
        fields.append(field)
      if number in comment_at:
        trailing.setdefault(field, comment_at[number])
      if block:
        group.setdefault(field, " ".join(block))
    block = []
  return fields, trailing, group


def _config_help(spec: str, config: ml_collections.ConfigDict) -> str:
  path = spec.partition(":")[0]
  assigned, trailing, group = config_comments(path)
  name = config.get("experiment", "classify")
  lines = [f"{spec} (experiment {name})", ""]
  doc = _module_docstring(path)
  if doc:
    lines += [doc, ""]
  lines.append("Fields (override with --config.<field>=<value>):")
  fields = flat_fields(config)
  position = {field: i for i, field in enumerate(fields)}

  def source_order(field: str) -> tuple[int, int]:   # where the file assigns it (or its parent)
    parts = field.split(".")
    for i in range(len(parts), 0, -1):
      if ".".join(parts[:i]) in assigned:
        return assigned.index(".".join(parts[:i])), position[field]
    return len(assigned), position[field]

  for field in sorted(fields, key=source_order):
    if field in group:
      lines += textwrap.wrap(group[field], 102, initial_indent="  # ", subsequent_indent="  # ")
    value = fields[field]
    entry = f"  {field} = {_shown(value)}"
    comment = trailing.get(field)
    if comment:
      entry = f"{entry:<42} # {comment}" if len(entry) < 42 else f"{entry}  # {comment}"
    lines.append(entry)
  quick = _quick_of(name)
  if quick:
    lines += ["", "--config.quick=True sets (except fields given on the command line):"]
    lines += [f"  {k} = {v!r}" for k, v in quick.items()]
  resumable = _resumable_of(name)
  lines.append("")
  lines += textwrap.wrap("May change when the run resumes: " + ", ".join(resumable), 102)
  return "\n".join(lines)


def _experiment_module(name: str):
  return importlib.import_module(EXPERIMENTS[name])


def _quick_of(name: str) -> dict[str, Any]:
  if name not in EXPERIMENTS:
    return {}
  return dict(getattr(_experiment_module(name), "QUICK", None) or {})


def _resumable_of(name: str) -> tuple[str, ...]:
  from prox.experiments import _runs  # pylint: disable=g-import-not-at-top
  extra = tuple(getattr(_experiment_module(name), "RESUMABLE", ())) if name in EXPERIMENTS else ()
  return tuple(_runs.RESUMABLE) + tuple(f for f in extra if f not in _runs.RESUMABLE)


# --- flags -----------------------------------------------------------------------------------------

def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with one-line errors (``UsageError``) and prox's ``--help``."""
  argv = list(argv)
  want_help = [a for a in argv[1:] if _HELP_ARG.match(a)]
  argv = [argv[0]] + [a for a in argv[1:] if not _HELP_ARG.match(a)]
  spec = _config_arg(argv[1:])
  config = None
  if spec is not None:
    config = load_config(spec)
    _check_overrides(argv[1:], config, spec)
  elif any(_OVERRIDE_ARG.match(a) for a in argv[1:]):
    first = next(a for a in argv[1:] if _OVERRIDE_ARG.match(a))
    raise UsageError(f"{first} needs --config=<file> before it")
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    raise UsageError(_flag_error(e, config)) from None
  except Exception as e:  # pylint: disable=broad-exception-caught (ml_collections' own errors)
    raise UsageError(f"{type(e).__name__}: {e}") from None
  if _CONFIG.value is not None:
    _CONFIG.value.lock()
  if want_help:
    if spec is None:
      print(_usage())
    else:
      cfg = _CONFIG.value
      effective_config(cfg, _quick_of(cfg.get("experiment", "classify")), _given_fields())
      print(_config_help(spec, cfg))
    if "--helpfull" in want_help or "-helpfull" in want_help:
      print("\nabsl flags:\n" + flags.FLAGS.get_help())
    sys.exit(0)
  return rest


def _parse_flags_or_fail(argv: list[str]) -> list[str]:
  try:
    return parse_flags(argv)
  except UsageError as e:
    _fail(str(e))


# --- main ------------------------------------------------------------------------------------------

def main(argv: list[str]) -> None:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # orbax and absl INFO chatter only with --verbosity=0
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; use --config.<field>=<value> to override config fields")
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None:
    _fail("--config is required, e.g. --config=prox/experiments/configs/classify.py (prox --help "
          "lists the experiments)")
  if not workdir:
    _fail("--workdir is required (the run's output and checkpoint directory)")
  name = config.get("experiment", "classify")
  if name not in EXPERIMENTS:
    _fail(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")

  from prox import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from prox.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from prox.loop import Diverged  # pylint: disable=g-import-not-at-top
  from prox.experiments import _runs  # pylint: disable=g-import-not-at-top
  from prox.experiments.common import ConfigError  # pylint: disable=g-import-not-at-top
  experiment = _experiment_module(name)
  try:
    config = effective_config(config, getattr(experiment, "QUICK", None), _given_fields())
  except (TypeError, ValueError, KeyError, AttributeError) as e:
    _fail(f"{name}.QUICK does not fit the config: {e}")
  try:
    experiment.validate(config, workdir)
    fresh = _runs.read_record(workdir) is None
    _runs.check_config(workdir, _runs.record(name, config), _resumable_of(name))
  except ConfigError as e:
    _fail(str(e))
  try:
    final = experiment.run(config, workdir)
  except ConfigError as e:   # found only at run time, e.g. a TFDS dataset that is not prepared
    if fresh:   # nothing ran: a corrected start must not be refused for differing from this one
      _runs.remove_record(workdir)
    _fail(str(e))
  except CheckpointError as e:   # checkpoints in the workdir, none of which restores
    _fail(f"{e}; move them away to start over, or use a new --workdir")
  except Diverged as e:   # not bad input: the run failed; its last finite checkpoint is kept
    print(f"prox: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))


def run() -> None:
  """Console-script entry point."""
  app.run(main, flags_parser=_parse_flags_or_fail)


if __name__ == "__main__":
  run()
