"""Tests for prox.experiments.report's run logs: JSON lines, TensorBoard events, progress bar, plots, summary."""
import io
import json
import re
import struct
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from prox.experiments import report
from prox.experiments.report import MetricWriter, plot_curves, read_metrics, write_summary


def read_events(path):
  """(tag, step, value) of every scalar in a TFRecord event file, checking the record CRCs."""
  data, pos, out = path.read_bytes(), 0, []
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
    body = data[pos + 12:pos + 12 + length]
    assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked_crc32c(body)
    event = event_pb2.Event.FromString(body)
    out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    pos += 16 + length
  return out


def all_scalars(workdir):
  return sorted(s for f in sorted((workdir / "tb").iterdir()) for s in read_events(f))


def test_json_lines_content_and_append_on_resume(tmp_path):
  t0 = time.time()
  with MetricWriter(tmp_path, total_steps=10, tensorboard=False) as w:
    w.write(1, {"loss": 2.5, "accuracy": np.float32(0.25), "examples": 64})
    w.write(2, {"loss": jnp.float32(1.5), "lr": jnp.array(0.1, jnp.bfloat16)})
    # Flushed on each call: readable before close (a killed run keeps it).
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    w.write(2, {"accuracy": 0.5}, split="test")
  first = (tmp_path / "metrics.jsonl").read_text()
  records = [json.loads(line) for line in first.splitlines()]
  assert all(t0 <= r.pop("time") <= time.time() for r in records)
  assert records == [
      {"step": 1, "split": "train", "loss": 2.5, "accuracy": 0.25, "examples": 64},
      {"step": 2, "split": "train", "loss": 1.5, "lr": 0.10009765625},
      {"step": 2, "split": "test", "accuracy": 0.5}]
  assert isinstance(records[0]["examples"], int)
  with MetricWriter(tmp_path, total_steps=10, tensorboard=False) as w:   # resume
    w.write(3, {"loss": 1.0})
  text = (tmp_path / "metrics.jsonl").read_text()
  assert text.startswith(first) and len(text.splitlines()) == 4
  assert read_metrics(tmp_path / "metrics.jsonl")[-1]["loss"] == 1.0


def test_rewrite_lines_for_object_stores_matches_append(tmp_path):
  """The gs:// path (rewrite whole file) gives the same bytes as the local append path."""
  for name, cls in (("a.jsonl", report._AppendLines), ("r.jsonl", report._RewriteLines)):
    (tmp_path / name).write_text('{"step": 0}\n{"step": 1, "spl')   # a run killed mid-line
    lines = cls(epath.Path(tmp_path / name))
    lines.append('{"step": 1}')
    lines.append('{"step": 2}')
    assert len((tmp_path / name).read_text().splitlines()) == 3   # visible before close
    lines.close()
    assert (tmp_path / name).read_text() == '{"step": 0}\n{"step": 1}\n{"step": 2}\n'


def _scalars_once_written(workdir, expected, timeout=10.0):
  """``all_scalars(workdir)`` once it holds every scalar in ``expected``, or after ``timeout`` seconds
  (tensorboardX writes on a thread; the writer flushes it every second)."""
  deadline = time.time() + timeout
  while True:
    try:
      got = all_scalars(workdir)
    except (struct.error, AssertionError):   # a record caught half-written
      got = []
    if set(expected) <= set(got) or time.time() > deadline:
      return got
    time.sleep(0.05)


def test_tensorboard_event_files_readable_and_grow(tmp_path):
  with MetricWriter(tmp_path, total_steps=10) as w:
    w.write(1, {"loss": 2.0, "accuracy": 0.125})
    event_file = next((tmp_path / "tb").iterdir())
    step_1 = [("train/accuracy", 1, 0.125), ("train/loss", 1, 2.0)]
    # On disk before close (a killed run keeps them).
    assert _scalars_once_written(tmp_path, step_1) == step_1
    size = event_file.stat().st_size
    w.write(2, {"loss": 1.0})
    assert _scalars_once_written(tmp_path, [("train/loss", 2, 1.0)]) == step_1 + [("train/loss", 2, 1.0)]
    assert event_file.stat().st_size > size
    w.write(2, {"accuracy": 0.75}, split="test")
  assert all_scalars(tmp_path) == [("test/accuracy", 2, 0.75), ("train/accuracy", 1, 0.125),
                                   ("train/loss", 1, 2.0), ("train/loss", 2, 1.0)]
  with MetricWriter(tmp_path, total_steps=10) as w:   # resume adds events beside the old ones
    w.write(3, {"loss": 0.5})
  assert ("train/loss", 3, 0.5) in all_scalars(tmp_path) and len(all_scalars(tmp_path)) == 5


