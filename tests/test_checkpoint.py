"""Tests for prox.checkpoint.Checkpointer (orbax round trips, retention, intervals, sharding, crashes)."""
import inspect
import os
import pickle
import select
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prox.checkpoint import CheckpointError, Checkpointer
from prox.step import TrainState


def make_state(seed: int, opt: str = "chain") -> TrainState:
  """A TrainState with non-trivial values: random params, two optimizer updates applied."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {"w": jax.random.normal(k1, (4, 3)),
            "b": jax.random.normal(k2, (3,)).astype(jnp.bfloat16)}
  if opt == "chain":
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
  else:
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=3e-3, b1=0.8)
  opt_state = tx.init(params)
  for i in range(2):
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5 * (i + 1 + seed)), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  model_state = {"bn": {"mean": jax.random.uniform(k3, (3,))}}
  return TrainState(step=jnp.int32(2 + seed), params=params, opt_state=opt_state,
                    model_state=model_state, extra=(jnp.float32(seed),),
                    rng=jax.random.key_data(jax.random.key(seed + 100)))


def assert_identical(got, want):
  """Same pytree structure (NamedTuple types included), dtypes, shapes and bits."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def namedtuple_types(tree) -> list[type]:
  """The NamedTuple node types of a pytree, depth first."""
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return [type(tree)] + [t for child in tree for t in namedtuple_types(child)]
  if isinstance(tree, (tuple, list)):
    return [t for child in tree for t in namedtuple_types(child)]
  if isinstance(tree, dict):
    return [t for key in sorted(tree) for t in namedtuple_types(tree[key])]
  return []


# The subprocesses below run make_state / assert_identical from this file's source.
_PRELUDE = ("import os, sys, time\nimport numpy as np, jax, jax.numpy as jnp, optax\n"
            "from prox.step import TrainState\n")


def script(body: str) -> str:
  return (_PRELUDE + inspect.getsource(make_state) + inspect.getsource(assert_identical)
          + textwrap.dedent(body))


