"""Tests for prox.tasks._experts: TAME's switch / spawn / reuse logic, selector loss and routing, pruning."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox.tasks._experts import expert_losses, routed_apply, tame
from prox.tasks.shift_detector import shift_detector

DET = shift_detector(reference_window=5, test_window=2, threshold=3.0, min_std=1e-3)


def _quiet(n, level=0.1, seed=0):
  return level + 0.01 * np.random.default_rng(seed).normal(size=n)


def _run(machine, state, params, losses, expert_losses_fn=None):
  """Feeds a loss sequence; returns the final state/params and the update records."""
  records = []
  for loss in losses:
    el = None if expert_losses_fn is None else expert_losses_fn(state, params)
    state, out = machine.update(state, params, jnp.float32(loss), el)
    records.append(out)
    params = out.params
  return state, params, records


def test_a_loss_jump_spawns_a_copy_then_a_known_task_is_reused():
  machine = tame(3, detector=DET, reuse_threshold=0.5)
  p0 = {"w": jnp.asarray([1.0, 2.0])}
  state = machine.init(p0)
  trained = {"w": jnp.asarray([1.5, 2.5])}                     # expert 0 after some training
  # expert 0 fits task A (loss 0.1) but not task B (2.0): on the jump, no expert fits, so spawn
  el = lambda s, p: jnp.asarray([2.0, jnp.inf, jnp.inf])
  state, params, rec = _run(machine, state, trained, list(_quiet(8)) + [2.0, 2.1], el)
  flags = [bool(r.switched) for r in rec]
  assert flags.index(True) == 8 and sum(flags) == 1           # flagged at the jump (R + W = 7 losses seen)
  assert bool(rec[8].spawned) and bool(rec[8].changed)
  assert int(state.num_experts) == 2 and int(state.active) == 1
  np.testing.assert_allclose(state.experts["w"][0], trained["w"])   # expert 0 written back
  np.testing.assert_allclose(params["w"], trained["w"])             # the new expert is a copy
  # expert 1 trains on B; then task A returns: expert 0's loss on the batch is low, so reuse it
  b_trained = {"w": jnp.asarray([-3.0, 0.0])}
  el = lambda s, p: jnp.asarray([0.2, 3.0, jnp.inf])
  state, params, rec = _run(machine, state, b_trained, list(_quiet(8, 2.0)) + [4.0, 4.0], el)
  assert [bool(r.switched) for r in rec].count(True) == 1
  last = rec[8]
  assert bool(last.changed) and not bool(last.spawned)
  assert int(state.active) == 0 and int(state.num_experts) == 2
  np.testing.assert_allclose(params["w"], trained["w"])
  np.testing.assert_allclose(machine.bank(state, params)["w"][1], b_trained["w"])
  np.testing.assert_allclose(machine.expert(state, params, 1)["w"], b_trained["w"])


def test_fresh_spawn_and_a_full_bank():
  machine = tame(2, detector=DET, spawn="fresh")
  p0 = {"w": jnp.zeros((2,))}
  state = machine.init(p0, fresh={"w": jnp.asarray([7.0, 7.0])})
  state, params, rec = _run(machine, state, p0, list(_quiet(8)) + [3.0, 3.0])
  np.testing.assert_allclose(params["w"], [7.0, 7.0])
  assert int(state.active) == 1
  # the bank is full: without expert losses training stays on the active expert
  state, params, rec = _run(machine, state, params, list(_quiet(8, 1.0)) + [5.0, 5.0])
  assert any(bool(r.switched) for r in rec) and not any(bool(r.changed) for r in rec)
  assert int(state.active) == 1 and int(state.num_experts) == 2
  with pytest.raises(ValueError, match="fresh"):
    machine.init(p0, fresh=[{"w": jnp.zeros((2,))}] * 3)


def test_update_runs_in_a_scan_without_retracing():
  machine = tame(3, detector=DET)
  p0 = {"w": jnp.zeros((2,))}

  def body(carry, loss):
    state, params = carry
    state, out = machine.update(state, params, loss)
    return (state, jax.tree.map(lambda x: x + 1.0, out.params)), out.spawned

  losses = jnp.asarray(np.concatenate([_quiet(8), [3.0, 3.0], _quiet(8, 3.0), [9.0, 9.0]]), jnp.float32)
  (state, params), spawned = jax.jit(lambda s, p, l: jax.lax.scan(body, (s, p), l))(machine.init(p0), p0, losses)
  assert int(state.num_experts) == 3 and np.asarray(spawned).sum() == 2
  # flags at steps 8 and 18 (params + 1 per step): slot 0 keeps step 8's weights, copied into slot 1,
  # which trained until step 18 and was copied into slot 2
  assert np.flatnonzero(np.asarray(spawned)).tolist() == [8, 18]
  np.testing.assert_allclose(state.experts["w"][0], [8.0, 8.0])
  np.testing.assert_allclose(state.experts["w"][1], [18.0, 18.0])
  np.testing.assert_allclose(params["w"], [20.0, 20.0])


def test_selector_loss_and_routing_respect_live_experts():
  machine = tame(4)
  state = machine.init({"w": jnp.zeros(())})._replace(alive=jnp.asarray([True, True, False, False]),
                                                        route_to=jnp.asarray([0, 1, 1, 3]))
  logits = jnp.asarray([[0.0, 1.0, 5.0, 0.0], [2.0, 1.0, 0.0, 9.0]])
  assert machine.route(state, logits).tolist() == [1, 0]
  ce = machine.selector_loss(state, logits, jnp.asarray([2, 0]))  # label 2 was pruned into expert 1
  lsm = np.asarray(jax.nn.log_softmax(np.asarray([[0.0, 1.0], [2.0, 1.0]])))
  np.testing.assert_allclose(ce, [-lsm[0, 1], -lsm[1, 0]], rtol=1e-6)


def test_prune_drops_dominated_experts_and_reroutes():
  machine = tame(4)
  state = machine.init({"w": jnp.zeros(())})._replace(
      num_experts=jnp.int32(4), alive=jnp.ones((4,), bool), active=jnp.int32(3))
  val = jnp.asarray([[1.0, 1.0],      # 0: dominated by 1 and by 2; 2 has the lower total
                     [0.9, 1.0],      # 1: dominated by 2
                     [0.5, 0.5],      # 2: undominated
                     [5.0, 5.0]])     # 3: dominated, but active: kept
  pruned = machine.prune(state, val)
  assert pruned.alive.tolist() == [False, False, True, True]
  assert pruned.route_to.tolist() == [2, 2, 2, 3]
  # ties everywhere dominate nothing
  assert machine.prune(state, jnp.ones((4, 2))).alive.tolist() == [True] * 4
  with pytest.raises(ValueError, match="val_losses"):
    machine.prune(state, jnp.ones((3, 2)))


def test_routed_apply_and_expert_losses():
  bank = {"w": jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])}
  apply = lambda p, x: x @ p["w"]
  x = jnp.asarray([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
  out = routed_apply(apply, bank, jnp.asarray([2, 0, 1]), x)
  np.testing.assert_allclose(out, [3.0, 3.0, 6.0])
  el = expert_losses(lambda p, b: jnp.mean(apply(p, b)), bank, x)
  np.testing.assert_allclose(el, [3.0, 4.0, 7.0])


def test_bad_options():
  with pytest.raises(ValueError, match="max_experts"):
    tame(0)
  with pytest.raises(ValueError, match="spawn"):
    tame(2, spawn="random")
  machine = tame(2)
  with pytest.raises(ValueError, match="expert_losses"):
    machine.update(machine.init({"w": jnp.zeros(())}), {"w": jnp.zeros(())}, jnp.float32(1.0), jnp.zeros((3,)))


def test_tame_as_a_transition_of_the_one_step():
  """The machine in TrainState.extra, driven by a transition that swaps params and resets opt_state."""
  from prox import step as S
  tx = optax.adam(0.05)
  # a converging full-batch loss is nearly flat: a noise floor keeps its small wiggles from looking like a switch
  machine = tame(3, detector=shift_detector(reference_window=5, test_window=2, threshold=5.0, min_std=0.05))

  def loss(params, batch, rng):
    del rng
    return jnp.mean(jnp.square(batch["x"] @ params["w"] - batch["y"])), {}

  def transition(state, info):
    tstate, out = machine.update(state.extra["tame"], state.params, info.loss)
    opt_state = jax.tree.map(lambda new, old: jnp.where(out.changed, new, old), tx.init(out.params),
                             state.opt_state)
    return state._replace(params=out.params, opt_state=opt_state, extra={"tame": tstate})

  params = {"w": jnp.zeros((2,))}
  state = S.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), model_state={},
                       extra={"tame": machine.init(params)}, rng=jax.random.key_data(jax.random.key(0)))
  mesh = S.data_mesh()
  state = S.replicate(state, mesh)
  step = S.make_train_step(S.stateless(loss), tx, transition=transition)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 2)).astype(np.float32)
  for w_true in ([1.0, -1.0], [-4.0, 5.0]):                    # task A, then task B (a loss jump)
    batch = S.shard_batch({"x": x, "y": (x @ np.asarray(w_true, np.float32))}, mesh)
    for _ in range(40):
      state, _ = step(state, batch)
  tstate = state.extra["tame"]
  assert int(tstate.num_experts) == 2 and int(tstate.active) == 1
  assert step._cache_size() == 1
  # expert 0 keeps what it learned on A; the active expert moves on towards B
  a_loss = float(jnp.mean(jnp.square(x @ tstate.experts["w"][0] - x @ np.asarray([1.0, -1.0], np.float32))))
  assert a_loss < 0.5
