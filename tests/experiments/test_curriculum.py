"""The `curriculum` experiment: the PS-KD loss against a hand-written float64 reference, the PS-KD store
written inside the compiled step, bad config values as one-line errors through the CLI (before anything
compiles) and from ``validate``; marked slow: a quick end-to-end run of every part on ``prox.loop`` (plus
its reuse when run again)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from prox import models
from prox import step as step_lib
from prox.experiments import curriculum
from prox.experiments.configs import curriculum as curriculum_config
from prox.losses import classification_loss
from prox.tasks import pskd

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "prox" / "experiments" / "configs" / "curriculum.py"


def _quick_config():
  cfg = curriculum_config.get_config()
  cfg.update_from_flattened_dict(curriculum.QUICK)   # what ``--config.quick=True`` does in ``prox``
  cfg.progress = False
  return cfg


def _cli(workdir, *overrides):
  cmd = [sys.executable, "-m", "prox.experiments.main", f"--config={CONFIG}", f"--workdir={workdir}",
         "--config.quick=True", *overrides]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


BAD_CLI = [
    (("--config.parts=alp_gmm,teacher",), "parts: unknown 'teacher'; known: alp_gmm, pudf, pskd, forecast"),
    (("--config.alp_gmm.bounds=((0.0, 0.5), (1.0, 0.5))",),
     "alp_gmm: bounds need low < high in every dimension, got low=[0.0, 0.5] high=[1.0, 0.5]"),
    (("--config.alp_gmm.fit_rate=0",), "alp_gmm.fit_rate must be an integer >= 1, got 0"),
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
    ({"alp_gmm__fit_rate": -5}, "alp_gmm.fit_rate must be an integer >= 1, got -5"),
    ({"alp_gmm__fit_rate": 5}, "alp_gmm: ks must lie in 1..fit_rate=5, got [2, 3, 4, 5, 6, 7, 8, 9, 10]"),
    ({"alp_gmm__bounds": ((0.0,), (1.0,))},
     "alp_gmm.bounds must be a pair (low, high) of 2-vectors (the toy env is 2-D), got ((0.0,), (1.0,))"),
    ({"alp_gmm__episodes": 1100}, "alp_gmm.episodes (1100) must be a multiple of alp_gmm.score_every (250)"),
    ({"parts": ""}, "parts is empty"),
    ({"parts": "pudf,pudf"}, "parts names a part twice: 'pudf,pudf'"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"parts": "pudf", "pudf__bump": 0.0}, "pudf: bump must be > 0, got 0.0"),
    ({"parts": "pudf", "pudf__crowd_size": 1}, "pudf.crowd_size must be an integer >= 2, got 1"),
    ({"parts": "pudf", "pudf__crowd_hidden": (0,)},
     "pudf.crowd_hidden: hidden must be a tuple of positive ints, got (0,)"),
    ({"parts": "pskd", "pskd__alpha_T": 1.5}, "pskd: alpha_T must be in [0, 1], got 1.5"),
    ({"parts": "pskd", "batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"parts": "pskd", "model": "vit"}, "unknown model 'vit'; known: mlp, cnn, resnet20, cnn1d"),
    ({"parts": "forecast", "forecast__fractions": (0.5, 1.0)},
     "forecast.fractions must lie in (0, 1), got (0.5, 1.0)"),
    ({"parts": "forecast", "forecast__min_gain": -0.1},
     "forecast.min_gain must be a finite number in [0, inf], got -0.1"),
]


@pytest.mark.parametrize("fields,message", BAD)
def test_bad_config_values_raise_config_errors(tmp_path, fields, message):
  cfg = _quick_config()
  for dotted, value in fields.items():
    *parents, leaf = dotted.split("__")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  with pytest.raises(curriculum.ConfigError) as e:
    curriculum.validate(cfg, str(tmp_path))
  assert str(e.value) == message


def _toy_net(num_classes=4):
  return models.functional(models.make_model("mlp", input_shape=(8, 8, 1), num_classes=num_classes, seed=0,
                                             hidden=(8,)))


def _softmax64(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_pskd_loss_matches_a_float64_hand_reference():
  # the experiment's loss: classification_loss with PS-KD targets read from ctx.extra / ctx.meta
  net, n, c, T = _toy_net(), 10, 4, 4
  loss_fn = classification_loss(net.apply, targets_fn=pskd.targets_fn(num_epochs=T, alpha_T=0.8))
  rng = np.random.default_rng(0)
  stored = rng.dirichlet(np.ones(c), size=n).astype(np.float32)
  seen = np.array([True, False] * 5)
  batch = {"image": rng.normal(size=(5, 8, 8, 1)).astype(np.float32), "label": np.array([0, 1, 2, 3, 1], np.int32),
           "index": np.array([2, 3, 7, 2, 4], np.int32)}
  ctx = step_lib.LossContext(rng=None, step=0, samples=0, extra={"pskd": pskd.PSKDState(stored, seen)},
                             meta={"epoch": np.int32(1)})
  loss, (metrics, _) = jax.jit(loss_fn)(net.params, net.model_state, batch, ctx)

  logits = np.asarray(net.apply(net.params, net.model_state, batch["image"], train=True)[0], np.float64)
  a = 0.8 * (1 + 1) / T                                  # alpha_t = alpha_T (t + 1) / T at epoch t = 1
  ref = []
  for z, y, i in zip(logits, batch["label"], batch["index"]):
    onehot = np.eye(c)[y]
    target = (1 - a) * onehot + a * (stored[i] if seen[i] else onehot)   # unseen: one-hot
    ref.append(-np.sum(target * np.log(_softmax64(z))))
  np.testing.assert_allclose(float(loss), np.mean(ref), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(logits.argmax(-1) == batch["label"]))
  # epoch 0 with an empty store is plain cross-entropy
  ctx0 = ctx._replace(extra={"pskd": pskd.init(n, c)}, meta={"epoch": np.int32(0)})
  ce = np.mean([-np.log(_softmax64(z)[y]) for z, y in zip(logits, batch["label"])])
  np.testing.assert_allclose(float(jax.jit(loss_fn)(net.params, net.model_state, batch, ctx0)[0]), ce, rtol=1e-5)


def test_pskd_store_is_written_inside_the_step():
  net, n, c = _toy_net(), 12, 4
  tx = optax.sgd(0.1)
  mesh = step_lib.data_mesh(jax.devices()[:1])
  step = curriculum.pskd_steps(net.apply, tx, mesh, num_epochs=3, alpha_T=0.8)["pskd"]
  rng = np.random.default_rng(1)
  previous = rng.dirichlet(np.ones(c), size=n).astype(np.float32)
  seen = np.zeros(n, bool)
  seen[[0, 5]] = True
  state = step_lib.replicate(step_lib.init_state(net.params, tx, model_state=net.model_state,
                                                 extra={"pskd": pskd.PSKDState(previous, seen)}, seed=0), mesh)
  batch = {"image": rng.normal(size=(4, 8, 8, 1)).astype(np.float32), "label": np.array([0, 1, 2, 3], np.int32),
           "index": np.array([5, 1, 9, 3], np.int32)}
  before = jax.device_get(state.params)
  new, out = step(state, step_lib.shard_batch(batch, mesh), None, {"epoch": np.int32(2)})
  store = jax.device_get(new.extra["pskd"])

  probs = _softmax64(net.apply(before, net.model_state, batch["image"], train=True)[0])   # the step's forward
  expected = previous.copy()
  expected[batch["index"]] = probs
  np.testing.assert_allclose(store.predictions, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(store.seen, np.isin(np.arange(n), [0, 5, 1, 9, 3]))
  # the step's loss read the store as it was before the step (row 5 seen, the others one-hot)
  a = 0.8
  targets = (1 - a) * np.eye(c)[batch["label"]] + a * np.where(seen[batch["index"]][:, None],
                                                               previous[batch["index"]], np.eye(c)[batch["label"]])
  ref = np.mean(-np.sum(targets * np.log(probs), -1))
  np.testing.assert_allclose(float(out.metrics["loss"]), ref, rtol=1e-5)
  changed = [not np.allclose(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(new.params)))]
  assert any(changed)   # the update happened (the store was written from the parameters before it)


@pytest.mark.slow   # about 40 s of CPU (every part, compiles included)
def test_quick_run_of_every_part_end_to_end_and_reuse(tmp_path):
  cfg = _quick_config()
  summary = curriculum.run(cfg, str(tmp_path))
  saved = json.loads((tmp_path / "results.json").read_text())
  results = saved["results"]
  assert set(results) == {"alp_gmm", "pudf", "pskd", "forecast"}
  assert saved["summary"] == summary
  for name in ("alp_gmm_mastery.png", "alp_gmm_samples.png", "pudf_accuracy.png", "pskd_accuracy.png",
               "forecast.png", "results.md"):
    assert (tmp_path / name).stat().st_size > 0, name

  a = results["alp_gmm"]
  for t in a["teachers"].values():
    scores = np.asarray(t["scores"])
    assert scores.shape == (2, 1_000 // 250 + 1)
    assert np.all(np.diff(scores, axis=1) >= 0) and scores.max() <= 100   # mastery never falls
  tasks = json.loads((tmp_path / "alp_gmm" / "result.json").read_text())["alp_gmm_tasks_seed0"]
  assert np.asarray(tasks).shape == (1_000, 2)
  assert summary["alp_gmm/alp_gmm_mastered_mean"] == np.asarray(a["teachers"]["alp_gmm"]["scores"])[:, -1].mean()

  p = results["pudf"]
  pudf_run, rand, plain = (p["runs"][k][0] for k in ("pudf", "random", "plain"))
  n = p["num_items"]
  assert len(pudf_run["accuracy"]) == 3 and all(0 <= x <= 1 for x in pudf_run["accuracy"])
  assert all(cfg.batch_size <= c <= n for c in pudf_run["items"])
  assert rand["items"] == pudf_run["items"] and plain["items"] == [n] * 3
  assert np.all(np.diff(pudf_run["theta"]) >= 0)                  # the PUDF threshold never falls
  assert len(pudf_run["theta"]) == len(pudf_run["theta_hat"]) == 3
  assert len(p["difficulties"]) == n
  per_epoch = -(-n // cfg.batch_size)                             # every epoch's last batch is completed
  assert plain["steps"] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
  assert np.diff([0] + pudf_run["steps"]).tolist() == [-(-c // cfg.batch_size) for c in pudf_run["items"]]

  s = results["pskd"]["runs"]
  for method in ("ce", "pskd"):
    assert len(s[method][0]["accuracy"]) == 3 and 0 <= s[method][0]["ece"] <= 1
  # cross-entropy trains exactly like PUDF's "plain" run (same seed, initialisation, batches and step)
  assert s["ce"][0]["accuracy"] == plain["accuracy"]
  assert s["pskd"][0]["accuracy"] != s["ce"][0]["accuracy"]

  f = results["forecast"]
  assert f["steps"][-1] == 200 and len(f["steps"]) == 10
  assert [x["fraction"] for x in f["at_fraction"]] == [0.5, 0.75]
  for x in f["at_fraction"]:
    assert x["lower"] <= x["predicted"] <= x["upper"]

  started = time.perf_counter()   # the same command again reuses every finished run
  again = curriculum.run(cfg, str(tmp_path))
  assert again == summary
  assert time.perf_counter() - started < 15