def run_script(body: str, env_extra: dict | None = None, timeout: float = 60) -> str:
  src = script(body)
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
  proc = subprocess.run([sys.executable, "-c", src], env=env, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.parametrize("opt", ["chain", "inject"])
@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_bit_identical(tmp_path, opt, async_save):
  state = make_state(1, opt)
  meta = {"examples_seen": 12345, "batch_size": 64, "config": {"lr": 0.1, "name": "x"}}
  with Checkpointer(tmp_path, async_save=async_save) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(3, state, meta)
  target = make_state(0, opt)   # same structure, different values
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 3
    restored, got_meta = ckpt.restore(target)
  assert_identical(restored, state)
  assert got_meta == meta
  # NamedTuple optax states come back as the same types, not dicts or tuples.
  assert type(restored) is TrainState
  want_types = namedtuple_types(state.opt_state)
  assert namedtuple_types(restored.opt_state) == want_types and len(want_types) >= 2
  if opt == "inject":
    assert isinstance(restored.opt_state, optax.InjectStatefulHyperparamsState)
    assert float(restored.opt_state.hyperparams["b1"]) == pytest.approx(0.8)


def test_restore_from_abstract_target(tmp_path):
  state = make_state(2)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(5, state, {})
    restored, meta = ckpt.restore(abstract)
  assert_identical(restored, state)
  assert meta == {}


def test_max_to_keep_and_latest_step(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    for step in range(1, 6):
      assert ckpt.save(step, make_state(step), {"step": step})
      assert ckpt.latest_step() == step
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [4, 5]
    # A step that is not newer than the latest one is refused.
    assert not ckpt.save(5, make_state(5), {}, force=True)
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["4", "5"]
  with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    assert ckpt.latest_step() == 5 and ckpt.all_steps() == [4, 5]


def test_save_interval_and_force(tmp_path):
  with Checkpointer(tmp_path, save_interval_steps=3, max_to_keep=10) as ckpt:
    saved = [step for step in range(1, 8) if ckpt.save(step, make_state(0), {"step": step})]
    assert saved == [3, 6]
    assert ckpt.save(7, make_state(0), {"step": 7}, force=True)
    assert ckpt.all_steps() == [3, 6, 7] and ckpt.latest_step() == 7


def test_restore_older_step(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
    for step in (10, 20, 30):
      ckpt.save(step, make_state(step), {"step": step})
    old, meta = ckpt.restore(make_state(0), step=20)
    latest, latest_meta = ckpt.restore(make_state(0))
  assert_identical(old, make_state(20))
  assert meta == {"step": 20} and latest_meta == {"step": 30}
  assert_identical(latest, make_state(30))


def test_restore_keeps_target_sharding_one_device(tmp_path):
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  replicated = NamedSharding(mesh, P())
  state = make_state(3)
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, {})
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          make_state(0))
    restored, _ = ckpt.restore(target)
  assert_identical(restored, state)
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding == replicated


def test_restore_onto_two_fake_devices(tmp_path):
  """Saved on one device; restored (and re-saved) on two fake CPU devices with the target's shardings."""
  saved = make_state(4)
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(4, saved, {"examples_seen": 4})
  # The values to expect travel as a pickle: the child recomputing them on CPU could differ in the
  # last bit from this process's backend (a GPU, say).
  with open(tmp_path / "want.pkl", "wb") as f:
    pickle.dump([np.asarray(leaf) for leaf in jax.tree.leaves(saved)], f)
  out = run_script(f"""
    import pickle
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from prox.checkpoint import CheckpointError, Checkpointer
    assert len(jax.devices()) == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    with open({str(tmp_path / "want.pkl")!r}, "rb") as f:
      want = jax.tree.unflatten(jax.tree.structure(make_state(0)), pickle.load(f))
    shardings = jax.tree.map(lambda x: rep, want)
    shardings = shardings._replace(params={{"w": split, "b": rep}})
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          want, shardings)
    with Checkpointer({str(tmp_path / "ckpt")!r}) as ckpt:
      got, meta = ckpt.restore(target)
      assert meta == {{"examples_seen": 4}}, meta
      assert_identical(got, want)
      for leaf, s in zip(jax.tree.leaves(got), jax.tree.leaves(shardings)):
        assert leaf.sharding == s, (leaf.sharding, s)
      assert len(got.params["w"].addressable_shards) == 2
      assert got.params["w"].addressable_shards[0].data.shape == (2, 3)
      ckpt.save(5, got, meta)                      # save the sharded state on 2 devices
      again, _ = ckpt.restore(target, step=5)
      assert_identical(again, want)
      for leaf, s in zip(jax.tree.leaves(again), jax.tree.leaves(shardings)):
        assert leaf.sharding == s
    print("OK")
  """, env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert out.strip().endswith("OK")


def test_save_killed_half_way_is_never_latest(tmp_path):
  """SIGKILL while step 2 sits complete-but-uncommitted in its tmp dir: step 1 stays the latest."""
  body = f"""
    import pickle
    from orbax.checkpoint._src.path import atomicity
    from prox.checkpoint import CheckpointError, Checkpointer
    ckpt = Checkpointer({str(tmp_path / "ckpt")!r})
    ckpt.save(1, make_state(1), {{"step": 1}})
    ckpt.wait_until_finished()
    with open({str(tmp_path / "want.pkl")!r}, "wb") as f:   # what step 1 holds, as computed here
      pickle.dump([np.asarray(leaf) for leaf in jax.tree.leaves(make_state(1))], f)
    async def hang(self):        # stop right before the commit (the atomic rename)
      print("FINALIZING", flush=True)
      time.sleep(600)
    atomicity.AtomicRenameTemporaryPath.finalize = hang
    ckpt.save(2, make_state(2), {{"step": 2}})
    ckpt.wait_until_finished()
  """
  proc = subprocess.Popen([sys.executable, "-c", script(body)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    deadline = time.monotonic() + 60
    line = ""
    while "FINALIZING" not in line:
      ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
      assert ready and proc.poll() is None, f"child did not reach the commit: {proc.stderr.read()}"
      line = proc.stdout.readline()
    tmp_dirs = [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("2.")]
    assert tmp_dirs and all("tmp" in name for name in tmp_dirs), tmp_dirs
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
  assert proc.returncode == -signal.SIGKILL
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    restored, meta = ckpt.restore(make_state(0))
    with open(tmp_path / "want.pkl", "rb") as f:
      want = jax.tree.unflatten(jax.tree.structure(make_state(0)), pickle.load(f))
    assert_identical(restored, want)
    assert meta == {"step": 1}
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("2")]  # tmp removed
    assert ckpt.save(2, make_state(2), {"step": 2})                                  # step 2 redone


@pytest.mark.parametrize("kwargs", [{"max_to_keep": 0}, {"save_interval_steps": 0},
                                    {"max_to_keep": 1.5}, {"save_interval_steps": True}])
def test_bad_arguments_raise(tmp_path, kwargs):
  with pytest.raises(ValueError, match=next(iter(kwargs))):
    Checkpointer(tmp_path, **kwargs)


def test_bad_meta_and_empty_directory(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(TypeError, match="meta"):
      ckpt.save(1, make_state(0), [1, 2])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      ckpt.restore(make_state(0))


# --- restore_latest: damaged checkpoints ------------------------------------------------------------

def _save_steps(directory, steps=(100, 200, 300), max_to_keep=3):
  with Checkpointer(directory, max_to_keep=max_to_keep, async_save=False) as ckpt:
    for step in steps:
      ckpt.save(step, make_state(step % 7), {"step": step})


def _truncate(path):
  size = path.stat().st_size
  assert size > 16, path
  with open(path, "r+b") as f:
    f.truncate(size // 2)


def _array_files(step_dir):
  """The tensorstore/OCDBT data files that hold the state's arrays (``state/d/<hash>``, merged from
  each process's ``ocdbt.process_<i>`` at commit)."""
  files = sorted((step_dir / "state" / "d").iterdir())
  assert files, step_dir
  return files


def _damage(kind, step_dir):
  """Damages one saved step the way a full disk, a killed copy or a bad sync leaves it."""
  if kind == "truncated_array_file":
    for path in _array_files(step_dir):
      _truncate(path)
  elif kind == "checkpoint_metadata_not_json":
    (step_dir / "_CHECKPOINT_METADATA").write_bytes(b'{"item_handlers": {"state": "orbax.ch')
  elif kind == "checkpoint_metadata_not_object":   # valid JSON: crashed orbax's CheckpointManager()
    (step_dir / "_CHECKPOINT_METADATA").write_text("[1, 2]")
  elif kind == "state_metadata":
    _truncate(step_dir / "state" / "_METADATA")
  elif kind == "meta_metadata":
    (step_dir / "meta" / "metadata").write_bytes(b"\xff\xfe garbage")
  elif kind == "empty_step_folder":
    for path in sorted(step_dir.rglob("*"), reverse=True):
      path.rmdir() if path.is_dir() else path.unlink()
  else:
    raise ValueError(kind)


_REASONS = {
    "truncated_array_file": "truncated array file state/d/",
    "checkpoint_metadata_not_json": "damaged _CHECKPOINT_METADATA: not JSON",
    "checkpoint_metadata_not_object": "damaged _CHECKPOINT_METADATA: not a JSON object",
    "state_metadata": "damaged state/_METADATA: not JSON",
    "meta_metadata": "damaged meta/metadata: not JSON",
    "empty_step_folder": "empty step directory",
}


@pytest.mark.parametrize("kind", list(_REASONS))
def test_restore_latest_falls_back_past_a_damaged_newest_step(tmp_path, capfd, kind):
  _save_steps(tmp_path)
  _damage(kind, tmp_path / "300")
  capfd.readouterr()
  with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
    state, meta, step = ckpt.restore_latest(make_state(0))
    assert (step, meta) == (200, {"step": 200})
    assert_identical(state, make_state(200 % 7))
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"prox: warning: checkpoint 300 in {tmp_path} does not restore "
                          f"({_REASONS[kind]}"), err
    assert f"); using 200; moved to {tmp_path / 'corrupt' / '300'}\n" in err
    # Moved aside, not deleted: step 300 can be saved again, and max_to_keep counts good steps only.
    assert (tmp_path / "corrupt" / "300").is_dir() and not (tmp_path / "300").exists()
    assert ckpt.all_steps() == [100, 200] and ckpt.latest_step() == 200
    assert ckpt.save(300, make_state(3), {"step": 300})
    assert ckpt.save(400, make_state(4), {"step": 400})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [200, 300, 400]
  with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
    state, meta, step = ckpt.restore_latest(make_state(0))
    assert (step, meta) == (400, {"step": 400})
    assert_identical(state, make_state(4))
  assert capfd.readouterr().err == ""
  assert sorted(p.name for p in tmp_path.iterdir()) == ["200", "300", "400", "corrupt"]


def test_restore_latest_skips_several_damaged_steps_one_line_each(tmp_path, capfd):
  _save_steps(tmp_path, (100, 200, 250, 300), max_to_keep=4)
  _damage("truncated_array_file", tmp_path / "300")
  _damage("empty_step_folder", tmp_path / "250")
  capfd.readouterr()
  with Checkpointer(tmp_path, max_to_keep=4) as ckpt:
    _, meta, step = ckpt.restore_latest(make_state(0))
  assert (step, meta) == (200, {"step": 200})
  lines = capfd.readouterr().err.splitlines()
  assert len(lines) == 2
  assert lines[0].startswith("prox: warning: checkpoint 300 ") and "truncated array file" in lines[0]
  assert lines[1].startswith("prox: warning: checkpoint 250 ") and "empty step directory" in lines[1]
  assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == ["250", "300"]


def test_restore_latest_moves_a_step_damaged_twice_beside_the_first(tmp_path, capfd):
  _save_steps(tmp_path, (100, 200))
  for _ in range(2):
    _damage("truncated_array_file", tmp_path / "200")
    with Checkpointer(tmp_path, async_save=False) as ckpt:
      assert ckpt.restore_latest(make_state(0))[2] == 100
      ckpt.save(200, make_state(2), {"step": 200})
  assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == ["200", "200.1"]
  assert len(capfd.readouterr().err.splitlines()) == 2


def test_restore_latest_when_nothing_restores_is_one_line_and_moves_nothing(tmp_path, capfd):
  _save_steps(tmp_path)
  for step in (100, 200, 300):
    _damage("truncated_array_file", tmp_path / str(step))
  capfd.readouterr()
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError) as info:
      ckpt.restore_latest(make_state(0))
  message = str(info.value)
  assert isinstance(info.value, ValueError) and "\n" not in message
  assert message.startswith(f"no checkpoint in {tmp_path} restores: 300 (truncated array file ")
  assert "; 200 (truncated" in message and "; 100 (truncated" in message
  assert capfd.readouterr().err == ""
  assert sorted(p.name for p in tmp_path.iterdir()) == ["100", "200", "300"]


def test_restore_latest_with_a_mismatched_target_moves_nothing(tmp_path):
  """Every step failing alike means the target is wrong (another model), not that the files are."""
  _save_steps(tmp_path)
  wrong = make_state(0)._replace(params={"w": jnp.zeros((5, 3))})
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match=r"^no checkpoint in .* restores: 300 \(") as info:
      ckpt.restore_latest(wrong)
    assert "\n" not in str(info.value)
    assert ckpt.all_steps() == [100, 200, 300]
  assert not (tmp_path / "corrupt").exists()


def test_restore_latest_without_checkpoints_is_none(tmp_path, capfd):
  with Checkpointer(tmp_path / "new") as ckpt:
    assert ckpt.restore_latest(make_state(0)) is None
  assert capfd.readouterr().err == ""


def test_restore_latest_takes_the_decision_of_all_processes(tmp_path, capfd, monkeypatch):
  """A step that restored here but failed on another process is skipped on this one too."""
  import prox.checkpoint as checkpoint_lib
  _save_steps(tmp_path)
  seen = []

  def all_processes(ok):   # what the all-gather would return if process 1 failed on step 300
    seen.append(ok)
    return ok and len(seen) > 1

  monkeypatch.setattr(checkpoint_lib, "_all_processes", all_processes)
  capfd.readouterr()
  with Checkpointer(tmp_path) as ckpt:
    _, meta, step = ckpt.restore_latest(make_state(0))
  assert seen == [True, True] and step == 200
  err = capfd.readouterr().err
  assert err.startswith("prox: warning: checkpoint 300 ") and "(failed on another process)" in err
  assert (tmp_path / "corrupt" / "300").is_dir()
