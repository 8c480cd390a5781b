"""Tests for prox.tasks.irt: 1PL fit, MAP ability, PUDF schedule, the curriculum's SubsetSource (and PUDF
on prox.loop, resumed)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

from prox import loop as loop_lib
from prox import step as step_lib
from prox.tasks import data as data_lib
from prox.tasks import irt


def _simulate(seed, num_resp=300, num_items=80):
  rng = np.random.default_rng(seed)
  theta = rng.normal(size=num_resp)
  b = rng.normal(size=num_items)
  p = 1 / (1 + np.exp(-(theta[:, None] - b[None, :])))
  return (rng.random(p.shape) < p).astype(np.int32), theta, b


def test_fit_1pl_recovers_difficulties_and_abilities():
  y, theta, b = _simulate(0)
  fit = irt.fit_1pl(y, np.ones(y.shape, bool))
  assert fit.difficulties.shape == b.shape and fit.abilities.shape == theta.shape
  assert np.corrcoef(np.asarray(fit.difficulties), b)[0, 1] > 0.98
  assert np.mean(np.abs(np.asarray(fit.difficulties) - b)) < 0.2
  assert np.corrcoef(np.asarray(fit.abilities), theta)[0, 1] > 0.95


def test_fit_1pl_is_the_map_estimate():
  # the same objective minimised by scipy in float64 (hand-written reference), with missing answers
  y, _, _ = _simulate(1)
  mask = np.random.default_rng(2).random(y.shape) < 0.8
  num_items = y.shape[1]

  def f(v):
    b, th = v[:num_items], v[num_items:]
    z = th[:, None] - b[None, :]
    nll = np.sum(mask * (np.logaddexp(0, z) - y * z))
    g = mask * (1 / (1 + np.exp(-z)) - y)
    val = (nll + 0.5 * np.sum(th ** 2) + 0.5 * np.sum(b ** 2) / 4.0) / mask.sum()
    grad = np.concatenate([-g.sum(0) + b / 4.0, g.sum(1) + th]) / mask.sum()
    return val, grad

  ref = scipy.optimize.minimize(f, np.zeros(sum(y.shape)), jac=True, method="L-BFGS-B",
                                options=dict(gtol=1e-12, ftol=1e-15, maxiter=2000)).x
  fit = irt.fit_1pl(y, mask, prior_std_difficulty=2.0)
  np.testing.assert_allclose(np.asarray(fit.difficulties), ref[:num_items], atol=2e-3)
  np.testing.assert_allclose(np.asarray(fit.abilities), ref[num_items:], atol=2e-3)


def test_map_ability_matches_grid_search_and_recovers_truth():
  rng = np.random.default_rng(3)
  b = rng.normal(size=1000)
  for true in (-1.2, 0.0, 0.7):
    y = rng.random(1000) < 1 / (1 + np.exp(-(true - b)))
    est = float(irt.estimate_ability(b.astype(np.float32), y))
    grid = np.linspace(-4, 4, 80001)
    logpost = [np.sum(y * -np.logaddexp(0, -(t - b)) + (1 - y) * -np.logaddexp(0, t - b)) - t * t / 2
               for t in grid[::100]]
    coarse = grid[::100][int(np.argmax(logpost))]
    fine = grid[np.abs(grid - coarse) <= 0.01]
    lp = [np.sum(y * -np.logaddexp(0, -(t - b)) + (1 - y) * -np.logaddexp(0, t - b)) - t * t / 2 for t in fine]
    assert est == pytest.approx(fine[int(np.argmax(lp))], abs=2e-4)
    assert abs(est - true) < 0.2
  # prior dominates with no data
  assert float(irt.estimate_ability(b[:3], np.ones(3), np.zeros(3, bool))) == pytest.approx(0.0, abs=1e-6)


def test_pudf_selection_and_stall_bump():
  b = jnp.asarray([-1.0, -0.5, 0.0, 0.3, 1.0, 2.0])
  state = irt.pudf_init()
  state, sel = irt.pudf_update(state, -0.6, b)
  assert float(state.theta) == pytest.approx(-0.6) and int(sel.count) == 1
  np.testing.assert_array_equal(np.asarray(sel.mask), [True, False, False, False, False, False])
  np.testing.assert_array_equal(np.asarray(sel.indices), [0, -1, -1, -1, -1, -1])
  state, sel = irt.pudf_update(state, 0.05, b)            # progress: theta follows the estimate
  assert float(state.theta) == pytest.approx(0.05) and int(sel.count) == 3 and int(state.stall) == 0
  state, sel = irt.pudf_update(state, 0.0, b)             # stall 1: keep theta (never shrink)
  assert float(state.theta) == pytest.approx(0.05) and int(state.stall) == 1 and int(sel.count) == 3
  state, sel = irt.pudf_update(state, -0.2, b)            # stall 2: bump by 0.1
  assert float(state.theta) == pytest.approx(0.15) and int(state.stall) == 0 and int(sel.count) == 3
  state, sel = irt.pudf_update(state, 0.4, b)
  assert float(state.theta) == pytest.approx(0.4) and int(sel.count) == 4 and int(state.epoch) == 5
  np.testing.assert_array_equal(np.asarray(sel.indices)[:4], [0, 1, 2, 3])
  # min_items: never an empty epoch
  _, sel = irt.pudf_update(irt.pudf_init(min_items=2), -5.0, b)
  np.testing.assert_array_equal(np.asarray(sel.mask), [True, True, False, False, False, False])


def test_pudf_step_jits_and_selects_easy_items():
  rng = np.random.default_rng(4)
  b = jnp.asarray(rng.normal(size=5000), jnp.float32)
  probe = irt.probe_indices(jax.random.key(0), 5000)
  assert probe.shape == (1000,) and len(np.unique(np.asarray(probe))) == 1000
  correct = rng.random(1000) < 1 / (1 + np.exp(-(0.5 - np.asarray(b)[np.asarray(probe)])))
  step = jax.jit(irt.pudf_step)
  state, sel, theta_hat = step(irt.pudf_init(), b, probe, correct)
  assert abs(float(theta_hat) - 0.5) < 0.2
  assert int(sel.count) == int(jnp.sum(b <= state.theta))
  compiled = step._cache_size()   # (jit wrappers of the same function share one cache: count the new entries)
  step(state, b, probe, ~correct)
  assert step._cache_size() == compiled


def test_bad_input_is_one_line_error():
  for call, match in [
      (lambda: irt.fit_1pl(np.array([[0, 1], [2, 1]])), "0 \\(wrong\\) or 1"),
      (lambda: irt.fit_1pl(np.zeros(3)), "2-D"),
      (lambda: irt.fit_1pl(np.zeros((2, 2)), prior_std_ability=0.0), "prior"),
      (lambda: irt.estimate_ability(np.zeros(3), np.zeros(4)), "equal-length"),
      (lambda: irt.pudf_init(patience=0), "patience"),
      (lambda: irt.pudf_init(bump=-0.1), "bump"),
  ]:
    with pytest.raises(ValueError, match=match) as e:
      call()
    assert "\n" not in str(e.value)


# --- SubsetSource: the curriculum's epochs on prox.loop ----------------------------------------------------

def _dataset(n=20, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4, 1, 1)).astype(np.float32)
  return data_lib.ArrayDataset(x, (x[:, 0, 0, 0] > 0).astype(np.int32), 2, "toy")


def _drain(source, batch_size):
  out = []
  while (batch := source.next(batch_size)) is not None:
    out.append(batch)
  return out


def test_subset_source_epochs_visit_the_selected_items_once_and_complete_the_last_batch():
  ds = _dataset()
  source = irt.SubsetSource(ds, 7, num_epochs=3, items=[1, 4, 5, 8, 9, 12, 13])
  batches = []
  batches += [source.next(3) for _ in range(3)]                 # epoch 0: 7 items in 3 batches of 3
  assert source.epoch == 1
  source.select([0, 2, 3, 19])                                  # between epochs
  batches += _drain(source, 3)
  assert source.next(3) is None and len(batches) == 3 + 2 + 2
  # hand reference: epoch e visits items[default_rng([seed, e]).permutation(len(items))], and the last
  # batch wraps around to the epoch's first items
  for e, items, first in ((0, [1, 4, 5, 8, 9, 12, 13], 0), (1, [0, 2, 3, 19], 3), (2, [0, 2, 3, 19], 5)):
    order = np.asarray(items)[np.random.default_rng([7, e]).permutation(len(items))]
    k = -(-len(items) // 3)
    got = np.concatenate([b.data["index"] for b in batches[first:first + k]])
    np.testing.assert_array_equal(got, order[np.arange(3 * k) % len(items)])
    assert [b.boundary for b in batches[first:first + k]] == [None] * (k - 1) + ["epoch"]
    assert all(b.meta == {"epoch": e} and b.meta["epoch"].dtype == np.int32 for b in batches[first:first + k])
  for b in batches:
    np.testing.assert_array_equal(b.data["image"], ds.images[b.data["index"]])
    np.testing.assert_array_equal(b.data["label"], ds.labels[b.data["index"]])
    assert b.data["index"].dtype == np.int32


def test_subset_source_resumes_from_its_json_state_and_shards_over_processes():
  ds = _dataset(23)
  whole = irt.SubsetSource(ds, 3, num_epochs=4, items=np.arange(2, 19))
  first = [whole.next(4) for _ in range(6)]                     # stops mid-epoch 1
  saved = json.loads(json.dumps(whole.get_state()))
  rest = _drain(whole, 4)
  again = irt.SubsetSource(ds, 99, num_epochs=4)
  again.set_state(saved)
  for a, b in zip(rest, _drain(again, 4), strict=True):
    np.testing.assert_array_equal(a.data["index"], b.data["index"])
    assert a.boundary == b.boundary and a.meta == b.meta
  # two processes: each gets its half of every global batch
  shards = [irt.SubsetSource(ds, 3, num_epochs=1, process_index=p, process_count=2) for p in range(2)]
  single = irt.SubsetSource(ds, 3, num_epochs=1)
  for b in _drain(single, 8):
    parts = [s.next(8) for s in shards]
    np.testing.assert_array_equal(np.concatenate([p.data["index"] for p in parts]), b.data["index"])
    assert all(p.boundary == b.boundary for p in parts)
  del first


def test_subset_source_bad_input_is_one_line_error():
  ds = _dataset()
  source = irt.SubsetSource(ds, 0)
  source.next(3)
  for call, match in [
      (lambda: source.select([1, 2]), "only possible between epochs"),
      (lambda: irt.SubsetSource(ds, 0, items=[]), "non-empty"),
      (lambda: irt.SubsetSource(ds, 0, items=[0, 20]), r"indices in \[0, 20\)"),
      (lambda: irt.SubsetSource(ds, 0, items=[1, 1]), "distinct"),
      (lambda: irt.SubsetSource(ds, 0, num_epochs=0), "num_epochs"),
      (lambda: irt.SubsetSource(ds, -1), "seed"),
      (lambda: irt.SubsetSource(ds, 0, process_count=2, process_index=0).next(3), "divisible"),
  ]:
    with pytest.raises(ValueError, match=match) as e:
      call()
    assert "\n" not in str(e.value)


def _linear_loss(params, batch, rng):
  del rng
  logits = batch["image"].reshape(batch["image"].shape[0], -1) @ params["w"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), {}


_jitted_pudf_step = jax.jit(irt.pudf_step)


def _pudf_run(directory, num_steps, ds, difficulties):
  """PUDF on the loop: the schedule in ``extra``, the selection an action at the start and at each epoch
  boundary, the source's items checkpointed with its position."""
  tx = optax.sgd(0.5)
  mesh = step_lib.data_mesh(jax.devices()[:1])
  params = {"w": np.zeros((4, 2), np.float32)}
  state = step_lib.replicate(step_lib.init_state(params, tx, extra={"pudf": irt.pudf_init(min_items=4)}), mesh)
  step = step_lib.make_train_step(step_lib.stateless(_linear_loss), tx, mesh=mesh, donate=False)
  source = irt.SubsetSource(ds, 5, num_epochs=6)
  b = jnp.asarray(difficulties)

  def select(ctx):
    if source.epoch >= source.num_epochs:
      return None
    probe = irt.probe_indices(jax.random.fold_in(jax.random.key(0), source.epoch), len(ds.labels), 16)
    x = ds.images[np.asarray(probe)].reshape(len(probe), -1)
    correct = np.argmax(x @ np.asarray(ctx.state.params["w"]), -1) == ds.labels[np.asarray(probe)]
    schedule, sel, _ = _jitted_pudf_step(ctx.state.extra["pudf"], b, probe, correct)
    source.select(np.asarray(sel.indices)[:int(sel.count)])
    ctx.record.setdefault("items", []).append(int(sel.count))
    return ctx.state._replace(extra={"pudf": step_lib.replicate(jax.device_get(schedule), mesh)})

  return loop_lib.run(step, state, source, mesh=mesh, batch_size=4, num_steps=num_steps, checkpoint_dir=str(directory),
                      checkpoint=loop_lib.Every(steps=5), actions=((loop_lib.Every(start=True, boundary="epoch"), select),))


