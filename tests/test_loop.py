"""Tests of prox.loop: budgets, actions, resume, divergence, buckets."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prox import loop as L
from prox import optim
from prox import step as S
from prox.tasks import EpochSource, TaskSource
from prox.tasks import data as data_lib


def _dataset(n=96, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4, 1, 1)).astype(np.float32)
  y = (x[:, 0, 0, 0] + 0.5 * x[:, 1, 0, 0] > 0).astype(np.int32)
  return data_lib.ArrayDataset(x, y, 2, "toy")


def _loss(params, batch, rng):
  logits = batch["image"].reshape(batch["image"].shape[0], -1) @ params["w"] + params["b"]
  value = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return value, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}


def _setup(tx, extra=()):
  mesh = S.data_mesh()
  params = {"w": np.zeros((4, 2), np.float32), "b": np.zeros(2, np.float32)}
  state = S.replicate(S.init_state(params, tx, extra=extra, seed=0), mesh)
  return mesh, state


def test_budget_actions_and_record():
  tx = optax.sgd(0.1)
  mesh, state = _setup(tx)
  step = S.make_train_step(S.stateless(_loss), tx, mesh=mesh)
  seen = []

  def log(ctx):
    seen.append(("log", ctx.step, ctx.samples))
    ctx.record.setdefault("losses", []).append(float(ctx.out.metrics["loss"]))

  actions = ((L.Every(steps=4, end=True), log),
             (L.Every(samples=100), lambda ctx: seen.append(("samples", ctx.step, ctx.samples))),
             (L.Every(boundary="epoch"), lambda ctx: seen.append(("epoch", ctx.step, ctx.samples))),
             (L.Every(start=True), lambda ctx: seen.append(("start", ctx.step, ctx.samples))))
  result = L.run(step, state, EpochSource(_dataset(), 0), mesh=mesh, batch_size=16, num_steps=10,
                 actions=actions)
  assert result.steps_this_run == 10 and int(result.state.step) == 10 and int(result.state.samples) == 160
  assert seen == [("start", 0, 0), ("log", 4, 64), ("epoch", 6, 96), ("samples", 7, 112), ("log", 8, 128),
                  ("log", 10, 160)]
  assert len(result.record["losses"]) == 3
  assert result.compiles == 1


def test_sample_budget_stops_before_exceeding():
  tx = optax.sgd(0.1)
  mesh, state = _setup(tx)
  step = S.make_train_step(S.stateless(_loss), tx, mesh=mesh)
  result = L.run(step, state, EpochSource(_dataset(), 0), mesh=mesh, batch_size=16, num_samples=70)
  assert int(result.state.samples) == 64


def test_resume_continues_exactly(tmp_path):
  tx = optax.sgd(0.5, momentum=0.9)
  mesh, state = _setup(tx)
  step = S.make_train_step(S.stateless(_loss), tx, mesh=mesh, donate=False)

  def go(num_steps, directory):
    return L.run(step, state, EpochSource(_dataset(), 3), mesh=mesh, batch_size=16, num_steps=num_steps,
                 checkpoint_dir=str(directory), checkpoint=L.Every(steps=5),
                 actions=((L.Every(steps=1), lambda c: c.record.setdefault("steps", []).append(c.step)),))

  whole = go(17, tmp_path / "whole")
  first = go(8, tmp_path / "parts")
  assert first.steps_this_run == 8
  second = go(17, tmp_path / "parts")
  assert second.resumed_from == 8 and second.steps_this_run == 9
  jax.tree.map(np.testing.assert_array_equal, second.state.params, whole.state.params)
  jax.tree.map(np.testing.assert_array_equal, second.state.opt_state, whole.state.opt_state)
  assert second.record["steps"] == list(range(1, 18))
  assert second.train_seconds >= second.train_seconds_this_run > 0
  # Nothing left to do: a third run restores and runs only the end actions.
  third = go(17, tmp_path / "parts")
  assert third.steps_this_run == 0 and third.resumed_from == 17


def _squared_loss(params, batch, rng):
  pred = batch["image"].reshape(batch["image"].shape[0], -1) @ params["w"] + params["b"]
  return jnp.mean((pred - jax.nn.one_hot(batch["label"], 2)) ** 2), {}


def test_divergence_stops_with_one_line_and_keeps_the_last_finite_checkpoint(tmp_path):
  tx = optax.sgd(1e6)     # diverges: the weights grow ~1e6-fold a step until the loss overflows
  mesh, state = _setup(tx)
  step = S.make_train_step(S.stateless(_squared_loss), tx, mesh=mesh)
  with pytest.raises(L.Diverged) as err:
    L.run(step, state, EpochSource(_dataset(), 0), mesh=mesh, batch_size=16, num_steps=50,
          checkpoint_dir=str(tmp_path), checkpoint=L.Every(steps=1))
  message = str(err.value)
  assert "\n" not in message and "is not finite" in message and "last finite checkpoint is step" in message
  from prox import checkpoint as ckpt_lib
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    last = ckpt.all_steps()[-1]
    assert f"checkpoint is step {last} " in message and 1 < last < 50
    restored, _, _ = ckpt.restore_latest(state)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))


def test_nonfinite_steps_are_counted_when_skipped():
  tx = optax.sgd(0.1)
  mesh, state = _setup(tx)
  step = S.make_train_step(S.stateless(_loss), tx, mesh=mesh, skip_nonfinite=True)
  ds = _dataset()
  ds = ds._replace(images=np.where(np.arange(96)[:, None, None, None] < 16, np.nan, ds.images).astype(np.float32))
  result = L.run(step, state, EpochSource(ds, 0), mesh=mesh, batch_size=96, num_steps=3,
                 on_nonfinite="skip")
  assert result.nonfinite_steps == 3       # every full-dataset batch holds the NaN rows
  jax.tree.map(lambda x: np.testing.assert_array_equal(x, 0.0), result.state.params)


def test_actions_may_replace_the_state_and_stop_the_run():
  tx = optax.sgd(0.1)
  mesh, state = _setup(tx, extra={"resets": np.int32(0)})
  step = S.make_train_step(S.stateless(_loss), tx, mesh=mesh)
  reset = jax.jit(lambda s: s._replace(params=jax.tree.map(jnp.zeros_like, s.params),
                                       extra={"resets": s.extra["resets"] + 1}))

  def maybe_stop(ctx):
    if ctx.step == 6:
      ctx.stop()

  result = L.run(step, state, EpochSource(_dataset(), 0), mesh=mesh, batch_size=16, num_steps=50,
                 actions=((L.Every(steps=3), lambda ctx: reset(ctx.state)), (L.Every(steps=1), maybe_stop)))
  assert int(result.state.step) == 6 and int(result.state.extra["resets"]) == 2
  jax.tree.map(lambda x: np.testing.assert_array_equal(x, 0.0), result.state.params)


def test_growing_batch_compiles_once_per_bucket():
  tx = optax.sgd(0.1)
  controller = optim.batch_size_init(4, 96, multiple_of=4)
  mesh, state = _setup(tx, extra={"controller": controller})
  grow = S.in_extra("controller", lambda c, info: optim.batch_size_update(c, c.batch_size + 4))
  step = S.make_train_step(S.stateless(_loss), tx, mesh=mesh, micro_batch_size=4 // len(jax.devices()) or 1,
                           transition=grow)
  sizes = []
  result = L.run(step, state, EpochSource(_dataset(), 0), mesh=mesh,
                 batch_size=lambda ctx: int(ctx.state.extra["controller"].batch_size), num_samples=400,
                 micro_batch_size=4 // len(jax.devices()) or 1,
                 actions=((L.Every(steps=1), lambda ctx: sizes.append(ctx.batch_size)),))
  assert sizes[:5] == [4, 8, 12, 16, 20] and sum(sizes) <= 400
  buckets = {1 << (s // 4 - 1).bit_length() for s in sizes}
  assert result.compiles == len(buckets)


def test_task_source_boundaries_and_metadata(tmp_path):
  ds = _dataset()
  tx = optax.sgd(0.1)
  mesh, state = _setup(tx, extra={"last_task": np.int32(-1)})
  step = S.make_train_step(S.stateless(_loss), tx, mesh=mesh,
                           transition=lambda s, i: s._replace(extra={"last_task": i.meta["task"]}))
  ends = []
  source = TaskSource([ds, ds, ds], [2, 3, 1], seed=0)
  result = L.run(step, state, source, mesh=mesh, batch_size=16, num_steps=100,
                 actions=((L.Every(boundary="task"),
                           lambda ctx: ends.append((ctx.step, int(ctx.state.extra["last_task"])))),))
  assert ends == [(2, 0), (5, 1), (6, 2)] and result.steps_this_run == 6
  json.dumps(source.get_state())


def test_a_damaged_newest_checkpoint_falls_back(tmp_path, capsys):
  tx = optax.sgd(0.1)
  mesh, state = _setup(tx)
  step = S.make_train_step(S.stateless(_loss), tx, mesh=mesh, donate=False)
  kw = dict(mesh=mesh, batch_size=16, checkpoint_dir=str(tmp_path), checkpoint=L.Every(steps=2),
            keep_checkpoints=3)
  L.run(step, state, EpochSource(_dataset(), 0), num_steps=4, **kw)
  (tmp_path / "4" / "_CHECKPOINT_METADATA").write_text("{garbled")
  result = L.run(step, state, EpochSource(_dataset(), 0), num_steps=6, **kw)
  assert result.resumed_from == 2 and result.steps_this_run == 4
  assert "checkpoint 4" in capsys.readouterr().err


def test_micro_batch_size_must_match_the_step():
  """The loop packs micro-batches of its micro_batch_size; a step built without (or with another) size
  would read the padded buffer as one micro-batch n times (the step's sample clock then ran ahead)."""
  from prox import loop as L
  from prox import step as S
  mesh = S.data_mesh()
  tx = optax.sgd(0.1)
  params = {"w": np.zeros((3,), np.float32)}
  state = S.replicate(S.init_state(params, tx), mesh)
  loss = S.stateless(lambda p, b, r: (jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2), {}))
  for built in (None, 2):
    step = S.make_train_step(loss, tx, mesh=mesh, micro_batch_size=built)
    with pytest.raises(ValueError, match="micro_batch_size"):
      L.run(step, state, None, mesh=mesh, batch_size=4, num_steps=1, micro_batch_size=4)
  step = S.make_train_step(loss, tx, mesh=mesh)
  batch = S.shard_batch({"x": np.ones((4, 3), np.float32), "y": np.ones((4,), np.float32)}, mesh)
  with pytest.raises(ValueError, match="num_micro_batches"):
    step(state, batch, np.int32(1))


def test_step_sample_clock_follows_the_loop_with_a_varying_batch():
  """The step counts real examples only (not the padded buffer): state.samples == the loop's samples."""
  mesh = S.data_mesh()
  train = data_lib.load("digits", "train")
  tx = optax.sgd(0.01)
  params = {"w": np.zeros((64, 10), np.float32)}

  def loss(p, b, r):
    logits = b["image"].reshape(len(b["label"]), -1) @ p["w"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, b["label"])), {}

  step = S.make_train_step(S.stateless(loss), tx, mesh=mesh, micro_batch_size=4)
  seen = []
  L.run(step, S.replicate(S.init_state(params, tx), mesh), EpochSource(train, seed=0), mesh=mesh,
        batch_size=lambda ctx: 4 * (1 + ctx.step % 3), num_steps=7, micro_batch_size=4,
        actions=((L.Every(steps=1), lambda ctx: seen.append((ctx.samples, int(ctx.state.samples)))),))
  assert [a for a, _ in seen] == [4, 12, 24, 28, 36, 48, 52]
  assert [b for _, b in seen] == [a for a, _ in seen]
