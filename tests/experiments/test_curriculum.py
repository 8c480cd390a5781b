"""The `curriculum` experiment: the PS-KD loss against a hand-written reference, bad config values as
one-line errors through the CLI (before anything compiles) and from ``validate``; marked slow (about
23 s of CPU): a quick end-to-end run of every part (plus its reuse when run again)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from prox import models
from prox import step as step_lib
from prox.experiments import curriculum
from prox.experiments.configs import curriculum as curriculum_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "prox" / "experiments" / "configs" / "curriculum.py"


def _cli(workdir, *overrides):
  cmd = [sys.executable, "-m", "prox.experiments.main", f"--config={CONFIG}:quick", f"--workdir={workdir}",
         *overrides]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


BAD_CLI = [
    (("--config.parts=alp_gmm,teacher",), "unknown part 'teacher' in parts; known: alp_gmm, pudf, pskd, forecast"),
    (("--config.alp_gmm.bounds=((0.0, 0.5), (1.0, 0.5))",),
     "alp_gmm: bounds need low < high in every dimension, got low=[0.0, 0.5] high=[1.0, 0.5]"),
    (("--config.alp_gmm.fit_rate=0",), "alp_gmm.fit_rate must be a positive integer, got 0"),
]


def test_bad_config_values_are_one_line_cli_errors_before_compilation(tmp_path):
  procs = [(_cli(tmp_path / f"w{i}", *flags), message) for i, (flags, message) in enumerate(BAD_CLI)]
  for i, (proc, message) in enumerate(procs):
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert stderr.strip() == f"prox: error: {message}"
    assert not stdout
    assert not (tmp_path / f"w{i}" / "results.json").exists()   # nothing ran


BAD = [
    ({"alp_gmm__fit_rate": -5}, "alp_gmm.fit_rate must be a positive integer, got -5"),
    ({"alp_gmm__fit_rate": 5}, "alp_gmm: ks must lie in 1..fit_rate=5, got [2, 3, 4, 5, 6, 7, 8, 9, 10]"),
    ({"alp_gmm__bounds": ((0.0,), (1.0,))},
     "alp_gmm.bounds must be a pair (low, high) of 2-vectors (the toy env is 2-D), got ((0.0,), (1.0,))"),
    ({"alp_gmm__episodes": 1100}, "alp_gmm.episodes (1100) must be a multiple of alp_gmm.score_every (250)"),
    ({"parts": ""}, "parts names no part; known: alp_gmm, pudf, pskd, forecast"),
    ({"parts": "pudf", "pudf__bump": 0.0}, "pudf: bump must be > 0, got 0.0"),
    ({"parts": "pudf", "pudf__crowd_size": 1}, "pudf.crowd_size must be an integer >= 2, got 1"),
    ({"parts": "pskd", "pskd__alpha_T": 1.5}, "pskd: alpha_T must be in [0, 1], got 1.5"),
    ({"parts": "pskd", "model": "vit"}, "unknown model 'vit'; known: mlp, cnn, resnet20"),
    ({"parts": "forecast", "forecast__fractions": (0.5, 1.0)},
     "forecast.fractions must lie in (0, 1), got (0.5, 1.0)"),
    ({"parts": "forecast", "forecast__min_gain": -0.1}, "forecast.min_gain must be >= 0, got -0.1"),
]


@pytest.mark.parametrize("fields,message", BAD)
def test_bad_config_values_raise_config_errors(tmp_path, fields, message):
  cfg = curriculum_config.get_config("quick")
  for dotted, value in fields.items():
    *parents, leaf = dotted.split("__")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  with pytest.raises(curriculum.ConfigError) as e:
    curriculum.validate(cfg, str(tmp_path))
  assert str(e.value) == message


def test_pskd_loss_uses_soft_targets_and_writes_the_store():
  net = models.functional(models.make_model("mlp", input_shape=(8, 8, 1), num_classes=4, seed=0, hidden=(8,)))
  loss_fn = curriculum._classifier_loss(net.apply, num_classes=4, use_pskd=True, num_epochs=4, alpha_T=0.8)
  rng = np.random.default_rng(0)
  n = 10
  stored = rng.dirichlet(np.ones(4), size=n).astype(np.float32)
  seen = np.array([1, 0] * 5, np.float32)
  batch = {"image": rng.normal(size=(4, 8, 8, 1)).astype(np.float32), "label": np.array([0, 1, 2, 3], np.int32),
           "index": np.array([2, 3, 7, 2], np.int32), "valid": np.array([True, True, True, False]),
           "epoch": np.full(4, 1, np.int32)}
  model_state = {"net": {}, "pskd": {"predictions": stored, "seen": seen}}
  # the loss reads the data-axis size, so evaluate it under a one-device shard_map as the step does
  mesh = step_lib.data_mesh(jax.devices()[:1])
  run = jax.jit(jax.shard_map(lambda p, m, b: loss_fn(p, m, b, None), mesh=mesh,
                              in_specs=(jax.P(), jax.P(), jax.P()), out_specs=jax.P(), check_vma=False))
  loss, (metrics, new_state) = run(net.params, model_state, batch)

  logits = np.asarray(net.apply(net.params, {}, batch["image"], train=False)[0], np.float64)
  a = 0.8 * (1 + 1) / 4
  ref_loss, probs = [], []
  for z, y, i, v in zip(logits, batch["label"], batch["index"], batch["valid"]):
    onehot = np.eye(4)[y]
    past = stored[i] if seen[i] else onehot
    target = (1 - a) * onehot + a * past
    logp = z - np.log(np.sum(np.exp(z)))
    probs.append(np.exp(logp))
    if v:
      ref_loss.append(-np.sum(target * logp))
  np.testing.assert_allclose(loss, np.mean(ref_loss), rtol=1e-5)
  expected = stored.copy()
  expected_seen = seen.copy()
  for row, i in enumerate(batch["index"][:3]):   # the padded 4th row writes nothing
    expected[i] = probs[row]
    expected_seen[i] = 1.0
  np.testing.assert_allclose(new_state["pskd"]["predictions"], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(new_state["pskd"]["seen"], expected_seen)


@pytest.mark.slow   # about 23 s of CPU
def test_quick_run_of_every_part_end_to_end_and_reuse(tmp_path):
  cfg = curriculum_config.get_config("quick")
  cfg.progress = False
  summary = curriculum.run(cfg, str(tmp_path))
  with open(tmp_path / "results.json") as fh:
    saved = json.load(fh)
  results = saved["results"]
  assert set(results) == {"alp_gmm", "pudf", "pskd", "forecast"}
  for name in ("alp_gmm_mastery.png", "alp_gmm_samples.png", "pudf_accuracy.png", "pskd_accuracy.png",
               "forecast.png", "results.md"):
    assert (tmp_path / name).stat().st_size > 0, name

  a = results["alp_gmm"]
  for t in a["teachers"].values():
    scores = np.asarray(t["scores"])
    assert scores.shape == (2, 1_000 // 250 + 1)
    assert np.all(np.diff(scores, axis=1) >= 0) and scores.max() <= 100   # mastery never falls
  assert np.asarray(a["alp_gmm_tasks_seed0"]).shape == (1_000, 2)
  assert summary["alp_gmm/alp_gmm_mastered_mean"] == np.asarray(a["teachers"]["alp_gmm"]["scores"])[:, -1].mean()

  p = results["pudf"]
  pudf, rand, plain = (p["runs"][k][0] for k in ("pudf", "random", "plain"))
  assert len(pudf["accuracy"]) == 3 and all(0 <= x <= 1 for x in pudf["accuracy"])
  assert all(cfg.batch_size <= c <= p["num_items"] for c in pudf["items"])
  assert rand["items"] == pudf["items"] and plain["items"] == [p["num_items"]] * 3
  assert np.all(np.diff(pudf["theta"]) >= 0)                      # the PUDF threshold never falls
  assert len(p["difficulties"]) == p["num_items"]
  steps = -(-p["num_items"] // cfg.batch_size)
  assert plain["steps"] == [steps, 2 * steps, 3 * steps]

  s = results["pskd"]["runs"]
  for method in ("ce", "pskd"):
    assert len(s[method][0]["accuracy"]) == 3 and 0 <= s[method][0]["ece"] <= 1

  f = results["forecast"]
  assert f["steps"][-1] == 200 and len(f["steps"]) == 10
  assert [x["fraction"] for x in f["at_fraction"]] == [0.5, 0.75]
  for x in f["at_fraction"]:
    assert x["lower"] <= x["predicted"] <= x["upper"]

  started = time.perf_counter()   # the same command again reuses every finished part
  again = curriculum.run(cfg, str(tmp_path))
  assert again == summary
  assert time.perf_counter() - started < 10