def test_pudf_on_the_loop_resumes_exactly(tmp_path):
  ds = _dataset(24)
  difficulties = np.linspace(-1.5, 1.5, 24).astype(np.float32)
  whole = _pudf_run(tmp_path / "whole", 100, ds, difficulties)   # the source ends the run after 6 epochs
  _pudf_run(tmp_path / "parts", 8, ds, difficulties)               # killed after 8 steps ...
  resumed = _pudf_run(tmp_path / "parts", 100, ds, difficulties)   # ... and started again
  assert resumed.resumed_from == 8
  assert resumed.record == whole.record and len(whole.record["items"]) == 6
  assert int(resumed.state.step) == int(whole.state.step) == sum(-(-c // 4) for c in whole.record["items"])
  np.testing.assert_array_equal(resumed.state.params["w"], whole.state.params["w"])
  for a, b in zip(jax.tree.leaves(resumed.state.extra), jax.tree.leaves(whole.state.extra)):
    np.testing.assert_array_equal(a, b)


def test_pudf_factory_is_init_update_and_step():
  machine = irt.pudf(patience=3, bump=0.2, min_items=2)
  state = machine.init()
  assert int(state.patience) == 3 and float(state.bump) == np.float32(0.2) and int(state.min_items) == 2
  b = jnp.array([-1.0, 0.0, 1.0, 2.0])
  new, sel = machine.update(state, 0.5, b)
  ref, ref_sel = irt.pudf_update(state, 0.5, b)
  jax.tree.map(np.testing.assert_array_equal, (new, sel), (ref, ref_sel))
  with pytest.raises(ValueError, match="patience"):
    irt.pudf(patience=0)
