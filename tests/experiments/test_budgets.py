"""The `budgets` experiment: its in-step pieces against hand computations (the decaying budget stepped by the
compiled step and read by the loss, DP-SGD's Poisson batches with weight-0 padding and the expected-batch
normalisation of the clipped gradient, the forgotten set excluded from fine-tuning, the DDPM chain's step
log-probabilities, the matched baseline width, the staged source's resume), bad config values as one-line
errors, and end-to-end runs (one part here; every part in quick mode, slow) that a rerun reads back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from prox import models
from prox import step as step_lib
from prox import tasks
from prox.experiments import budgets
from prox.experiments import common
from prox.experiments import main
from prox.experiments.configs import budgets as budgets_config
from prox.tasks import data as data_lib

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "prox" / "experiments" / "configs" / "budgets.py"


def _config(**fields) -> ml_collections.ConfigDict:
  """The quick config (``budgets.QUICK`` applied as ``main`` does); ``a__b=v`` sets ``a.b``."""
  cfg = budgets_config.get_config()
  cfg.quick = True
  main.effective_config(cfg, budgets.QUICK, [])
  cfg.progress = False
  for dotted, value in fields.items():
    cfg.update_from_flattened_dict({dotted.replace("__", "."): value})
  return cfg


@pytest.fixture(scope="module")
def digits() -> data_lib.ArrayDataset:
  return data_lib.load("digits", "train")


def _batch(ds: data_lib.ArrayDataset, rows: np.ndarray, **more) -> dict:
  return step_lib.shard_batch({"image": ds.images[rows], "label": ds.labels[rows],
                               "index": np.asarray(rows, np.int32), **more}, step_lib.data_mesh())


# --- budget part: the schedule's state steps inside the compiled step ---------------------------------------

def test_decaying_budget_steps_in_the_compiled_step_and_the_loss_reads_it(digits):
  cfg = _config(budget__num_steps=10, budget__max_steps=4, budget__start=4, budget__end=1, budget__kind="linear",
                budget__decay_fraction=0.5)
  c = cfg.budget
  budgets.validate(cfg, None)
  tool = budgets.budget_arm(c, "decay", digits)
  _, params = budgets.iterative_model(c, digits, 0, halting=False)
  state = budgets._state(params, tool.tx, 0, tool.extra())
  seen, losses = [], []
  rows = np.arange(32)
  for _ in range(7):
    before = jax.device_get(state.params)
    state, out = tool.step(state, _batch(digits, rows))
    seen.append(int(out.metrics["budget"]))
    losses.append((before, float(out.metrics["loss"])))
  # linear from B_0 = 4 to B_min = 1 over S = round(0.5 * 10) = 5 updates, B(s) = 4 - 3 s / 5, ceil:
  assert seen == [4, 4, 3, 3, 2, 1, 1]
  schedule = tasks.budget_schedule(**budgets._schedule_kwargs(c))
  assert int(schedule.budget(state.extra["budget"])) == 1 and int(state.step) == 7
  # the loss at step s is the cross-entropy of the prediction after B(s) refinement steps
  run = budgets.runner(budgets.iterative_model(c, digits, 0, halting=False)[0])
  for s in (0, 2, 4):
    params_s, loss_s = losses[s]
    logits = run(params_s, digits.images[rows], seen[s]).logits[:, -1]
    expected = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, digits.labels[rows])))
    np.testing.assert_allclose(loss_s, expected, rtol=1e-5)


def test_fixed_arm_trains_at_the_final_budget_throughout(digits):
  cfg = _config(budget__max_steps=4, budget__start=4, budget__end=2)
  tool = budgets.budget_arm(cfg.budget, "fixed", digits)
  _, params = budgets.iterative_model(cfg.budget, digits, 0, halting=False)
  state = budgets._state(params, tool.tx, 0, tool.extra())
  for _ in range(2):
    state, out = tool.step(state, _batch(digits, np.arange(16)))
    assert int(out.metrics["budget"]) == 2
  assert state.extra == {}


# --- privacy part --------------------------------------------------------------------------------------------

def test_poisson_source_pads_with_weight_zero_rows_at_the_sampling_rate(digits):
  rate = 64 / len(digits.labels)
  source = budgets.PoissonSource(digits, 3, rate)
  buffer = budgets.poisson_buffer(64, 1)
  counts = []
  for t in range(40):
    batch = source.next(buffer).data
    idx, w = batch["index"], batch["weight"]
    real = idx >= 0
    np.testing.assert_array_equal(w, real.astype(np.float32))
    assert not real[np.argmin(real):].any() or real.all()       # the real rows first, then padding
    expected = np.flatnonzero(np.random.default_rng([3, t]).random(len(digits.labels)) < rate)
    np.testing.assert_array_equal(idx[real], expected)            # each example independently with prob q
    counts.append(real.sum())
  assert abs(np.mean(counts) - 64) < 4 * np.sqrt(64 / 40)          # mean batch size q N
  state = source.get_state()
  again = budgets.PoissonSource(digits, 0, rate)
  again.set_state(state)
  np.testing.assert_array_equal(again.next(buffer).data["index"], source.next(buffer).data["index"])


def test_dp_gradient_is_the_clipped_sum_over_real_rows_divided_by_the_expected_batch(digits):
  """Through prox.step with SGD(1): the update is -1/B sum_{real i} min(1, C/||g_i||) g_i, with B the
  expected batch size (not the realised count, not the buffer), padding rows contributing nothing."""
  net = budgets.mlp(digits, (8,), 0)
  per_example = budgets.per_example_losses(net.apply)
  clip, buffer, expected_batch = 0.5, 24, 10
  loss = budgets.base_losses(per_example, clip, buffer, expected_batch)["dp"]
  step = step_lib.make_train_step(step_lib.stateless(loss), optax.sgd(1.0), mesh=step_lib.data_mesh())
  real = np.array([5, 17, 99, 230, 411, 512, 700])                   # 7 real rows (B = 10 expected)
  idx = np.full(buffer, -1)
  idx[:len(real)] = real
  rows = np.maximum(idx, 0)                                         # padding rows hold example 0's data
  weight = (idx >= 0).astype(np.float32)
  state = budgets._state(net.params, optax.sgd(1.0), 0)
  params = jax.device_get(state.params)
  state, _ = step(state, _batch(digits, rows, weight=weight))
  update = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                        jax.device_get(state.params), params)
  expected = jax.tree.map(np.zeros_like, update)
  for i in real:
    g = jax.grad(lambda p: per_example(p, {"image": digits.images[i:i + 1], "label": digits.labels[i:i + 1]})[0])(
        params)
    norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(g)))
    expected = jax.tree.map(lambda e, x: e - min(1.0, clip / norm) * np.asarray(x, np.float64) / expected_batch,
                            expected, g)
  jax.tree.map(lambda u, e: np.testing.assert_allclose(u, e, rtol=2e-3, atol=1e-6), update, expected)


def test_fine_tuning_never_sees_the_forgotten_set(digits):
  cfg = _config()
  n = len(digits.labels)
  forget = budgets.forget_set(n, 0.1, 0)
  assert len(forget) == round(0.1 * n) and len(np.unique(forget)) == len(forget)
  assert not np.array_equal(forget, budgets.forget_set(n, 0.1, 1))  # a seed's own forgotten set
  machine = tasks.unlearning(n, finetune_steps=5)
  state = {"unlearn": machine.request(machine.init(), jnp.asarray(forget))}
  source = budgets.SampledSource(digits, 0, lambda e, key, b: machine.sample(e["unlearn"], key, b))

  class Context:
    pass

  ctx = Context()
  ctx.state = step_lib.TrainState(step=0, params=(), opt_state=(), model_state={}, extra=state, rng=None, samples=0)
  drawn = np.concatenate([source.next(64, ctx).data["index"] for _ in range(60)])
  assert drawn.min() >= 0
  assert not np.isin(drawn, forget).any()
  assert len(np.unique(drawn)) > 0.8 * (n - len(forget))            # and draws across the retained data
  w = np.asarray(machine.weights(state["unlearn"], jnp.asarray(np.arange(n))))
  np.testing.assert_array_equal(w == 0, np.isin(np.arange(n), forget))
  del cfg


# --- interval part: the DDPM chain's policy --------------------------------------------------------------

def test_chain_step_log_probs_of_its_own_trajectory_are_the_noise_energies():
  cfg = _config()
  chain, params = budgets.denoiser(cfg.interval, 0)
  noise = np.random.default_rng(0).standard_normal((16, cfg.interval.chain_steps + 1, 2)).astype(np.float32)
  xs = chain.trajectory(params, jnp.asarray(noise))
  assert xs.shape == (cfg.interval.chain_steps + 1, 16, 2)
  # x_k = mu(x_{k-1}) + sqrt(beta_t) xi_k, so log pi(x_k | x_{k-1}) = -|xi_k|^2 / 2 (up to a constant)
  np.testing.assert_allclose(chain.step_log_probs(params, xs), -0.5 * np.sum(noise[:, 1:] ** 2, -1), rtol=1e-4,
                             atol=1e-4)
  reward = budgets.terminal_reward(jnp.asarray(np.concatenate([budgets.REWARDED, budgets.MODES[1::2]])), 0.3)
  np.testing.assert_array_equal(reward, [1, 1, 1, 1, 0, 0, 0, 0])


def test_backward_interval_trains_only_the_last_steps_first():
  per_step = jnp.arange(1.0, 5.0)[None].repeat(3, 0)               # [m, T] with T = 4
  schedule = tasks.backward_interval(4, total_steps=8)
  state = schedule.init()
  starts = []
  for s in range(9):
    starts.append(int(schedule.t_start(state)))
    state = schedule.update(state, step=s + 1)
  assert starts[0] == 4 and starts[-1] == 1 and starts == sorted(starts, reverse=True)
  # with t_start = 4 only the last step's term counts, with t_start = 1 all of them
  last = np.asarray(budgets.losses.interval_step_loss(per_step, jnp.int32(4)))
  whole = np.asarray(budgets.losses.interval_step_loss(per_step, jnp.int32(1)))
  assert not np.allclose(last, whole)


# --- noprop part: the matched baseline ------------------------------------------------------------------

@pytest.mark.parametrize("depth", [1, 3])
def test_matched_width_counts_the_mlp_parameters(digits, depth):
  target = 57_000
  width = budgets.matched_width(target, 64, 10, depth)
  count = models.param_count(budgets.mlp(digits, (width,) * depth, 0).params)   # the real MLP's count
  formula = lambda w: 64 * w + w + (depth - 1) * (w * w + w) + 10 * w + 10
  assert count == formula(width)
  assert abs(count - target) <= min(abs(formula(w) - target) for w in (width - 1, width + 1))


# --- staged part: the sampler's order and its resume ------------------------------------------------------

def test_staged_source_resumes_mid_epoch_and_random_keeps_the_level_counts(digits):
  cfg = _config()
  difficulties = np.random.default_rng(0).normal(size=len(digits.labels)).astype(np.float32)
  levels = budgets.staged_levels(cfg, "interleaved", 0, difficulties)
  shuffled = budgets.staged_levels(cfg, "random", 0, difficulties)
  np.testing.assert_array_equal(np.bincount(levels), np.bincount(shuffled))
  assert (levels != shuffled).mean() > 0.5
  sampler = tasks.staged_sampler(levels.astype(np.int32), digits.labels, schedule="interleaved")
  source = budgets.StagedSource(digits, sampler, 0)
  first = source.next(64).data["index"]
  assert np.mean(levels[first]) < np.mean(levels)                  # easy first
  steps = -(-len(digits.labels) // 64)
  for _ in range(steps - 3):
    source.next(64)
  position = source.get_state()
  ahead = [source.next(64) for _ in range(4)]
  assert [b.boundary for b in ahead].count("epoch") == 1
  again = budgets.StagedSource(digits, sampler, 0)
  again.set_state(position)
  for b in ahead:
    np.testing.assert_array_equal(again.next(64).data["index"], b.data["index"])


# --- config -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, expected", [
    ({"parts": "budget,nope"}, "nope"),
    ({"budget__end": 9}, "end=9"),
    ({"budget__arms": "fixed,fixed"}, "twice"),
    ({"noprop__learning_rate": -1.0}, "noprop.learning_rate"),
    ({"privacy__delta": 1.5}, "privacy.delta"),
    ({"interval__hidden": (0,)}, "interval.hidden"),
    ({"staged__crowd_size": 1}, "staged.crowd_size"),
])
def test_validate_names_the_bad_value(fields, expected):
  with pytest.raises(common.ConfigError, match=expected):
    budgets.validate(_config(**fields), None)


def test_bad_value_is_a_one_line_cli_error(tmp_path):
  cmd = [sys.executable, "-m", "prox.experiments.main", f"--config={CONFIG}", f"--workdir={tmp_path / 'w'}",
         "--config.budget.end=9"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2
  assert len(proc.stderr.strip().splitlines()) == 1
  assert proc.stderr.startswith("prox: error: budget: need integers 1 <= end <= start <= max_steps, got end=9")
  assert not (tmp_path / "w" / "budget").exists()


# --- end to end -----------------------------------------------------------------------------------------------

def _prox(workdir: Path, *args: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "prox.experiments.main", f"--config={CONFIG}", f"--workdir={workdir}",
         "--config.quick=True", *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _check_outputs(workdir: Path, parts: list[str], runs: int) -> dict:
  results = json.loads((workdir / "results.json").read_text())
  assert sorted(results["results"]) == sorted(parts)
  assert results["runs_trained"] + results["runs_read_back"] == runs
  md = (workdir / "results.md").read_text()
  for part in parts:
    assert (workdir / f"{part}.png").stat().st_size > 0
  return results | {"md": md}


def test_one_part_end_to_end_and_a_rerun_reads_every_run_back(tmp_path):
  proc = _prox(tmp_path, "--config.parts=interval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  first = _check_outputs(tmp_path, ["interval"], 3)
  assert first["runs_trained"] == 3
  assert "## Backward interval" in first["md"]
  proc = _prox(tmp_path, "--config.parts=interval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  second = _check_outputs(tmp_path, ["interval"], 3)
  assert second["runs_trained"] == 0 and second["runs_read_back"] == 3
  assert second["results"] == first["results"]


@pytest.mark.slow
def test_quick_run_of_every_part_end_to_end_and_rerun(tmp_path):
  proc = _prox(tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  parts = list(budgets.PARTS)
  # budget 4 arms, interval pretrain + 2, staged crowd + 4, noprop 2, privacy 5 (one seed, one dataset)
  first = _check_outputs(tmp_path, parts, 4 + 3 + 5 + 2 + 5)
  assert first["runs_trained"] == 19
  for effect in ("decaying budget beats", "NoProp within 2 points", "fine-tuning the DP model"):
    assert effect in first["md"]
  eps = first["results"]["privacy"]["epsilon"]
  assert 0 < eps["epsilon_pld"] <= eps["epsilon_rdp"]
  proc = _prox(tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  second = _check_outputs(tmp_path, parts, 19)
  assert second["runs_trained"] == 0 and second["results"] == first["results"]