def test_progress_bar_shows_metrics_and_rate(tmp_path, monkeypatch):
  class Tty(io.StringIO):
    def isatty(self):
      return True
  monkeypatch.setattr(sys, "stderr", Tty())
  w = MetricWriter(tmp_path, total_steps=10, tensorboard=False)
  w.write(4, {"loss": 0.375, "accuracy": 0.8125})
  w.write(4, {"accuracy": 0.5}, split="test")
  time.sleep(0.05)
  rate = w.update(5, num_examples=100)
  assert 0 < rate <= 100 / 0.05
  w.close()
  shown = sys.stderr.getvalue()
  assert "5/10" in shown and "loss=0.375" in shown and "acc=0.8125" in shown
  assert "test_acc=0.5" in shown and "ex/s=" in shown


def test_progress_bar_off_when_not_tty_or_disabled(tmp_path, monkeypatch, capsys):
  w = MetricWriter(tmp_path, total_steps=10, tensorboard=False)   # pytest's stderr is not a tty
  w.update(3, 10)
  w.close()
  monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
  w = MetricWriter(tmp_path, total_steps=10, tensorboard=False, progress=False)
  w.update(3, 10)
  w.close()
  assert capsys.readouterr().err == ""


def test_only_main_process_writes(tmp_path):
  with MetricWriter(tmp_path / "run", total_steps=5, main_process=False) as w:
    w.write(1, {"loss": 1.0})
    assert w.update(1, 8) > 0
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("metrics, match", [
    ({"loss": np.ones(3)}, "loss"), ({"name": "abc"}, "name"), ({"flag": True}, "flag"),
    ({"step": 1.0}, "reserved"), ({"z": 1 + 2j}, "z")])
def test_bad_metrics_raise(tmp_path, metrics, match):
  with MetricWriter(tmp_path, total_steps=5, tensorboard=False) as w:
    with pytest.raises(ValueError, match=match):
      w.write(1, metrics)


@pytest.mark.parametrize("total_steps", [-1, 2.5, True])
def test_bad_total_steps_raise(tmp_path, total_steps):
  with pytest.raises(ValueError, match="total_steps"):
    MetricWriter(tmp_path, total_steps=total_steps)


