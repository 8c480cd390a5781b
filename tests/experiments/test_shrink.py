"""The `shrink` experiment: the progressive-shrinking machine stepped inside the compiled step (the sampled
sub-networks change at the phase boundaries, the loss of phase ``full`` is the largest network's CE), LAPP's
masks frozen into the pruning state by the step's transition and the achieved FLOPs meeting the budget,
bad config values as one-line errors, and end-to-end runs that a rerun reads back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
import pytest

import jax.numpy as jnp

from prox import models
from prox import step as step_lib
from prox import tasks
from prox import transforms
from prox.experiments import common
from prox.experiments import main
from prox.experiments import shrink
from prox.experiments.configs import shrink as shrink_config
from prox.tasks import data as data_lib

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "prox" / "experiments" / "configs" / "shrink.py"


def _config(**fields) -> ml_collections.ConfigDict:
  """The quick config (``shrink.QUICK`` applied as ``main`` does); ``a__b=v`` sets ``a.b``."""
  cfg = shrink_config.get_config()
  cfg.quick = True
  main.effective_config(cfg, shrink.QUICK, [])
  cfg.progress = False
  for dotted, value in fields.items():
    cfg.update_from_flattened_dict({dotted.replace("__", "."): value})
  return cfg


@pytest.fixture(scope="module")
def splits() -> tuple[data_lib.ArrayDataset, data_lib.ArrayDataset]:
  return data_lib.load("digits", "train"), data_lib.load("digits", "test")


def _env(cfg, splits, workdir="unused"):
  import jax  # noqa: F401  (the mesh needs the backend)
  from prox import loop
  return shrink.Env(cfg, workdir, step_lib.data_mesh(), splits[0], splits[1], loop.CompileCache(), {})


def _batch(ds: data_lib.ArrayDataset, rows: np.ndarray) -> dict:
  return step_lib.shard_batch({"image": ds.images[rows], "label": ds.labels[rows]}, step_lib.data_mesh())


# --- ofa: the phase machine inside the step -------------------------------------------------------------------

TINY = {"ofa__stem_channels": 4, "ofa__stages": ((4, 1, 1), (8, 2, 2)), "ofa__expand_ratio": 2,
        "ofa__phase_steps": (2, 1, 1, 1), "ofa__grid": "3:1:0.5,5:2:1.0"}


def test_the_phase_machine_changes_the_sampled_subnetworks_inside_the_compiled_step(splits):
  cfg = _config(**TINY)
  shrink.validate(cfg, None)
  t = shrink.ofa_tools(_env(cfg, splits))
  assert t.ps.names == ("full", "kernel", "depth1", "width1") and t.ps.boundaries == (2, 3, 4)
  params = models.init_elastic(t.ec, jax.random.key(0))
  state = common.replicated_state(params, t.ofa_tx, step_lib.data_mesh(), seed=0, extra={"shrink": t.ps.init()})
  rows = np.arange(32)
  x, y = splits[0].images[rows], splits[0].labels[rows]
  phases, smallest, losses = [], [], []
  for _ in range(6):
    before = jax.device_get(state.params)
    state, out = t.ofa_step(state, _batch(splits[0], rows))
    phases.append(int(out.metrics["phase"]))
    smallest.append(float(out.metrics["macs_smallest"]))
    losses.append((before, float(out.metrics["loss_0"]), float(out.metrics["loss_1"])))
  assert phases == [0, 0, 1, 2, 3, 3]
  assert int(state.extra["shrink"].count) == 6
  # the smallest sub-network the step trains: the full network in phase full, then smaller in every phase
  ec = t.ec
  full = float(models.elastic_flops(t.ps.largest(), config=ec))
  n = len(ec.blocks)
  expect = [
      1.0, 1.0,
      float(models.elastic_flops(shrink.tasks.Subnet(np.zeros(n, np.int32), np.ones(n, np.int32),
                                                     np.asarray([1, 2], np.int32)), config=ec)) / full,
      float(models.elastic_flops(shrink.uniform_subnet(ec, 3, 1, 1.0), config=ec)) / full,
      float(models.elastic_flops(shrink.uniform_subnet(ec, 3, 1, 0.5), config=ec)) / full,
      float(models.elastic_flops(shrink.uniform_subnet(ec, 3, 1, 0.5), config=ec)) / full]
  np.testing.assert_allclose(smallest, expect, rtol=1e-6)
  assert expect[2] > expect[3] > expect[4]
  # phase full: the loss is the largest network's cross-entropy alone (no student terms)
  p0, loss0, student0 = losses[0]
  logits = models.elastic_apply(p0, x, t.ps.largest(), config=ec)
  np.testing.assert_allclose(loss0, float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()), rtol=1e-5)
  assert student0 == 0.0
  # later phases train the students too: their cross-entropy is measured
  assert all(s > 0 for _, _, s in losses[2:])


def test_grid_is_sorted_by_macs_and_names_uniform_subnetworks(splits):
  cfg = _config(**{**TINY, "ofa__grid": "5:2:1.0,3:1:0.5,3:2:0.5"})
  t = shrink.ofa_tools(_env(cfg, splits))
  names = [n for n, _ in t.grid]
  assert names == ["k3-d1-w0.5", "k3-d2-w0.5", "k5-d2-w1"]
  s = dict(t.grid)["k3-d2-w0.5"]
  assert s.depth.tolist() == [1, 2] and s.kernel.tolist() == [0, 0, 0] and s.width.tolist() == [0, 0, 0]


# --- lapp: the transition freezes LAPP's masks; the achieved FLOPs meet the budget -------------------------------

def test_lapp_masks_are_frozen_by_the_step_and_the_achieved_flops_meet_the_budget(splits):
  # penalty weight 0: nothing pushes LAPP's thresholds, its own hard masks keep every channel (FLOPs 1.0),
  # so only the budget trim at prune_steps + 1 can bring the network to the budget.
  cfg = _config(lapp__width=4, lapp__hidden=8, lapp__num_steps=6, lapp__prune_steps=3, lapp__penalty_weight=0.0)
  env = _env(cfg, splits)
  p = cfg.lapp
  net, structure = shrink.cnn_structure(p, (8, 8, 1), 10)
  target = 0.5
  lp = transforms.lapp(structure, flops_target=target, end_step=p.prune_steps, temperature=p.temperature,
                       penalty_weight=0.0)
  outer = shrink.prefixed(structure, "model")
  tx = transforms.channel_pruning(optax.adam(1e-3), structure=outer, flops_target=target, start_step=p.prune_steps,
                                  end_step=p.prune_steps + 1, frequency=1)
  step = step_lib.make_train_step(shrink.lapp_loss(net.apply, structure, lp, p.prune_steps), tx, mesh=env.mesh,
                                  transition=shrink.lapp_transition(structure, lp, p.prune_steps))
  params = {"model": net.params, "thresholds": lp.init_thresholds()}
  state = common.replicated_state(params, tx, env.mesh, seed=0,
                                  extra={"lapp_masks": transforms.full_channel_masks(structure)})
  dense = float(transforms.full_flops(structure))
  rows = np.arange(32)
  for i in range(6):
    state, out = step(state, _batch(splits[0], rows))
    s = jax.device_get(state)
    cm = {k: np.asarray(v) for k, v in s.opt_state.channel_masks.items()}
    if i + 1 < p.prune_steps:
      assert all(v.all() for v in cm.values())
      assert float(out.metrics["soft_flops"]) > 0
    if i + 1 == p.prune_steps:   # frozen by the transition after the last LAPP step
      own = {k: np.asarray(v) for k, v in s.extra["lapp_masks"].items()}
      for k in cm:
        np.testing.assert_array_equal(cm[k], own[k])
      assert float(transforms.masked_flops(structure, own)) / dense == pytest.approx(1.0)
  own = {k: np.asarray(v) for k, v in s.extra["lapp_masks"].items()}
  achieved = float(transforms.masked_flops(structure, cm)) / dense
  assert achieved <= target + 1e-6
  assert achieved > 0.3                                  # trimmed to the budget, not far below
  for k in cm:                                           # masks only shrink from LAPP's
    assert not (cm[k] & ~own[k]).any()
  # the pruned channels' weights are zero: the masked network is the network
  masked = transforms.apply_channel_masks(structure, cm, s.params["model"])
  for a, b in zip(jax.tree.leaves(masked), jax.tree.leaves(s.params["model"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cnn_forward_is_the_zoo_cnn_plus_the_bypasses(splits):
  p = _config(lapp__width=4, lapp__hidden=8).lapp
  net, _ = shrink.cnn_structure(p, (8, 8, 1), 10)
  x = jnp.asarray(splits[0].images[:16])
  reference = net.apply(net.params, {}, x, train=False)[0]
  np.testing.assert_allclose(shrink.cnn_forward(net.params, {}, x), reference, rtol=1e-5, atol=1e-5)
  shapes = shrink.bypass_shapes(net.params, (8, 8, 1))
  assert shapes == {"conv1": (1, 8, 16), "conv2": (16, 8, 1), "dense": (32, 10, 1)}
  zero = {g: transforms.bypass_init(*shapes[g][:2]) for g in shapes}
  np.testing.assert_allclose(shrink.cnn_forward(net.params, zero, x), reference, rtol=1e-5, atol=1e-5)
  # the dense bypass adds flatten(p2) W to the logits: with the head zeroed, the logits are that term alone
  w = jax.random.normal(jax.random.key(0), (32, 10))
  model = {**net.params, "head": jax.tree.map(jnp.zeros_like, net.params["head"])}
  feats = {}
  def pooled(z):
    return jax.lax.reduce_window(z, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "SAME")
  conv = lambda q, z: jax.lax.conv_general_dilated(z, q["kernel"], (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + q["bias"]
  feats["p2"] = pooled(jax.nn.relu(conv(model["conv2"], pooled(jax.nn.relu(conv(model["conv1"], x))))))
  np.testing.assert_allclose(shrink.cnn_forward(model, {"dense": w}, x), feats["p2"].reshape(16, -1) @ w,
                             rtol=1e-5, atol=1e-5)
  # the conv1 bypass's MACs: 4 x 4 positions x 1 input channel x 8 outputs
  assert shrink.bypass_macs(net.params, (8, 8, 1), ["conv1"]) == 16 * 1 * 8
  assert shrink.bypass_macs(net.params, (8, 8, 1), ["conv1", "dense"]) == 128 + 320


def test_lapp_bypass_run_counts_the_bypass_macs_in_the_budget_and_trains_it(splits, tmp_path):
  cfg = _config(lapp__width=4, lapp__hidden=8, lapp__num_steps=6, lapp__prune_steps=3, lapp__eval_every=6,
                lapp__bypass="conv1,dense")
  shrink.validate(cfg, None)
  env = _env(cfg, splits, str(tmp_path))
  out = shrink.lapp_run(env, "lapp_bypass", 0.5, 0)
  net, structure = shrink.cnn_structure(cfg.lapp, (8, 8, 1), 10)
  dense = float(transforms.full_flops(structure))
  share = (128 + 320) / dense
  assert out["bypass_flops_fraction"] == pytest.approx(share)
  cm = {g.name: np.arange(g.size) < out["kept"][g.name] for g in structure.groups}   # counts only matter
  channels = float(transforms.masked_flops(structure, cm)) / dense
  assert out["flops_fraction"] == pytest.approx(channels + share, rel=1e-6)
  assert out["flops_fraction"] <= 0.5 + 1e-6 and channels <= 0.5 - share + 1e-6
  assert all(v > 0 for v in out["bypass_norm"].values())   # zero-initialised, then trained
  assert out["steps"] == 6


def test_prefixed_structure_addresses_the_outer_tree():
  p = _config(lapp__width=4, lapp__hidden=8).lapp
  net, structure = shrink.cnn_structure(p, (8, 8, 1), 10)
  outer = shrink.prefixed(structure, "model")
  transforms.check_structure(outer, {"model": net.params, "thresholds": {}})
  with pytest.raises(ValueError):
    transforms.check_structure(outer, net.params)


# --- proard: the student sampler stepped by the transition -----------------------------------------------------

def _info(**fields) -> step_lib.StepInfo:
  return step_lib.StepInfo(**{**{f: None for f in step_lib.StepInfo._fields}, **fields})


def _extra_state(extra) -> step_lib.TrainState:
  return step_lib.TrainState(**{**{f: None for f in step_lib.TrainState._fields}, "extra": extra})


@pytest.mark.parametrize("arm", ["gap", "uniform"])
def test_proard_transition_updates_the_trained_students_gap_and_draws_the_next(arm):
  sampler = tasks.robust_gap_sampler(4, temperature=0.05, momentum=0.9)
  transition = jax.jit(shrink.proard_transition(sampler, 4, arm))
  extra = {"gaps": sampler.init(), "student": jnp.int32(2), "draws": jnp.zeros(4, jnp.int32)}
  key = jax.random.key(3)
  out = transition(_extra_state(extra), _info(rng=key, metrics={"robust_teacher": jnp.float32(0.9),
                                                                "robust_student": jnp.float32(0.3)})).extra
  # the first measurement of student 2 replaces the optimistic start: g_2 = a_T - a_S
  np.testing.assert_allclose(np.asarray(out["gaps"].gaps), [1.0, 1.0, 0.6, 1.0], rtol=1e-6)
  assert np.asarray(out["gaps"].visits).tolist() == [0, 0, 1, 0]
  gaps = sampler.update(sampler.init(), 2, 0.9, 0.3)
  expected = sampler.sample(gaps, key, 1)[0] if arm == "gap" else jax.random.randint(key, [], 0, 4, jnp.int32)
  assert int(out["student"]) == int(expected)
  assert np.asarray(out["draws"]).tolist() == [int(i == int(expected)) for i in range(4)]
  # a second measurement of the same student moves its gap by (1 - m): g <- 0.9 g + 0.1 (a_T - a_S)
  again = transition(_extra_state({**out, "student": jnp.int32(2)}),
                     _info(rng=key, metrics={"robust_teacher": jnp.float32(0.8), "robust_student": jnp.float32(0.6)}))
  np.testing.assert_allclose(float(again.extra["gaps"].gaps[2]), 0.9 * 0.6 + 0.1 * 0.2, rtol=1e-6)


def test_gap_arm_draws_the_lagging_student_and_uniform_does_not():
  sampler = tasks.robust_gap_sampler(4, temperature=0.05)
  gaps = tasks.GapSamplerState(jnp.asarray([0.0, 0.5, 0.0, 0.0]), jnp.ones(4, jnp.int32))
  picks = {}
  for arm in ("gap", "uniform"):
    transition = jax.jit(shrink.proard_transition(sampler, 4, arm))
    extra = {"gaps": gaps, "student": jnp.int32(0), "draws": jnp.zeros(4, jnp.int32)}
    for i in range(40):   # student 0 measured with a zero gap: the others stay as they are
      extra = transition(_extra_state(extra), _info(rng=jax.random.key(i), metrics={
          "robust_teacher": jnp.float32(0.5), "robust_student": jnp.float32(0.5)})).extra
      extra = {**extra, "student": jnp.int32(0)}
    picks[arm] = np.asarray(extra["draws"])
  assert picks["gap"][1] == 40                      # exp(0.5 / 0.05) = 22000 times the others' weight
  assert 0 < picks["uniform"][1] < 25 and (picks["uniform"] > 0).sum() >= 3


def test_candidates_are_every_uniform_subnetwork_but_the_largest():
  ec = shrink.elastic_config(_config().ofa, (8, 8, 1), 10)
  names = [n for n, _ in shrink.candidates(ec)]
  assert len(names) == 2 * 2 * 2 - 1 and "k5-d2-w1" not in names and names[0] == "k3-d1-w0.5"


# --- lightweight: paired views, the dual step, progressive unfreezing in the step ---------------------------------

def test_pair_source_serves_each_augmented_sample_with_its_source_image(splits):
  train = splits[0]
  pair = shrink.PairSource(train, 3)
  pair.next(16)
  state = pair.get_state()
  batch = pair.next(16).data
  plain = tasks.StreamSource(train, 3)
  plain.next(16)
  second = plain.next(16).data
  np.testing.assert_array_equal(batch["augmented"], second["image"])
  np.testing.assert_array_equal(batch["label"], second["label"])
  # the original of each sample is a training image of the same label, not the warped one
  flat = train.images.reshape(len(train.images), -1)
  for x, y in zip(batch["image"], batch["label"]):
    dist = np.abs(flat - x.reshape(-1)).max(axis=1)
    assert dist.min() < 1e-5 and train.labels[np.argmin(dist)] == y
  assert np.abs(batch["image"] - batch["augmented"]).max() > 0.1
  again = shrink.PairSource(train, 3)
  again.set_state(state)
  np.testing.assert_array_equal(again.next(16).data["image"], batch["image"])
  # the fine-tuning stream continues where the dual phase left the augmented stream
  np.testing.assert_array_equal(shrink.stream_from(train, 3, 16).next(16).data["image"], second["image"])


def test_dual_step_trains_each_submodel_on_its_own_input(splits):
  cfg = _config(lightweight__width=4, lightweight__hidden=8)
  env = _env(cfg, splits)
  t = shrink.light_tools(env)
  init = t.net.params
  rows = np.arange(32)
  x = splits[0].images[rows]
  batch = {"image": x, "augmented": x[::-1].copy(), "label": splits[0].labels[rows]}
  other = {**batch, "augmented": np.zeros_like(x)}
  outs = []
  for b in (batch, other):
    state = common.replicated_state({"original": init, "augmented": init}, t.dual_tx, env.mesh, seed=0)
    state, out = t.dual_step(state, step_lib.shard_batch(b, env.mesh))
    outs.append((jax.device_get(state.params), out))
  (p1, out1), (p2, _) = outs
  # the original sub-model's update depends on the original images only
  for a, b in zip(jax.tree.leaves(p1["original"]), jax.tree.leaves(p2["original"])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p1["augmented"]), jax.tree.leaves(p2["augmented"])))
  # the loss is the sum of the two sub-models' cross-entropies at the start (both from one init)
  ce = lambda xx: float(optax.softmax_cross_entropy_with_integer_labels(
      t.net.apply(init, {}, xx, train=True)[0], batch["label"]).mean())
  np.testing.assert_allclose(float(out1.metrics["loss"]), ce(x) + ce(batch["augmented"]), rtol=1e-5)
  unified = shrink.robust.unify_submodels(p1, weight=cfg.lightweight.weight)
  for u, a, b in zip(jax.tree.leaves(unified), jax.tree.leaves(p1["original"]), jax.tree.leaves(p1["augmented"])):
    np.testing.assert_allclose(u, 0.5 * (a + b), rtol=1e-6)


def test_finetune_step_unfreezes_the_layers_head_first(splits):
  cfg = _config(lightweight__width=4, lightweight__hidden=8, lightweight__finetune_steps=8)
  env = _env(cfg, splits)
  t = shrink.light_tools(env)   # 4 groups: one every 2 steps
  state = common.replicated_state(t.net.params, t.finetune_tx, env.mesh, seed=0)
  batch = _batch(splits[0], np.arange(32))
  changed = []
  for _ in range(8):
    before = jax.device_get(state.params)
    state, _ = t.finetune_step(state, batch)
    after = jax.device_get(state.params)
    changed.append({k: not np.array_equal(before[k]["kernel"], after[k]["kernel"]) for k in before})
  order = ("head", "dense", "conv2", "conv1")
  for i, c in enumerate(changed):   # group g trains from step 2 g on
    assert c == {k: i >= 2 * order.index(k) for k in order}, (i, c)


# --- fedtiny: clients as a vmapped axis, FedAvg and grow-and-prune in the step's transition -----------------------

def test_client_split_is_a_non_iid_partition(splits):
  labels = splits[0].labels
  assert len(labels) == shrink.DIGITS_TRAIN_ROWS   # (validate's bound on the client batches)
  rows = shrink.client_split(labels, 8, 2, 0)
  assert rows.shape == (8, 2 * (len(labels) // 16))
  assert len(np.unique(rows)) == rows.size                     # disjoint
  assert all(len(np.unique(labels[r])) <= 4 for r in rows)     # two label-sorted shards: at most 2 digits each + edges
  assert not np.array_equal(rows, shrink.client_split(labels, 8, 2, 1))


def _fed_setup(splits, arm):
  cfg = _config(fedtiny__width=4, fedtiny__hidden=8, fedtiny__num_clients=2, fedtiny__local_steps=2,
                fedtiny__client_batch=8, fedtiny__topk=16, fedtiny__density=0.3, fedtiny__prune_rounds=4)
  env = _env(cfg, splits)
  f = cfg.fedtiny
  t = shrink.fed_tools(env)
  model = models.functional(models.make_model("cnn", input_shape=(8, 8, 1), num_classes=10, seed=0, width=4,
                                              hidden=8)).params
  kernels = {k: model[k]["kernel"] for k in shrink.FED_LAYERS}
  _, cands = shrink.fed_candidates(f, kernels, 0)
  masks = {k: np.asarray(v[0]) for k, v in cands.items()}
  stacked = jax.tree.map(lambda a: np.stack([a, a]), shrink._masked(model, masks))
  extra = {"masks": masks, "grown": np.int32(0),
           "topk": {k: jax.tree.map(lambda a: np.stack([a, a]), transforms.topk_init(f.topk)) for k in shrink.FED_LAYERS}}
  state = common.replicated_state(stacked, t.tx, env.mesh, seed=0, extra=extra)
  rows = shrink.client_split(splits[0].labels, 2, 2, 0)
  return cfg, t, state, masks, shrink.ClientSource(splits[0], rows, 0)


@pytest.mark.parametrize("arm", ["fedtiny", "server", "select"])
def test_fed_step_keeps_per_client_buffers_and_averages_at_the_round_end(splits, arm):
  cfg, t, state, masks, source = _fed_setup(splits, arm)
  step = t.steps[arm]
  batch = source.next(16).data
  before = jax.device_get(state.params)
  state, _ = step(state, step_lib.shard_batch(batch, step_lib.data_mesh()))
  s = jax.device_get(state)
  # one local step: every client moved on its own rows, so the clients differ; pruned weights stay 0
  assert not np.array_equal(s.params["dense"]["kernel"][0], s.params["dense"]["kernel"][1])
  for k in shrink.FED_LAYERS:
    assert not np.asarray(s.params[k]["kernel"])[:, ~masks[k]].any()
  if arm == "fedtiny":   # each client's buffer holds its own gradient's top-K pruned entries
    for i in range(2):
      p_i = jax.tree.map(lambda a: a[i], before)
      x, y = batch["image"][8 * i:8 * (i + 1)], batch["label"][8 * i:8 * (i + 1)]
      g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
          shrink.cnn_forward(p, {}, x), y).mean())(p_i)
      want = transforms.topk_accumulate(transforms.topk_init(16), g["dense"]["kernel"], masks["dense"])
      got = s.extra["topk"]["dense"]
      np.testing.assert_array_equal(np.asarray(got.index[i]), np.asarray(want.index))
      np.testing.assert_allclose(np.asarray(got.value[i]), np.asarray(want.value), rtol=1e-4, atol=1e-6)
    assert not np.array_equal(np.asarray(s.extra["topk"]["dense"].index[0]), np.asarray(s.extra["topk"]["dense"].index[1]))
  else:
    assert (np.asarray(s.extra["topk"]["dense"].index) == -1).all()
  # the second step ends round 0: FedAvg sends the clients' mean to every client
  state, _ = step(state, step_lib.shard_batch(source.next(16).data, step_lib.data_mesh()))
  s = jax.device_get(state)
  for a in jax.tree.leaves(s.params):
    np.testing.assert_array_equal(a[0], a[1])
  new = {k: np.asarray(v) for k, v in s.extra["masks"].items()}
  for k in shrink.FED_LAYERS:
    assert new[k].sum() == masks[k].sum()                     # the density is unchanged
    assert not np.asarray(s.params[k]["kernel"])[:, ~new[k]].any()
  changed = {k for k in shrink.FED_LAYERS if not np.array_equal(new[k], masks[k])}
  if arm == "fedtiny":   # round 0 adjusts layer 0 (conv1) only, and the buffers restart empty
    assert changed <= {"conv1"} and int(s.extra["grown"]) == sum((new[k] & ~masks[k]).sum() for k in new)
    assert (np.asarray(s.extra["topk"]["dense"].index) == -1).all()
  else:
    assert not changed and int(s.extra["grown"]) == 0


def test_select_candidate_takes_the_lowest_mean_client_loss(splits):
  cfg = _config(fedtiny__width=4, fedtiny__hidden=8, fedtiny__candidates=4, fedtiny__density=0.2)
  f = cfg.fedtiny
  model = models.functional(models.make_model("cnn", input_shape=(8, 8, 1), num_classes=10, seed=1, width=4,
                                              hidden=8)).params
  kernels = {k: model[k]["kernel"] for k in shrink.FED_LAYERS}
  dens, cands = shrink.fed_candidates(f, kernels, 1)
  assert dens.shape == (4, 4) and np.allclose(dens[0], dens[0][0])   # row 0: uniform
  rows = shrink.client_split(splits[0].labels, 3, 2, 0)[:, :16]
  x, y = splits[0].images[rows], splits[0].labels[rows]
  chosen, losses = shrink.select_candidate(f, model, cands, x, y)
  manual = []
  for k in range(4):
    masked = shrink._masked(model, {n: np.asarray(v[k]) for n, v in cands.items()})
    manual.append(np.mean([float(optax.softmax_cross_entropy_with_integer_labels(
        shrink.cnn_forward(masked, {}, x[i]), y[i]).mean()) for i in range(3)]))
  np.testing.assert_allclose(losses, manual, rtol=1e-5)
  assert chosen == int(np.argmin(manual))
  for k in range(4):   # every candidate keeps the target share of the kernels' weights
    kept = sum(float(np.asarray(v[k]).sum()) for v in cands.values())
    assert kept / sum(v.size for v in kernels.values()) == pytest.approx(0.2, abs=0.01)


# --- config errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, expected", [
    ({"parts": "ofa,nope"}, "nope"),
    ({"parts": "ofa,ofa"}, "twice"),
    ({"ofa__grid": "7:1:0.5"}, "ofa.grid"),
    ({"ofa__grid": "3:1"}, "ofa.grid"),
    ({"ofa__phase_steps": (10, 10)}, "phase_steps"),
    ({"ofa__kernel_sizes": (4, 5)}, "kernel_sizes"),
    ({"ofa__learning_rate": -1.0}, "ofa.learning_rate"),
    ({"lapp__removed": (0.4, 1.2)}, "lapp.removed"),
    ({"lapp__prune_steps": 60}, "lapp.prune_steps"),
    ({"lapp__temperature": (1.0, -2.0)}, "temperature"),
    ({"parts": "proard", "proard__arms": "gap,gap"}, "twice"),
    ({"parts": "proard", "proard__momentum": 1.0}, "proard.momentum"),
    ({"parts": "proard", "proard__eps": 0.0}, "proard.eps"),
    ({"lapp__arms": "lapp,nope"}, "lapp.arms"),
    ({"lapp__bypass": "conv1,conv9"}, "lapp.bypass"),
    ({"lapp__bypass": "conv1,conv2,dense", "lapp__removed": (0.4, 0.95)}, "lapp.bypass"),
    ({"parts": "fedtiny", "fedtiny__density": 0.0}, "fedtiny.density"),
    ({"parts": "fedtiny", "fedtiny__arms": "fedtiny,other"}, "fedtiny.arms"),
    ({"parts": "fedtiny", "fedtiny__alpha": 1.5}, "fedtiny.alpha"),
    ({"parts": "fedtiny", "fedtiny__prune_rounds": 100}, "fedtiny.prune_rounds"),
    ({"parts": "fedtiny", "fedtiny__client_batch": 1000}, "fedtiny.client_batch"),
    ({"parts": "lightweight", "lightweight__unfreeze": "head,head"}, "twice"),
    ({"parts": "lightweight", "lightweight__unfreeze": "head,conv3"}, "conv3"),
    ({"parts": "lightweight", "lightweight__weight": 1.5}, "lightweight.weight"),
    ({"parts": "lightweight", "lightweight__finetune_steps": 3}, "lightweight.finetune_steps"),
    ({"parts": "lightweight", "lightweight__finetune_learning_rate": 0.0}, "lightweight.finetune_learning_rate"),
])
def test_validate_names_the_bad_value(fields, expected):
  with pytest.raises(common.ConfigError, match=expected):
    shrink.validate(_config(**fields), None)


def test_bad_value_is_a_one_line_cli_error(tmp_path):
  cmd = [sys.executable, "-m", "prox.experiments.main", f"--config={CONFIG}", f"--workdir={tmp_path / 'w'}",
         "--config.lapp.removed=(0.4,1.5)"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2
  assert len(proc.stderr.strip().splitlines()) == 1
  assert proc.stderr.startswith("prox: error: lapp.removed must be distinct fractions in (0, 1)")
  assert not (tmp_path / "w" / "lapp").exists()


# --- end to end ------------------------------------------------------------------------------------------------

def _prox(workdir: Path, *args: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "prox.experiments.main", f"--config={CONFIG}", f"--workdir={workdir}",
         "--config.quick=True", *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _outputs(workdir: Path, parts: list[str], runs: int) -> dict:
  results = json.loads((workdir / "results.json").read_text())
  assert sorted(results["results"]) == sorted(parts)
  assert results["runs_trained"] + results["runs_read_back"] == runs
  for part in parts:
    assert (workdir / f"{part}.png").stat().st_size > 0
  return results | {"md": (workdir / "results.md").read_text()}


@pytest.mark.slow   # two CLI runs: 26 s on 2 idle cores, ~110 s on loaded ones
def test_lapp_part_end_to_end_and_a_rerun_reads_every_run_back(tmp_path):
  proc = _prox(tmp_path, "--config.parts=lapp")
  assert proc.returncode == 0, proc.stderr[-3000:]
  first = _outputs(tmp_path, ["lapp"], 4)                # dense, lapp50, magnitude50, lapp_bypass50
  assert first["runs_trained"] == 4
  assert "LAPP above magnitude (uniform) pruning at 50%" in first["md"]
  assert "LAPP with bypass above LAPP without at 50%" in first["md"]
  for name in ("lapp50", "magnitude50", "lapp_bypass50"):
    assert first["results"]["lapp"]["runs"][name]["0"]["flops_fraction"] <= 0.5 + 1e-6
  proc = _prox(tmp_path, "--config.parts=lapp")
  assert proc.returncode == 0, proc.stderr[-3000:]
  second = _outputs(tmp_path, ["lapp"], 4)
  assert second["runs_trained"] == 0 and second["runs_read_back"] == 4
  assert second["results"] == first["results"]


@pytest.mark.slow
def test_quick_run_of_every_part_end_to_end_and_rerun(tmp_path):
  every = "--config.parts=" + ",".join(shrink.PARTS)
  proc = _prox(tmp_path, every)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # ofa: the OFA run and 2 grid points alone; lapp: dense, lapp50, magnitude50; proard: 2 arms;
  # lapp_bypass50; lightweight: dual, single; fedtiny: fedtiny, server (one seed)
  first = _outputs(tmp_path, list(shrink.PARTS), 13)
  assert first["runs_trained"] == 13
  fed = first["results"]["fedtiny"]["runs"]
  assert fed["fedtiny"]["0"]["steps"] == 16 and fed["fedtiny"]["0"]["clients_equal"]
  assert abs(fed["fedtiny"]["0"]["density"] - fed["server"]["0"]["density"]) < 1e-3
  dual = first["results"]["lightweight"]["runs"]["dual"]["0"]
  assert dual["steps"] == 20 and dual["dual"]["steps"] == 20 and {"original", "augmented", "unified"} <= set(dual)
  assert first["results"]["lightweight"]["runs"]["single"]["0"]["steps"] == 40
  gap = first["results"]["proard"]["runs"]["gap"]["0"]
  assert sum(gap["draws"].values()) == 20 and set(gap["robust"]) == {"k3-d1-w0.5", "k5-d2-w1"}
  assert "OFA sub-network k3-d1-w0.5 within 1 point" in first["md"]
  ofa = first["results"]["ofa"]["runs"]["ofa"]["0"]
  assert [p["step"] for p in ofa["phases"]] == [20, 30, 40, 50] and ofa["shrink_count"] == 50
  proc = _prox(tmp_path, every)
  assert proc.returncode == 0, proc.stderr[-3000:]
  second = _outputs(tmp_path, list(shrink.PARTS), 13)
  assert second["runs_trained"] == 0 and second["results"] == first["results"]


_FED_SCRIPT = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + sys.argv[1]
import jax, numpy as np
from prox import loop, models, transforms
from prox import step as step_lib
from prox.experiments import common, main, shrink
from prox.experiments.configs import shrink as shrink_config
from prox.tasks import data as data_lib
cfg = shrink_config.get_config(); cfg.quick = True; main.effective_config(cfg, shrink.QUICK, []); cfg.progress = False
cfg.update_from_flattened_dict({"fedtiny.width": 4, "fedtiny.hidden": 8, "fedtiny.num_clients": 4,
                                "fedtiny.local_steps": 2, "fedtiny.client_batch": 8, "fedtiny.topk": 16,
                                "fedtiny.density": 0.3, "fedtiny.prune_rounds": 4})
train, test = data_lib.load("digits", "train"), data_lib.load("digits", "test")
env = shrink.Env(cfg, "unused", step_lib.data_mesh(), train, test, loop.CompileCache(), {})
f = cfg.fedtiny
t = shrink.fed_tools(env)
model = models.functional(models.make_model("cnn", input_shape=(8, 8, 1), num_classes=10, seed=0, width=4,
                                            hidden=8)).params
_, cands = shrink.fed_candidates(f, {k: model[k]["kernel"] for k in shrink.FED_LAYERS}, 0)
masks = {k: np.asarray(v[0]) for k, v in cands.items()}
stack = lambda tree: jax.tree.map(lambda a: np.stack([a] * 4), tree)
extra = {"masks": masks, "grown": np.int32(0),
         "topk": {k: stack(transforms.topk_init(f.topk)) for k in shrink.FED_LAYERS}}
state = common.replicated_state(stack(shrink._masked(model, masks)), t.tx, env.mesh, seed=0, extra=extra)
source = shrink.ClientSource(train, shrink.client_split(train.labels, 4, 2, 0), 0)
for _ in range(6):   # three rounds: local steps, FedAvg and grow-and-prune of conv1, conv2, dense
  state, _ = t.steps["fedtiny"](state, step_lib.shard_batch(source.next(32).data, env.mesh))
s = jax.device_get(state)
out = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path((s.params, s.extra))}
np.savez(sys.argv[2], **out)
"""


def test_fedtiny_clients_over_the_data_axis_give_the_same_run_on_one_and_two_devices(tmp_path):
  """The clients are spread over the devices (each computes its own clients' local steps): 4 clients on 1
  and on 2 devices give the same parameters, masks and top-K buffers after three rounds of FedTiny."""
  got = {}
  for d in (1, 2):
    path = tmp_path / f"{d}.npz"
    proc = subprocess.run([sys.executable, "-c", _FED_SCRIPT, str(d), str(path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(path) as z:
      got[d] = {k: z[k] for k in z.files}
  assert set(got[1]) == set(got[2])
  grown = [v for k, v in got[1].items() if "grown" in k]
  assert grown and int(grown[0]) > 0                      # the rounds did grow and prune
  for k, v in got[1].items():
    np.testing.assert_allclose(got[2][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