def test_plot_curves_png(tmp_path):
  with MetricWriter(tmp_path, total_steps=50, tensorboard=False) as w:
    for step in range(1, 51):
      w.write(step, {"loss": 2.0 / step, "accuracy": 1 - 1.0 / step})
      if step % 10 == 0:
        w.write(step, {"accuracy": 1 - 1.5 / step}, split="test")
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 51, "split": "tra')              # a run killed mid-line
  plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
  png = (tmp_path / "curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1024
  width, height = struct.unpack(">II", png[16:24])
  assert (width, height) == (900, 320)                 # two panels (loss, accuracy), 4.5 x 3.2 in each


def test_plot_curves_without_metrics_raises(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "time": 0.0}\n')
  with pytest.raises(ValueError, match="no metrics"):
    plot_curves(tmp_path / "metrics.jsonl", tmp_path / "c.png")


def test_read_metrics_rejects_corruption_before_last_line(tmp_path):
  (tmp_path / "m.jsonl").write_text('{"step": 1\n{"step": 2, "split": "train"}\n')
  with pytest.raises(json.JSONDecodeError):
    read_metrics(tmp_path / "m.jsonl")


def test_write_summary(tmp_path):
  write_summary(tmp_path / "run", {"test": {"accuracy": np.float32(0.875), "steps": np.int64(7)},
                                   "method": "adagrad_norm", "curve": [1, 2.5], "ok": True})
  assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {
      "test": {"accuracy": 0.875, "steps": 7}, "method": "adagrad_norm", "curve": [1, 2.5],
      "ok": True}
  with pytest.raises(ValueError, match=r"metrics\.x\[0\]"):
    write_summary(tmp_path, {"x": [np.ones(2)]})


# --- strict JSON ------------------------------------------------------------------------------------

def _strict_loads(text):
  """``json.loads`` that refuses the non-standard NaN / Infinity / -Infinity tokens, as strict
  parsers (JavaScript's JSON.parse, Go's encoding/json) do."""
  def refuse(token):
    raise ValueError(f"non-standard JSON token {token}")
  return json.loads(text, parse_constant=refuse)


def test_non_finite_metrics_are_strict_json_and_read_back(tmp_path):
  with MetricWriter(tmp_path, total_steps=3, tensorboard=False, progress=False) as w:
    w.write(1, {"loss": np.float32("nan"), "grad_norm": jnp.inf, "log_lr": -np.inf, "acc": 0.5})
    w.write(2, {"loss": 1.25}, split="test")
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  with pytest.raises(ValueError, match="non-standard"):   # the parser does refuse bare tokens
    _strict_loads('{"loss": NaN}')
  first = _strict_loads(lines[0])
  assert (first["loss"], first["grad_norm"], first["log_lr"], first["acc"]) == (
      "NaN", "Infinity", "-Infinity", 0.5)
  assert _strict_loads(lines[1])["loss"] == 1.25
  records = read_metrics(tmp_path / "metrics.jsonl")
  assert np.isnan(records[0]["loss"]) and records[0]["grad_norm"] == np.inf
  assert records[0]["log_lr"] == -np.inf and records[0]["split"] == "train"
  plot_curves(tmp_path / "metrics.jsonl", tmp_path / "c.png")   # NaN / inf points are drawn as gaps


def test_write_summary_is_strict_json(tmp_path):
  write_summary(tmp_path, {"test": {"loss": np.float64("inf"), "accuracy": float("nan")},
                           "curve": [1.0, -np.inf, jnp.float32(2.5)], "name": "NaN"})
  got = _strict_loads((tmp_path / "metrics.json").read_text())
  assert got == {"test": {"loss": "Infinity", "accuracy": "NaN"},
                 "curve": [1.0, "-Infinity", 2.5], "name": "NaN"}
  assert float(got["test"]["loss"]) == np.inf and np.isnan(float(got["test"]["accuracy"]))


def test_dumps_and_to_json(tmp_path):
  assert report.dumps({"a": (np.int64(3), np.nan), 2: None}, sort_keys=True) == \
      '{"2": null, "a": [3, "NaN"]}'
  with pytest.raises(ValueError, match=r"value\.a\[1\]"):
    report.to_json({"a": [1, np.ones(2)]})


# --- progress lines when stdout is not a terminal ------------------------------------------------------

class _Tty(io.StringIO):
  def isatty(self):
    return True


_LINE = r"step {step}/300 \({pct}%\) loss={loss} acc={acc}{test} \d+(\.\d+)?(e[-+]\d+)? s/100 steps"


def test_progress_lines_when_stdout_is_not_a_tty(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "stdout", io.StringIO())      # a CI log: neither is a terminal
  monkeypatch.setattr(sys, "stderr", io.StringIO())
  with MetricWriter(tmp_path, total_steps=300, tensorboard=False, line_interval=0) as w:
    w.update(0, 0)
    for step in range(1, 301):
      w.update(step, 8)
      if step % 100 == 0:
        w.write(step, {"loss": 1.0 / step, "accuracy": step / 400})
        w.write(step, {"accuracy": 0.5}, split="test")   # no line for a test record
  lines = sys.stdout.getvalue().splitlines()
  assert len(lines) == 3, lines
  assert re.fullmatch(_LINE.format(step=100, pct=33, loss="0.01", acc="0.25", test=""), lines[0])
  assert re.fullmatch(_LINE.format(step=200, pct=66, loss="0.005", acc="0.5", test=" test_acc=0.5"),
                      lines[1]), lines[1]
  assert re.fullmatch(_LINE.format(step=300, pct=100, loss="0.003333", acc="0.75",
                                   test=" test_acc=0.5"), lines[2]), lines[2]
  assert sys.stderr.getvalue() == ""                      # no bar without a terminal


def test_progress_lines_are_rate_limited_but_the_last_step_is_printed(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "stdout", io.StringIO())
  with MetricWriter(tmp_path, total_steps=300, tensorboard=False, line_interval=3600) as w:
    w.update(200, 0)                                      # a resumed run starts at step 200
    for step in (220, 240, 260, 280, 300):
      w.write(step, {"loss": 0.5})
  lines = sys.stdout.getvalue().splitlines()
  assert [line.split()[1] for line in lines] == ["220/300", "300/300"]


def test_no_progress_lines_on_a_terminal_or_when_disabled(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "stdout", _Tty())
  monkeypatch.setattr(sys, "stderr", _Tty())
  with MetricWriter(tmp_path / "a", total_steps=10, tensorboard=False, line_interval=0) as w:
    w.write(10, {"loss": 0.5})                            # the bar shows it
  assert sys.stdout.getvalue() == ""
  monkeypatch.setattr(sys, "stdout", io.StringIO())
  with MetricWriter(tmp_path / "b", total_steps=10, tensorboard=False, progress=False) as w:
    w.write(10, {"loss": 0.5})
  assert sys.stdout.getvalue() == ""
