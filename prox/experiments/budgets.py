"""Experiment ``budgets``: compute-budget curricula, NoProp, private training and unlearning on the one loop.

  prox --config=prox/experiments/configs/budgets.py --workdir=runs/budgets

Expected effects, fixed before any run and reported either way (paired comparisons over seeds,
``report.paired_comparison``; "within 2 points" means a mean paired difference of at most 0.02 in
absolute value, and the table also says whether the 95% interval lies inside +-0.02):

1. ``budget``: the decaying budget beats the fixed tight budget at the final budget (test accuracy of the
   prediction after ``B_min`` refinement steps; on each dataset).
2. ``noprop``: NoProp is within 2 points of backprop on digits (test accuracy; backprop trains an MLP of
   about NoProp's parameter count with the same optimizer, steps and batches).
3. ``privacy``: fine-tuning the DP model on the retained data reaches retraining's forgotten-set accuracy
   (within 2 points) at a fraction of its cost (optimizer steps and training time).

Parts (``config.parts``):

* ``budget`` (Hammoud et al. 2025, "Train Long, Think Short: Curriculum Learning for Efficient
  Reasoning"; Tian et al. 2025, "Reinforcement Mid-Training"), on digits and MNIST-1D: a weight-tied
  iterative classifier (``prox.models.IterativeClassifier``, ``K`` refinement steps, the prediction after
  ``n`` steps is the budget-``n`` answer) trained for the same number of steps by four arms:
  ``fixed``: cross-entropy of the prediction at the final budget ``B_min`` throughout; ``decay``: the same
  loss at the budget ``B(s)`` of ``prox.tasks.budget_schedule`` (generous ``B_0`` to ``B_min`` over the
  first ``decay_fraction`` of the steps, then ``B_min``), whose state lives in ``TrainState.extra``, is
  read by the loss through ``ctx.extra`` and steps in the compiled step (a transition); ``entropy``: at
  ``B_min``, examples drawn by ``prox.tasks.entropy_curriculum`` (``p_i ~ exp(-beta h_i)``, ``h_i`` each
  example's latest normalised predictive entropy, written by the step's transition from its own batch;
  ``beta`` annealed from ``beta_start`` (easy first) to ``beta_end`` over ``decay_fraction``); ``grpo``:
  GRPO (Shao et al. 2024) with the halting step as the length: per input ``G`` samples of a halting step
  ``l`` (``prox.losses.halting_log_probs`` of a halting head over ``1..K``) and a class ``c ~ softmax(z_l)``,
  reward ``r = 1[c = y] + w 1[l <= B(s)] 1[c = y]`` (``prox.losses.budget_reward``, shape "within",
  gated) under the decaying budget, group-relative advantages and the clipped surrogate
  (``prox.losses.grpo_loss``; one update per batch, so the ratio is 1 and no KL term). Every arm is
  evaluated by the test accuracy of its prediction after ``B_min`` steps (and after each ``n = 1..K``).
* ``interval`` (Hu et al. 2025, "Towards Better Alignment: Training Diffusion Models with Reinforcement
  Learning Against Sparse Rewards", B^2-DiffuRL): a DDPM chain (Ho et al. 2020) of ``T`` steps on 2-D
  points (8 Gaussians on a circle; an MLP predicts the noise), pretrained on the mixture, then fine-tuned
  by policy gradient (each denoising step a Gaussian policy; DDPO-style, Black et al. 2024) against a
  sparse terminal reward, ``r = 1`` if the final point lies within ``reward_radius`` of one of the 4
  even-numbered modes, with advantages normalised over the batch (one group). ``backward``: only the
  steps of the interval ``[t_s, T]`` (``prox.tasks.backward_interval``, from the last step alone to the
  whole chain over ``grow_fraction`` of the updates) carry the loss (``prox.losses.interval_step_loss``);
  ``all``: every step from the start. Reported: the final reward, its curve, and the diversity (the
  normalised entropy of the rewarded samples over the 4 rewarded modes).
* ``staged`` (Lee, Cho and Yoo 2023, "Instruction Tuning with Human Curriculum"), on digits: item
  difficulties from an artificial crowd's answers and a 1PL IRT fit (as PUDF, Meng, Lalor et al. 2024,
  ``prox.tasks.irt``), binned into ``num_levels`` equal-count levels (``prox.tasks.difficulty_levels``), the
  class as the group; an MLP trained for ``epochs`` epochs whose order is ``prox.tasks.staged_sampler``'s
  ``blocked`` (class by class, easy to hard within a class), ``interleaved`` (easy to hard, classes taking
  turns) or ``mixed`` (uniformly random order), or ``random``: the interleaved order with the levels
  randomly permuted (the same staging with tags that carry no difficulty).
* ``noprop`` (Li, Teh and Pascanu 2025, "NoProp: Training Neural Networks without Back-propagation or
  Forward-propagation", NoProp-DT), on digits and MNIST-1D: ``prox.models.NoPropDT``, one block per step
  (``t ~ U{0..T-1}`` drawn in the loss), against backprop training of an MLP with ``baseline_depth``
  hidden layers whose width makes its parameter count the closest to NoProp's. Memory: the temporary
  memory of each compiled training step (XLA's ``memory_analysis().temp_size_in_bytes``); the benchmark
  ``benchmarks/noprop_memory.py`` compares the same blocks trained end to end.
* ``privacy`` (Al Mahmud, Jebreel, Domingo-Ferrer and Sanchez 2025, "DP2Unlearning"), on digits: an MLP
  trained with DP-SGD (Abadi et al. 2016) in ``prox.step``: ghost clipping
  (``prox.optim.ghost_clipped_loss``) and ``prox.optim.dp_noise`` on Poisson-sampled batches (each
  example joins a step's batch with probability ``q = batch_size / N``; the buffer is padded with weight-0
  rows and the gradient normalised by the expected batch size); ``epsilon`` from the accountant
  (``prox.tasks.dp_epsilon``, RDP and PLD) for the run's ``sigma``, ``q``, steps and ``delta``. A random
  ``forget_fraction`` of the train split is then forgotten: ``finetune_dp``: the DP model fine-tuned
  without noise on the retained data only (``prox.tasks.unlearning``'s sampler and loss weights) for
  ``finetune_steps``; ``retrain``: a fresh model trained on the retained data for ``retrain_steps``;
  and, to show what the DP base buys, ``plain`` (the same training without clipping and noise) and
  ``finetune_plain`` (``plain`` fine-tuned like ``finetune_dp``). Each is scored on the forgotten,
  retained and test data, by the loss-threshold membership AUC of the forgotten set against the test
  set (``prox.tasks.membership_auc``; 0.5: no leak) and by its cost (steps, training time).

Every run is one ``prox.loop.run`` in its own directory under ``workdir/<part>/`` (``config.json``,
``result.json``; models that later runs start from keep a checkpoint), so a run that finished is reused
when the command is run again (``common.run_once``). Outputs: ``results.md`` (tables, the paired
comparisons with the expected effects), ``results.json`` and PNG plots.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from prox import loop
from prox import losses
from prox import models
from prox import optim
from prox import step as step_lib
from prox import tasks
from prox.checkpoint import Checkpointer
from prox.experiments import common
from prox.experiments import report
from prox.tasks import data as data_lib
from prox.tasks import irt

PARTS = ("budget", "interval", "staged", "noprop", "privacy")
DATASETS = ("digits", "mnist1d")
BUDGET_ARMS = ("fixed", "decay", "entropy", "grpo")
INTERVAL_ARMS = ("backward", "all")
SCHEDULES = ("blocked", "interleaved", "mixed", "random")
PRIVACY_MODELS = ("plain", "dp", "finetune_plain", "finetune_dp", "retrain")
ConfigError = common.ConfigError

# ``--config.quick=True``: a small run of every part (tests, smoke checks); applied by ``prox``.
QUICK = {
    "num_seeds": 1,
    "budget.datasets": "digits",
    "budget.num_steps": 60,
    "budget.max_steps": 4,
    "budget.start": 4,
    "budget.eval_every": 30,
    "interval.chain_steps": 4,
    "interval.hidden": (32,),
    "interval.pretrain_steps": 100,
    "interval.rl_steps": 20,
    "interval.batch_size": 64,
    "interval.eval_samples": 500,
    "interval.eval_every": 10,
    "staged.epochs": 2,
    "staged.hidden": (32,),
    "staged.crowd_size": 3,
    "staged.crowd_steps": 10,
    "noprop.datasets": "digits",
    "noprop.num_blocks": 3,
    "noprop.hidden": 32,
    "noprop.num_steps": 60,
    "privacy.hidden": (32,),
    "privacy.base_steps": 40,
    "privacy.finetune_steps": 10,
    "privacy.retrain_steps": 40,
}
# Each run has its own directory and record, so other parts or more seeds may follow in the same workdir.
RESUMABLE = ("parts", "num_seeds", "eval_batch_size")


# --- config --------------------------------------------------------------------------------------------

def parts(config: ml_collections.ConfigDict) -> list[str]:
  """The parts ``config.parts`` names, in the order given."""
  names = common.names(config, "parts", PARTS)
  common.require(len(set(names)) == len(names), f"parts names a part twice: {config.parts!r}")
  return names


def _hidden(config: ml_collections.ConfigDict, field: str) -> None:
  value = common.get(config, field)
  common.require(isinstance(value, (tuple, list)) and len(value) > 0 and all(common.is_int(h) and h > 0 for h in value),
                 f"{field} must be a non-empty tuple of positive ints, got {value!r}")


def validate(config: ml_collections.ConfigDict, workdir: str | None) -> None:
  """Checks every value the selected parts use; raises ``ConfigError`` naming the first bad one."""
  selected = parts(config)
  common.positive_ints(config, "seed", zero_ok=True)
  common.positive_ints(config, "num_seeds", "eval_batch_size")
  if "budget" in selected:
    c = config.budget
    common.distinct_names(config, "budget.datasets", DATASETS)
    common.distinct_names(config, "budget.arms", BUDGET_ARMS)
    common.positive_ints(config, "budget.num_steps", "budget.max_steps", "budget.width", "budget.hidden",
                         "budget.group_size", "budget.eval_every")
    common.check_batch("budget.batch_size", c.batch_size)
    common.numbers(config, "budget.learning_rate", low=0, low_open=True)
    common.numbers(config, "budget.decay_fraction", "budget.decay_interval", low=0, high=1, low_open=True)
    common.numbers(config, "budget.beta_start", "budget.beta_end", "budget.length_weight")
    common.choice(config, "budget.kind", ("linear", "exponential"))
    common.require(common.is_int(c.end) and common.is_int(c.start) and 1 <= c.end <= c.start <= c.max_steps,
                   f"budget: need integers 1 <= end <= start <= max_steps, got end={c.end!r}, start={c.start!r}, "
                   f"max_steps={c.max_steps!r}")
    common.library_check("budget", tasks.budget_schedule, **_schedule_kwargs(c))
    common.library_check("budget", tasks.entropy_curriculum, 1, beta_start=c.beta_start, beta_end=c.beta_end,
                         total_steps=_decay_steps(c))
  if "interval" in selected:
    c = config.interval
    common.positive_ints(config, "interval.chain_steps", "interval.pretrain_steps", "interval.rl_steps",
                         "interval.eval_samples", "interval.eval_every")
    common.check_batch("interval.batch_size", c.batch_size)
    _hidden(config, "interval.hidden")
    common.numbers(config, "interval.beta_min", "interval.beta_max", low=0, high=1, low_open=True, high_open=True)
    common.require(c.beta_min <= c.beta_max, f"interval: beta_min ({c.beta_min}) must be <= beta_max ({c.beta_max})")
    common.numbers(config, "interval.pretrain_learning_rate", "interval.rl_learning_rate", "interval.reward_radius",
                   low=0, low_open=True)
    common.numbers(config, "interval.grow_fraction", low=0, high=1, low_open=True)
    common.library_check("interval", tasks.backward_interval, c.chain_steps, total_steps=_grow_steps(c))
  if "staged" in selected:
    c = config.staged
    common.choice(config, "staged.dataset", DATASETS)
    common.distinct_names(config, "staged.schedules", SCHEDULES)
    common.positive_ints(config, "staged.epochs", "staged.num_levels", "staged.crowd_steps")
    common.check_batch("staged.batch_size", c.batch_size)
    common.numbers(config, "staged.learning_rate", low=0, low_open=True)
    _hidden(config, "staged.hidden")
    _hidden(config, "staged.crowd_hidden")
    common.require(common.is_int(c.crowd_size) and c.crowd_size >= 2,
                   f"staged.crowd_size must be an integer >= 2, got {c.crowd_size!r}")
  if "noprop" in selected:
    c = config.noprop
    common.distinct_names(config, "noprop.datasets", DATASETS)
    common.positive_ints(config, "noprop.num_blocks", "noprop.hidden", "noprop.num_steps", "noprop.baseline_depth")
    common.check_batch("noprop.batch_size", c.batch_size)
    common.numbers(config, "noprop.learning_rate", low=0, low_open=True)
    common.numbers(config, "noprop.weight_decay", low=0)
  if "privacy" in selected:
    c = config.privacy
    common.choice(config, "privacy.dataset", DATASETS)
    _hidden(config, "privacy.hidden")
    common.positive_ints(config, "privacy.batch_size", "privacy.base_steps", "privacy.finetune_steps",
                         "privacy.retrain_steps")
    common.numbers(config, "privacy.learning_rate", "privacy.clip", "privacy.noise_multiplier", low=0, low_open=True)
    common.numbers(config, "privacy.delta", "privacy.forget_fraction", low=0, high=1, low_open=True, high_open=True)
    common.library_check("privacy", optim.dp_noise, c.clip, c.noise_multiplier, c.batch_size)
  if workdir is not None:
    common.check_workdir(workdir)


def _decay_steps(c: ml_collections.ConfigDict) -> int:
  return max(1, round(c.decay_fraction * c.num_steps))


def _schedule_kwargs(c: ml_collections.ConfigDict) -> dict:
  kwargs = dict(start=c.start, end=c.end, kind=c.kind, total_steps=_decay_steps(c))
  if c.kind == "exponential":
    kwargs["interval"] = max(1, round(c.decay_interval * c.num_steps))
  return kwargs


def _grow_steps(c: ml_collections.ConfigDict) -> int:
  return max(1, round(c.grow_fraction * c.rl_steps))


# --- sources -------------------------------------------------------------------------------------------

def _local(rows: np.ndarray) -> np.ndarray:
  """This process's share of a global batch's rows."""
  n = jax.process_count()
  size = len(rows) // n
  return rows[jax.process_index() * size:(jax.process_index() + 1) * size]


def _rows(ds: data_lib.ArrayDataset, idx: np.ndarray, **more: np.ndarray) -> dict:
  idx = _local(np.asarray(idx))
  rows = np.maximum(idx, 0)
  return {"image": ds.images[rows], "label": ds.labels[rows], "index": idx.astype(np.int32),
          **{k: _local(np.asarray(v)) for k, v in more.items()}}


class SampledSource:
  """Batches of ``ds`` whose example indices a pure sampler draws from the train state.

  Call ``t`` draws ``draw(state.extra, fold_in(key(seed), t), batch_size)`` (jitted; e.g. the entropy
  curriculum's or the unlearning machine's ``sample`` over ``TrainState.extra``), so the data follows the
  state the previous step left. Batches: ``{"image", "label", "index"}`` (``index`` -1: an empty slot).
  The position is ``{"seed", "calls"}``.
  """

  def __init__(self, ds: data_lib.ArrayDataset, seed: int,
               draw: Callable[[Any, jax.Array, int], jax.Array]):
    self.ds, self._seed, self._calls = ds, int(seed), 0
    self._draw = jax.jit(draw, static_argnums=2)

  def next(self, batch_size: int, context: Any = None) -> tasks.Batch:
    key = jax.random.fold_in(jax.random.key(self._seed), self._calls)
    idx = np.asarray(self._draw(context.state.extra, key, batch_size))
    self._calls += 1
    return tasks.Batch(_rows(self.ds, idx))

  def get_state(self) -> dict:
    return {"seed": self._seed, "calls": self._calls}

  def set_state(self, state: dict) -> None:
    self._seed, self._calls = int(state["seed"]), int(state["calls"])


class StagedSource:
  """Epochs of ``ds`` in the order of a ``prox.tasks.staged_sampler`` (its state kept here, on the host).

  The batch that ends an epoch carries ``boundary="epoch"``; the position is ``{"epoch", "position"}``
  (the epoch's order is recomputed from the sampler's key on restore).
  """

  def __init__(self, ds: data_lib.ArrayDataset, sampler: tasks.StagedSampler, seed: int):
    self.ds, self.sampler = ds, sampler
    self._state = sampler.init(int(seed))
    self._next = jax.jit(sampler.next, static_argnums=1)

  def next(self, batch_size: int, context: Any = None) -> tasks.Batch:
    epoch = int(self._state.epoch)
    idx, self._state = self._next(self._state, batch_size)
    return tasks.Batch(_rows(self.ds, np.asarray(idx)), None,
                       "epoch" if int(self._state.epoch) > epoch else None)

  def get_state(self) -> dict:
    return {"epoch": int(self._state.epoch), "position": int(self._state.position)}

  def set_state(self, state: dict) -> None:
    epoch = int(state["epoch"])
    self._state = tasks.StagedSamplerState(order=self.sampler.epoch_order(self._state.key, epoch),
                                           position=jnp.int32(state["position"]), epoch=jnp.int32(epoch),
                                           key=self._state.key)


class PoissonSource:
  """DP-SGD's Poisson sampling (Abadi et al. 2016): at call ``t`` every example of ``ds`` joins the batch
  independently with probability ``rate`` (``default_rng([seed, t])``). The batch is padded to the
  loop's batch size with ``weight`` 0 rows; a draw larger than the buffer raises (size the buffer
  many standard deviations above ``rate N``: see :func:`poisson_buffer`)."""

  def __init__(self, ds: data_lib.ArrayDataset, seed: int, rate: float):
    self.ds, self._seed, self._rate, self._calls = ds, int(seed), float(rate), 0

  def next(self, batch_size: int, context: Any = None) -> tasks.Batch:
    rng = np.random.default_rng([self._seed, self._calls])
    chosen = np.flatnonzero(rng.random(len(self.ds.labels)) < self._rate)
    if chosen.size > batch_size:
      raise RuntimeError(f"a Poisson batch of {chosen.size} examples overflows the buffer of {batch_size}")
    self._calls += 1
    idx = np.full(batch_size, -1, np.int64)
    idx[:chosen.size] = chosen
    return tasks.Batch(_rows(self.ds, idx, weight=(idx >= 0).astype(np.float32)))

  def get_state(self) -> dict:
    return {"seed": self._seed, "calls": self._calls}

  def set_state(self, state: dict) -> None:
    self._seed, self._calls = int(state["seed"]), int(state["calls"])


def poisson_buffer(expected: float, devices: int) -> int:
  """A buffer of ``expected + 10 sqrt(expected) + 8`` rows rounded up to a multiple of ``devices``: a
  Binomial draw with this mean overflows it with probability below 1e-20."""
  size = math.ceil(expected + 10 * math.sqrt(expected) + 8)
  return -(-size // devices) * devices


class NoiseSource:
  """Standard normal noise ``{"noise": [b, *shape]}`` for the trajectories of a stochastic chain; call
  ``t`` is ``default_rng([seed, t])``'s."""

  def __init__(self, seed: int, shape: tuple[int, ...]):
    self._seed, self._shape, self._calls = int(seed), tuple(shape), 0

  def next(self, batch_size: int, context: Any = None) -> tasks.Batch:
    rng = np.random.default_rng([self._seed, self._calls])
    self._calls += 1
    return tasks.Batch({"noise": _local(rng.standard_normal((batch_size, *self._shape)).astype(np.float32))})

  def get_state(self) -> dict:
    return {"seed": self._seed, "calls": self._calls}

  def set_state(self, state: dict) -> None:
    self._seed, self._calls = int(state["seed"]), int(state["calls"])


# --- shared helpers ------------------------------------------------------------------------------------


def _once(workdir: str, name: str, settings: dict, fn: Callable[[], dict]) -> dict:
  """``fn()`` in ``workdir/name`` unless it finished before there (``common.run_once``)."""
  return common.run_once(os.path.join(workdir, name), "budgets", settings, fn)


def fit(step: Callable, state: step_lib.TrainState, source: Any, *, num_steps: int, batch_size: int,
        evaluate: Callable[[step_lib.TrainState], dict] | None = None, every: loop.Every | None = None,
        cache: loop.CompileCache | None = None, checkpoint_dir: str | None = None) -> tuple[loop.LoopResult, dict]:
  """One ``prox.loop.run``; ``evaluate(state)`` after the steps of ``every`` and at the end goes into the
  record's ``curve``. Returns the result and its costs (steps, training and wall seconds)."""
  mesh = step_lib.data_mesh()
  actions = ()
  if evaluate is not None:
    def log(ctx: loop.Context) -> None:
      ctx.record.setdefault("curve", []).append({"step": ctx.step, **evaluate(ctx.state)})
    actions = ((dataclasses.replace(every or loop.Every(), end=True), log),)
  started = time.perf_counter()
  result = loop.run(step, state, source, mesh=mesh, batch_size=batch_size, num_steps=num_steps, actions=actions,
                    compile_cache=cache, checkpoint_dir=checkpoint_dir)
  cost = {"steps": int(jax.device_get(result.state.step)), "train_seconds": result.train_seconds,
          "wall_seconds": time.perf_counter() - started, "compile_seconds": result.compile_seconds}
  return result, cost


def _state(params: Any, tx: optax.GradientTransformation, seed: int, extra: Any = ()) -> step_lib.TrainState:
  return common.replicated_state(params, tx, step_lib.data_mesh(), seed=seed, extra=extra)


def _floats(tree: Any) -> Any:
  return jax.tree.map(lambda x: float(x) if np.ndim(x) == 0 else np.asarray(x, np.float64).tolist(),
                      jax.device_get(tree))


# --- part: compute-budget curricula --------------------------------------------------------------------

def iterative_model(c: ml_collections.ConfigDict, ds: data_lib.ArrayDataset, seed: int, *,
                    halting: bool) -> tuple[Any, Any]:
  """``(graphdef, params)`` of the budget part's ``IterativeClassifier`` (the halting head is created last,
  so the other layers start the same with or without it)."""
  model = models.IterativeClassifier(ds.images.shape[1:], ds.num_classes, width=c.width, hidden=c.hidden,
                                     max_steps=c.max_steps, halting=halting, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, nnx.to_pure_dict(params)


def runner(graphdef: Any) -> Callable[..., models.IterativeOutput]:
  """``run(params, images, steps=None) -> IterativeOutput`` of the model ``graphdef``."""
  return lambda params, images, steps=None: nnx.merge(graphdef, nnx.State(params)).run(images, steps)


def budget_loss(arm: str, c: ml_collections.ConfigDict, run: Callable,
                schedule: tasks.BudgetSchedule) -> Callable:
  """The ``prox.step`` loss of a budget arm (see the module docstring)."""
  K, B_min = c.max_steps, c.end

  def supervised(params, model_state, batch, ctx):
    budget = schedule.budget(ctx.extra["budget"]) if arm == "decay" else jnp.int32(B_min)
    logits = run(params, batch["image"], budget).logits[:, -1]      # frozen past the budget: its answer
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return jnp.mean(ce), ({"accuracy": jnp.mean(correct), "budget": budget.astype(jnp.float32)}, model_state)

  def grpo(params, model_state, batch, ctx):
    x, y = batch["image"], batch["label"]
    m, G = y.shape[0], c.group_size
    out = run(params, x)
    log_halt = losses.halting_log_probs(out.halt_logits, K)             # [m, K]: halt after step k
    key_length, key_class = jax.random.split(ctx.rng)
    length = jax.random.categorical(key_length, log_halt[:, None, :], shape=(m, G))   # 0-based
    log_class = jnp.take_along_axis(jax.nn.log_softmax(out.logits, -1), length[..., None], 1)   # [m, G, C]
    answer = jax.random.categorical(key_class, log_class)
    logp = (jnp.take_along_axis(log_halt, length, 1)
            + jnp.take_along_axis(log_class, answer[..., None], -1)[..., 0])
    budget = schedule.budget(ctx.extra["budget"])
    correct = answer == y[:, None]
    reward = losses.budget_reward(correct, length + 1, budget, length_weight=c.length_weight, shape="within",
                                  gate=True)
    advantages = losses.group_advantages(reward)
    loss = jnp.mean(losses.grpo_loss(logp, jax.lax.stop_gradient(logp), advantages))
    metrics = {"accuracy": jnp.mean(correct.astype(jnp.float32)), "reward": jnp.mean(reward),
               "length": jnp.mean((length + 1).astype(jnp.float32)), "budget": budget.astype(jnp.float32)}
    return loss, (metrics, model_state)

  return grpo if arm == "grpo" else supervised


class BudgetArm(NamedTuple):
  """What every seed of one (dataset, arm) shares: one step (one compile), its optimizer and helpers."""
  step: Callable
  tx: optax.GradientTransformation
  extra: Callable[[], dict]
  source: Callable[[data_lib.ArrayDataset, int], Any]
  evaluate: Callable
  cache: loop.CompileCache


def budget_arm(c: ml_collections.ConfigDict, arm: str, train: data_lib.ArrayDataset) -> BudgetArm:
  graphdef, _ = iterative_model(c, train, 0, halting=arm == "grpo")
  run = runner(graphdef)
  schedule = tasks.budget_schedule(**_schedule_kwargs(c))
  curriculum = tasks.entropy_curriculum(len(train.labels), beta_start=c.beta_start, beta_end=c.beta_end,
                                        total_steps=_decay_steps(c))
  transition, extra, source = None, dict, lambda ds, seed: tasks.EpochSource(ds, seed)
  if arm in ("decay", "grpo"):
    transition = step_lib.in_extra("budget", lambda s, info: schedule.update(s, step=info.step + 1))
    extra = lambda: {"budget": schedule.init()}
  elif arm == "entropy":
    def store(s, info):
      logits = run(info.params, info.batch["image"], c.end).logits[:, -1]
      return curriculum.update(s, jnp.where(info.valid, info.batch["index"], -1), logits, step=info.step + 1)

    transition = step_lib.in_extra("entropy", store)
    extra = lambda: {"entropy": curriculum.init()}
    source = lambda ds, seed: SampledSource(ds, seed, lambda e, key, b: curriculum.sample(e["entropy"], key, b))
  tx = optax.adam(c.learning_rate)
  step = step_lib.make_train_step(budget_loss(arm, c, run, schedule), tx, mesh=step_lib.data_mesh(),
                                  transition=transition)

  @jax.jit
  def accuracy_by_budget(params, images, labels):
    out = run(params, images)          # K steps: the logits after step n are the budget-n answer
    acc = jnp.mean((jnp.argmax(out.logits, -1) == labels[:, None]).astype(jnp.float32), 0)
    if out.halt_logits is None:
      return acc, jnp.float32(jnp.nan)
    p = jnp.exp(losses.halting_log_probs(out.halt_logits, c.max_steps))
    return acc, jnp.mean(jnp.sum(p * jnp.arange(1, c.max_steps + 1), -1))   # expected halting step

  return BudgetArm(step=step, tx=tx, extra=extra, source=source, evaluate=accuracy_by_budget,
                   cache=loop.CompileCache())


def budget_run(cfg: ml_collections.ConfigDict, dataset: str, arm: str, seed: int, splits: tuple,
               tool: BudgetArm) -> dict:
  c = cfg.budget
  train, test = splits
  _, params = iterative_model(c, train, seed, halting=arm == "grpo")
  state = _state(params, tool.tx, seed, tool.extra())

  def evaluate(state: step_lib.TrainState) -> dict:
    acc, length = tool.evaluate(state.params, test.images, test.labels)
    acc = np.asarray(acc)
    return {"accuracy_final_budget": float(acc[c.end - 1]), "accuracy_max_budget": float(acc[-1]),
            "accuracy_by_budget": acc.tolist(), "expected_halting_step": float(length)}

  result, cost = fit(tool.step, state, tool.source(train, seed), num_steps=c.num_steps, batch_size=c.batch_size,
                     evaluate=evaluate, every=loop.Every(steps=c.eval_every), cache=tool.cache)
  return {"curve": result.record["curve"], **result.record["curve"][-1], **cost}


def run_budget(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Every (dataset, arm, seed) of the budget part."""
  c = cfg.budget
  out: dict[str, Any] = {"seeds": list(common.seeds(cfg)), "datasets": {}}
  for dataset in common.names(cfg, "budget.datasets"):
    splits = _splits(cfg, dataset)
    runs: dict[str, dict] = {}
    for arm in common.names(cfg, "budget.arms"):
      tool = None
      for seed in common.seeds(cfg):
        settings = {"part": "budget", "dataset": dataset, "arm": arm, "seed": seed, "budget": c.to_dict()}

        def go(arm=arm, seed=seed):
          nonlocal tool
          tool = tool or budget_arm(c, arm, splits[0])
          return budget_run(cfg, dataset, arm, seed, splits, tool)

        runs.setdefault(arm, {})[str(seed)] = _once(workdir, f"budget/{dataset}/{arm}/seed{seed}", settings, go)
      common.say(cfg, f"budget {dataset} {arm}: test accuracy at budget {c.end}: " + ", ".join(
          f"{r['accuracy_final_budget']:.4f}" for r in runs[arm].values()))
    out["datasets"][dataset] = runs
  return out


def _splits(cfg: ml_collections.ConfigDict, dataset: str) -> tuple[data_lib.ArrayDataset, data_lib.ArrayDataset]:
  try:
    return tuple(data_lib.load(dataset, split, data_dir=cfg.get("data_dir") or None) for split in ("train", "test"))
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from None


# --- part: backward interval on a 2-D denoising chain --------------------------------------------------

MODES = (2.0 * np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], 1)).astype(np.float32)
REWARDED = MODES[::2]          # the 4 even-numbered modes
MODE_STD = 0.1
TIME_FEATURES = 8


def mixture(rng: np.random.Generator, n: int) -> np.ndarray:
  """``n`` points of the 8-Gaussian mixture (std ``MODE_STD``) on the circle of radius 2."""
  return (MODES[rng.integers(0, len(MODES), n)] + MODE_STD * rng.standard_normal((n, 2))).astype(np.float32)


class Chain(NamedTuple):
  """A DDPM chain (Ho et al. 2020) of ``T`` steps with a noise-predicting MLP ``eps(x_t, t)``.

  Forward process ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)``, ``abar_t = prod_{s<=t} (1 - beta_s)``;
  the denoising step ``t -> t - 1`` is the Gaussian policy ``N(mu(x_t, t), beta_t I)`` with
  ``mu = (x_t - beta_t / sqrt(1 - abar_t) eps(x_t, t)) / sqrt(1 - beta_t)``. Chain step ``k = 1..T`` (the
  order of the backward interval) denoises level ``t = T - k`` (0-based).
  """
  apply: Callable
  betas: jax.Array
  abar: jax.Array

  @property
  def T(self) -> int:
    return int(self.betas.shape[0])

  def eps(self, params: Any, x: jax.Array, t: jax.Array) -> jax.Array:
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    freq = jnp.exp(jnp.linspace(0.0, 3.0, TIME_FEATURES // 2))
    angle = (t + 1.0)[:, None] / self.T * freq
    features = jnp.concatenate([x, jnp.sin(angle), jnp.cos(angle)], -1)
    return self.apply(params, {}, features, train=False)[0]

  def mean(self, params: Any, x: jax.Array, t: int) -> jax.Array:
    beta = self.betas[t]
    return (x - beta / jnp.sqrt(1.0 - self.abar[t]) * self.eps(params, x, t)) / jnp.sqrt(1.0 - beta)

  def trajectory(self, params: Any, noise: jax.Array) -> jax.Array:
    """``[T + 1, m, 2]``: ``x_T = noise[:, 0]`` and the chain's states, step ``k`` adding
    ``sqrt(beta_t) noise[:, k]``."""
    x = noise[:, 0]
    xs = [x]
    for k in range(1, self.T + 1):
      t = self.T - k
      x = self.mean(params, x, t) + jnp.sqrt(self.betas[t]) * noise[:, k]
      xs.append(x)
    return jnp.stack(xs)

  def step_log_probs(self, params: Any, xs: jax.Array) -> jax.Array:
    """``[m, T]``: ``log pi(x_{k} | x_{k-1})`` of each chain step (up to a constant)."""
    out = []
    for k in range(1, self.T + 1):
      t = self.T - k
      out.append(-jnp.sum((xs[k] - self.mean(params, xs[k - 1], t)) ** 2, -1) / (2.0 * self.betas[t]))
    return jnp.stack(out, 1)


def denoiser(c: ml_collections.ConfigDict, seed: int) -> tuple[Chain, Any]:
  net = models.functional(models.make_model("mlp", input_shape=(2 + TIME_FEATURES,), num_classes=2, seed=seed,
                                            hidden=tuple(c.hidden)))
  betas = np.linspace(c.beta_min, c.beta_max, c.chain_steps, dtype=np.float64)
  chain = Chain(apply=net.apply, betas=jnp.asarray(betas, jnp.float32),
                abar=jnp.asarray(np.cumprod(1.0 - betas), jnp.float32))
  return chain, net.params


def terminal_reward(x: jax.Array, radius: float) -> jax.Array:
  """1 where a final point lies within ``radius`` of a rewarded mode, else 0."""
  d = jnp.linalg.norm(x[:, None, :] - jnp.asarray(REWARDED)[None], axis=-1)
  return (jnp.min(d, 1) < radius).astype(jnp.float32)


def sample_scores(x: np.ndarray, radius: float) -> dict:
  """Reward, diversity (normalised entropy of the rewarded points over the rewarded modes) and quality
  (the fraction within ``radius`` of any mode) of final points ``x``."""
  x = np.asarray(x, np.float64)
  d = np.linalg.norm(x[:, None, :] - REWARDED[None], axis=-1)
  hit = d.min(1) < radius
  counts = np.bincount(d.argmin(1)[hit], minlength=len(REWARDED)).astype(np.float64)
  p = counts / max(counts.sum(), 1.0)
  entropy = -np.sum(p[p > 0] * np.log(p[p > 0])) / np.log(len(REWARDED))
  near_any = np.linalg.norm(x[:, None, :] - MODES[None], axis=-1).min(1) < radius
  return {"reward": float(hit.mean()), "diversity": max(0.0, float(entropy)), "quality": float(near_any.mean())}


def interval_losses(c: ml_collections.ConfigDict, chain: Chain, schedule: tasks.BackwardInterval,
                    arm: str) -> tuple[Callable, Callable]:
  """The pretraining loss (noise prediction) and the RL loss of ``arm`` (module docstring)."""

  def pretrain(params, model_state, batch, ctx):
    x0 = batch["x"]
    key_t, key_e = jax.random.split(ctx.rng)
    t = jax.random.randint(key_t, x0.shape[:1], 0, chain.T)
    e = jax.random.normal(key_e, x0.shape)
    xt = jnp.sqrt(chain.abar[t])[:, None] * x0 + jnp.sqrt(1.0 - chain.abar[t])[:, None] * e
    return jnp.mean(jnp.sum((chain.eps(params, xt, t) - e) ** 2, -1)), ({}, model_state)

  def policy_gradient(params, model_state, batch, ctx):
    xs = jax.lax.stop_gradient(chain.trajectory(params, batch["noise"]))   # on-policy samples
    reward = terminal_reward(xs[-1], c.reward_radius)
    advantages = losses.group_advantages(reward)                          # the batch is one group
    per_step = -advantages[:, None] * chain.step_log_probs(params, xs)      # [m, T]
    t_start = schedule.t_start(ctx.extra["interval"]) if arm == "backward" else jnp.int32(1)
    loss = jnp.mean(losses.interval_step_loss(per_step, t_start))
    return loss, ({"reward": jnp.mean(reward), "t_start": t_start.astype(jnp.float32)}, model_state)

  return pretrain, policy_gradient


def interval_pretrain(cfg: ml_collections.ConfigDict, seed: int, directory: str) -> dict:
  """Trains the denoiser on the mixture (its checkpoint stays in ``directory``)."""
  c = cfg.interval
  chain, params = denoiser(c, seed)
  schedule = tasks.backward_interval(c.chain_steps, total_steps=_grow_steps(c))
  pretrain, _ = interval_losses(c, chain, schedule, "all")
  tx = optax.adam(c.pretrain_learning_rate)
  step = step_lib.make_train_step(pretrain, tx, mesh=step_lib.data_mesh())
  points = mixture(np.random.default_rng([seed, 1]), 20_000)
  rng = np.random.default_rng([seed, 2])
  noise = rng.standard_normal((c.eval_samples, c.chain_steps + 1, 2)).astype(np.float32)
  sample = jax.jit(lambda p: chain.trajectory(p, noise)[-1])
  result, cost = fit(step, _state(params, tx, seed), tasks.EpochSource({"x": points}, seed),
                     num_steps=c.pretrain_steps, batch_size=c.batch_size,
                     evaluate=lambda s: sample_scores(np.asarray(sample(s.params)), c.reward_radius),
                     checkpoint_dir=os.path.join(directory, "checkpoints"))
  return {**result.record["curve"][-1], **cost}


def interval_run(cfg: ml_collections.ConfigDict, arm: str, seed: int, pretrained: str, cache: dict) -> dict:
  c = cfg.interval
  chain, params = denoiser(c, seed)
  schedule = tasks.backward_interval(c.chain_steps, total_steps=_grow_steps(c))
  pre_tx = optax.adam(c.pretrain_learning_rate)
  with Checkpointer(os.path.join(pretrained, "checkpoints")) as ckpt:
    restored, _ = ckpt.restore(_state(params, pre_tx, seed))
  tx = optax.adam(c.rl_learning_rate)
  if arm not in cache:
    _, rl_loss = interval_losses(c, chain, schedule, arm)
    cache[arm] = (step_lib.make_train_step(
        rl_loss, tx, mesh=step_lib.data_mesh(),
        transition=step_lib.in_extra("interval", lambda s, info: schedule.update(s, step=info.step + 1))),
                  loop.CompileCache())
  step, compiled = cache[arm]
  noise = np.random.default_rng([seed, 3]).standard_normal(
      (c.eval_samples, c.chain_steps + 1, 2)).astype(np.float32)
  sample = jax.jit(lambda p: chain.trajectory(p, noise)[-1])
  state = _state(jax.device_get(restored.params), tx, seed, {"interval": schedule.init()})
  evaluate = lambda s: {**sample_scores(np.asarray(sample(s.params)), c.reward_radius),
                        "t_start": int(jax.device_get(s.extra["interval"].t_start)) if arm == "backward" else 1}
  start = evaluate(state)
  result, cost = fit(step, state, NoiseSource(seed, (c.chain_steps + 1, 2)), num_steps=c.rl_steps,
                     batch_size=c.batch_size, evaluate=evaluate, every=loop.Every(steps=c.eval_every),
                     cache=compiled)
  curve = [{"step": 0, **start}] + result.record["curve"]
  return {"curve": curve, **curve[-1], "start": start, **cost}


def run_interval(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  c = cfg.interval
  out: dict[str, Any] = {"seeds": list(common.seeds(cfg)), "pretrain": {}, "runs": {}}
  cache: dict = {}
  for seed in common.seeds(cfg):
    settings = {"part": "interval", "seed": seed, "interval": c.to_dict()}
    directory = os.path.join(workdir, "interval", f"pretrain_seed{seed}")
    out["pretrain"][str(seed)] = _once(workdir, f"interval/pretrain_seed{seed}", settings,
                                       functools.partial(interval_pretrain, cfg, seed, directory))
    for arm in INTERVAL_ARMS:
      out["runs"].setdefault(arm, {})[str(seed)] = _once(
          workdir, f"interval/{arm}/seed{seed}", {**settings, "arm": arm},
          functools.partial(interval_run, cfg, arm, seed, directory, cache))
    common.say(cfg, f"interval seed {seed}: pretrained reward {out['pretrain'][str(seed)]['reward']:.3f}; after RL: " + ", ".join(
        f"{arm} {out['runs'][arm][str(seed)]['reward']:.3f} (diversity {out['runs'][arm][str(seed)]['diversity']:.2f})"
        for arm in INTERVAL_ARMS))
  return out


# --- part: staged difficulty sampler -------------------------------------------------------------------

def mlp(ds: data_lib.ArrayDataset, hidden: tuple[int, ...], seed: int) -> models.Functional:
  return models.functional(models.make_model("mlp", input_shape=ds.images.shape[1:], num_classes=ds.num_classes,
                                             seed=seed, hidden=tuple(hidden)))


def predictions(apply: Callable) -> Callable[[Any, np.ndarray], np.ndarray]:
  fn = jax.jit(lambda params, x: jnp.argmax(apply(params, {}, x, train=False)[0], -1))
  return lambda params, x: np.asarray(fn(params, x))


def crowd_difficulties(cfg: ml_collections.ConfigDict, train: data_lib.ArrayDataset) -> dict:
  """An artificial crowd's 0/1 answers on every training item and their 1PL difficulties (PUDF's recipe):
  member ``j`` is an MLP trained for ``crowd_steps (j + 1) / crowd_size`` Adam steps on a bootstrap
  resample of the train split."""
  c = cfg.staged
  n = len(train.labels)
  tx = optax.adam(c.learning_rate)
  cache, step, predict, answers = loop.CompileCache(), None, None, []
  for j in range(c.crowd_size):
    net = mlp(train, c.crowd_hidden, 10_000 + 100 * cfg.seed + j)
    if step is None:   # one step and one prediction function for the whole crowd
      step = step_lib.make_train_step(losses.classification_loss(net.apply), tx, mesh=step_lib.data_mesh())
      predict = predictions(net.apply)
    rows = np.random.default_rng([cfg.seed, 10_000 + j]).choice(n, size=n, replace=True)
    resample = data_lib.ArrayDataset(train.images[rows], train.labels[rows], train.num_classes, f"bootstrap{j}")
    result, _ = fit(step, _state(net.params, tx, cfg.seed + j), tasks.EpochSource(resample, cfg.seed + j),
                    num_steps=max(1, round(c.crowd_steps * (j + 1) / c.crowd_size)), batch_size=c.batch_size,
                    cache=cache)
    answers.append((predict(result.state.params, train.images) == train.labels).astype(np.int32))
  responses = np.stack(answers)
  fitted = irt.fit_1pl(responses)
  return {"crowd_accuracy": responses.mean(1).tolist(), "difficulties": np.asarray(fitted.difficulties).tolist(),
          "irt_steps": int(fitted.num_steps)}


def staged_levels(cfg: ml_collections.ConfigDict, schedule: str, seed: int, difficulties: np.ndarray) -> np.ndarray:
  """The difficulty level of every example; ``random``: the same levels randomly permuted over examples."""
  levels = np.asarray(tasks.difficulty_levels(difficulties, cfg.staged.num_levels))
  if schedule == "random":
    levels = np.random.default_rng([seed, 4]).permutation(levels)
  return levels


def staged_run(cfg: ml_collections.ConfigDict, schedule: str, seed: int, splits: tuple, difficulties: np.ndarray,
               tools: dict) -> dict:
  c = cfg.staged
  train, test = splits
  net = mlp(train, c.hidden, seed)
  if "step" not in tools:
    tools["tx"] = optax.adam(c.learning_rate)
    tools["step"] = step_lib.make_train_step(losses.classification_loss(net.apply), tools["tx"],
                                             mesh=step_lib.data_mesh())
    tools["predict"] = predictions(net.apply)
    tools["cache"] = loop.CompileCache()
  levels = staged_levels(cfg, schedule, seed, difficulties)
  sampler = tasks.staged_sampler(levels.astype(np.int32), train.labels,
                                 schedule="interleaved" if schedule == "random" else schedule)
  source = StagedSource(train, sampler, seed)
  steps = c.epochs * -(-len(train.labels) // c.batch_size)
  accuracy = lambda s: {"accuracy": float(np.mean(tools["predict"](s.params, test.images) == test.labels))}
  result, cost = fit(tools["step"], _state(net.params, tools["tx"], seed), source, num_steps=steps,
                     batch_size=c.batch_size, evaluate=accuracy, every=loop.Every(boundary="epoch"),
                     cache=tools["cache"])
  first = np.asarray(sampler.epoch_order(jax.random.key_data(jax.random.key(seed)), 0))[:c.batch_size * 4]
  return {"curve": result.record["curve"], **result.record["curve"][-1], **cost,
          "first_levels": np.bincount(staged_levels(cfg, "mixed", seed, difficulties)[first],   # true levels
                                      minlength=c.num_levels).tolist(),
          "first_classes": np.bincount(train.labels[first], minlength=train.num_classes).tolist()}


def run_staged(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  c = cfg.staged
  splits = _splits(cfg, c.dataset)
  crowd_settings = {"part": "staged", "seed": cfg.seed, "dataset": c.dataset,
                    **{k: c[k] for k in ("crowd_size", "crowd_hidden", "crowd_steps", "batch_size", "learning_rate")}}
  crowd = _once(workdir, "staged/crowd", crowd_settings, lambda: crowd_difficulties(cfg, splits[0]))
  difficulties = np.asarray(crowd["difficulties"], np.float32)
  out: dict[str, Any] = {"seeds": list(common.seeds(cfg)), **crowd,
                         "levels": np.bincount(np.asarray(tasks.difficulty_levels(difficulties, c.num_levels)),
                                               minlength=c.num_levels).tolist(), "runs": {}}
  tools: dict = {}
  for schedule in common.names(cfg, "staged.schedules"):
    for seed in common.seeds(cfg):
      settings = {"part": "staged", "schedule": schedule, "seed": seed, "staged": c.to_dict(), "crowd_seed": cfg.seed}
      out["runs"].setdefault(schedule, {})[str(seed)] = _once(
          workdir, f"staged/{schedule}/seed{seed}", settings,
          functools.partial(staged_run, cfg, schedule, seed, splits, difficulties, tools))
    common.say(cfg, f"staged {schedule}: final test accuracy " + ", ".join(
        f"{r['accuracy']:.4f}" for r in out["runs"][schedule].values()))
  return out


# --- part: NoProp-DT vs backprop -----------------------------------------------------------------------

def noprop_model(c: ml_collections.ConfigDict, ds: data_lib.ArrayDataset, seed: int) -> tuple[Any, Any, Any]:
  """``(graphdef, params, rest)`` of the part's ``NoPropDT`` (``rest``: the fixed noise schedule)."""
  model = models.NoPropDT(ds.images.shape[1:], ds.num_classes, num_blocks=c.num_blocks, hidden=c.hidden,
                          rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), rest


def matched_width(target: int, n_in: int, num_classes: int, depth: int) -> int:
  """The width ``w`` of an MLP with ``depth`` hidden layers of ``w`` units whose parameter count
  ``n_in w + w + (depth - 1)(w^2 + w) + w C + C`` is the closest to ``target``."""
  count = lambda w: n_in * w + w + (depth - 1) * (w * w + w) + w * num_classes + num_classes
  return min(range(1, 8193), key=lambda w: abs(count(w) - target))


def noprop_tools(c: ml_collections.ConfigDict, arm: str, train: data_lib.ArrayDataset) -> dict:
  tx = optax.adamw(c.learning_rate, weight_decay=c.weight_decay)
  graphdef, params, rest = noprop_model(c, train, 0)
  if arm == "noprop":
    merged = lambda p: nnx.merge(graphdef, nnx.State(p), rest)

    def loss(params, model_state, batch, ctx):
      key_block, key_latent = jax.random.split(ctx.rng)
      block = jax.random.randint(key_block, (), 0, c.num_blocks)      # one block per step, t ~ U{0..T-1}
      terms = merged(params).loss(batch["image"], batch["label"], key_latent, block=block)
      return jnp.mean(terms.total), ({"classifier": jnp.mean(terms.classifier),
                                      "denoising": jnp.mean(terms.denoising)}, model_state)

    predict = jax.jit(lambda p, x: jnp.argmax(merged(p)(x), -1))     # the noise-free chain
    width = None
  else:
    width = matched_width(models.param_count(params), int(np.prod(train.images.shape[1:])), train.num_classes,
                          c.baseline_depth)
    net = mlp(train, (width,) * c.baseline_depth, 0)
    loss = losses.classification_loss(net.apply)
    predict = jax.jit(lambda p, x: jnp.argmax(net.apply(p, {}, x, train=False)[0], -1))
  return {"tx": tx, "step": step_lib.make_train_step(loss, tx, mesh=step_lib.data_mesh()), "predict": predict,
          "width": width, "cache": loop.CompileCache()}


def noprop_run(cfg: ml_collections.ConfigDict, dataset: str, arm: str, seed: int, splits: tuple, tool: dict) -> dict:
  c = cfg.noprop
  train, test = splits
  if arm == "noprop":
    _, params, _ = noprop_model(c, train, seed)
  else:
    params = mlp(train, (tool["width"],) * c.baseline_depth, seed).params
  accuracy = lambda s: {"accuracy": float(np.mean(np.asarray(tool["predict"](s.params, test.images)) == test.labels))}
  result, cost = fit(tool["step"], _state(params, tool["tx"], seed), tasks.EpochSource(train, seed),
                     num_steps=c.num_steps, batch_size=c.batch_size, evaluate=accuracy,
                     every=loop.Every(steps=max(1, c.num_steps // 10)), cache=tool["cache"])
  temp = [int(exe.memory_analysis().temp_size_in_bytes) for exe in tool["cache"].executables.values()]
  return {"curve": result.record["curve"], **result.record["curve"][-1], **cost,
          "params": models.param_count(params), "width": tool["width"],
          "step_temp_bytes": max(temp) if temp else None}


def run_noprop(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  c = cfg.noprop
  out: dict[str, Any] = {"seeds": list(common.seeds(cfg)), "datasets": {}}
  for dataset in common.names(cfg, "noprop.datasets"):
    splits = _splits(cfg, dataset)
    runs: dict[str, dict] = {}
    for arm in ("noprop", "backprop"):
      tool = None
      for seed in common.seeds(cfg):
        def go(arm=arm, seed=seed):
          nonlocal tool
          tool = tool or noprop_tools(c, arm, splits[0])
          return noprop_run(cfg, dataset, arm, seed, splits, tool)

        settings = {"part": "noprop", "dataset": dataset, "arm": arm, "seed": seed, "noprop": c.to_dict()}
        runs.setdefault(arm, {})[str(seed)] = _once(workdir, f"noprop/{dataset}/{arm}/seed{seed}", settings, go)
      common.say(cfg, f"noprop {dataset} {arm}: test accuracy " + ", ".join(
          f"{r['accuracy']:.4f}" for r in runs[arm].values()))
    out["datasets"][dataset] = runs
  return out


# --- part: private training and unlearning -------------------------------------------------------------

def forget_set(n: int, fraction: float, seed: int) -> np.ndarray:
  """The forgotten examples of a seed: ``round(fraction n)`` distinct indices of the train split."""
  return np.sort(np.random.default_rng([seed, 5]).choice(n, size=max(1, round(fraction * n)), replace=False))


def per_example_losses(apply: Callable) -> Callable:
  """``(params, batch) -> [m]``: ``weight_i CE_i`` (weight 1 when the batch has none)."""
  def fn(params, batch):
    logits = apply(params, {}, batch["image"], train=False)[0]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return ce * batch["weight"] if "weight" in batch else ce
  return fn


def base_losses(per_example: Callable, clip: float, buffer: int, batch_size: int) -> dict[str, Callable]:
  """The ``prox.step.stateless`` losses of the base models on Poisson batches padded to ``buffer`` rows
  (``per_example`` is 0 on a weight-0 row): ``"dp"``, whose gradient is ``1/B sum_i c_i g_i`` with
  ``c_i = min(1, C / ||g_i||)`` (ghost clipping) and ``B = batch_size`` the *expected* batch size
  (DP-SGD's normalisation: the noise std ``sigma C / B`` is calibrated to it), and ``"plain"``,
  ``1/B sum_i l_i``. The step averages over the buffer, so both scale its mean by ``buffer / B``."""
  scale = buffer / batch_size
  ghost = optim.ghost_clipped_loss(per_example, clip, axis_name=step_lib.DATA_AXIS)

  def dp_loss(params, batch, rng):
    value, metrics = ghost(params, batch)
    return value * scale, metrics

  def plain_loss(params, batch, rng):
    return jnp.mean(per_example(params, batch)) * scale, {}

  return {"dp": dp_loss, "plain": plain_loss}


class PrivacyTools(NamedTuple):
  net: models.Functional
  base_step: dict          # "dp" / "plain": (step, tx, cache)
  finetune_step: tuple     # (step, tx, cache) on retained data through the unlearning machine
  machine: tasks.Unlearning
  scores: Callable
  buffer: int
  rate: float


def dp_tx(c: ml_collections.ConfigDict, seed: int) -> optax.GradientTransformation:
  """DP-SGD's noise ``sigma C xi / B`` on the mean clipped gradient (noise key ``seed``), then Adam (post-processing)."""
  return optax.chain(optim.dp_noise(c.clip, c.noise_multiplier, c.batch_size, key=seed), optax.adam(c.learning_rate))


def privacy_tools(cfg: ml_collections.ConfigDict, train: data_lib.ArrayDataset) -> PrivacyTools:
  c = cfg.privacy
  n = len(train.labels)
  net = mlp(train, c.hidden, 0)
  per_example = per_example_losses(net.apply)
  buffer = poisson_buffer(c.batch_size, jax.device_count())
  mesh = step_lib.data_mesh()
  base = {}
  for name, loss in base_losses(per_example, c.clip, buffer, c.batch_size).items():
    tx = dp_tx(c, cfg.seed) if name == "dp" else optax.adam(c.learning_rate)
    base[name] = (step_lib.make_train_step(step_lib.stateless(loss), tx, mesh=mesh), tx, loop.CompileCache())
  machine = tasks.unlearning(n, finetune_steps=c.finetune_steps)

  def retained_loss(params, model_state, batch, ctx):
    w = machine.weights(ctx.extra["unlearn"], batch["index"])        # 0 for a forgotten example
    value = jnp.sum(w * per_example(params, batch)) / jnp.maximum(jnp.sum(w), 1.0)
    return value, ({"forgotten_rows": jnp.sum(1.0 - w)}, model_state)

  tx = optax.adam(c.learning_rate)
  finetune = (step_lib.make_train_step(retained_loss, tx, mesh=mesh,
                                       transition=step_lib.in_extra("unlearn", lambda s, info: machine.update(s))),
              tx, loop.CompileCache())

  @jax.jit
  def scores(params, images, labels):
    logits = net.apply(params, {}, images, train=False)[0]
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels),
            (jnp.argmax(logits, -1) == labels).astype(jnp.float32))

  return PrivacyTools(net=net, base_step=base, finetune_step=finetune, machine=machine, scores=scores,
                      buffer=buffer, rate=c.batch_size / n)


def privacy_scores(tools: PrivacyTools, params: Any, splits: tuple, forget: np.ndarray) -> dict:
  """Accuracy on the forgotten, retained and test data and the forgotten set's membership scores."""
  train, test = splits
  loss_train, correct_train = (np.asarray(a) for a in tools.scores(params, train.images, train.labels))
  loss_test, correct_test = (np.asarray(a) for a in tools.scores(params, test.images, test.labels))
  kept = np.ones(len(train.labels), bool)
  kept[forget] = False
  return {"accuracy_forgotten": float(correct_train[forget].mean()),
          "accuracy_retained": float(correct_train[kept].mean()), "accuracy_test": float(correct_test.mean()),
          "membership_auc": float(tasks.membership_auc(loss_train[forget], loss_test)),
          "membership_advantage": float(tasks.membership_advantage(loss_train[forget], loss_test)),
          "membership_auc_retained": float(tasks.membership_auc(loss_train[kept], loss_test))}


def privacy_base(cfg: ml_collections.ConfigDict, name: str, seed: int, splits: tuple, forget: np.ndarray,
                 tools: PrivacyTools, directory: str) -> dict:
  """The private (``dp``) or non-private (``plain``) model on all the train data (checkpoint kept)."""
  c = cfg.privacy
  train = splits[0]
  step, tx, cache = tools.base_step[name]
  params = mlp(train, c.hidden, seed).params
  if name == "dp":     # the seed's own noise stream (the step only uses tx.update: one compile for all seeds)
    tx = dp_tx(c, seed)
  result, cost = fit(step, _state(params, tx, seed), PoissonSource(train, seed, tools.rate), num_steps=c.base_steps,
                     batch_size=tools.buffer, cache=cache, checkpoint_dir=os.path.join(directory, "checkpoints"))
  out = {**privacy_scores(tools, result.state.params, splits, forget), **cost}
  if name == "dp":
    kwargs = dict(noise_multiplier=c.noise_multiplier, sampling_rate=tools.rate, steps=c.base_steps, delta=c.delta)
    out.update(epsilon_rdp=tasks.dp_epsilon(**kwargs), epsilon_pld=tasks.dp_epsilon(**kwargs, accountant="pld"))
  return out


def privacy_retained(cfg: ml_collections.ConfigDict, name: str, seed: int, splits: tuple, forget: np.ndarray,
                     tools: PrivacyTools, base_dir: str | None) -> dict:
  """Training on the retained data only: from a base model's checkpoint (``finetune_*``) or from scratch
  (``retrain``)."""
  c = cfg.privacy
  train = splits[0]
  step, tx, cache = tools.finetune_step
  params = mlp(train, c.hidden, seed).params
  if base_dir is not None:
    base_step, base_tx, _ = tools.base_step["dp" if name == "finetune_dp" else "plain"]
    with Checkpointer(os.path.join(base_dir, "checkpoints")) as ckpt:
      params = jax.device_get(ckpt.restore(_state(params, base_tx, seed))[0].params)
  machine = tools.machine
  extra = {"unlearn": machine.request(machine.init(), jnp.asarray(forget))}
  source = SampledSource(train, seed, lambda e, key, b: machine.sample(e["unlearn"], key, b))
  steps = c.finetune_steps if base_dir is not None else c.retrain_steps
  result, cost = fit(step, _state(params, tx, seed, extra), source, num_steps=steps, batch_size=c.batch_size,
                     cache=cache)
  return {**privacy_scores(tools, result.state.params, splits, forget), **cost,
          "machine_done": bool(jax.device_get(machine.done(result.state.extra["unlearn"])))}


def run_privacy(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  c = cfg.privacy
  splits = _splits(cfg, c.dataset)
  n = len(splits[0].labels)
  tools = None
  out: dict[str, Any] = {"seeds": list(common.seeds(cfg)), "num_examples": n, "runs": {}}
  for seed in common.seeds(cfg):
    forget = forget_set(n, c.forget_fraction, seed)
    settings = {"part": "privacy", "seed": seed, "privacy": c.to_dict()}
    runs = out["runs"]
    for name, base in (("plain", None), ("dp", None), ("finetune_plain", "plain"), ("finetune_dp", "dp"),
                       ("retrain", None)):
      def go(name=name, base=base, seed=seed, forget=forget):
        nonlocal tools
        tools = tools or privacy_tools(cfg, splits[0])
        if name in ("plain", "dp"):
          return privacy_base(cfg, name, seed, splits, forget, tools, _run_dir(workdir, name, seed))
        return privacy_retained(cfg, name, seed, splits, forget, tools,
                                None if base is None else _run_dir(workdir, base, seed))

      runs.setdefault(name, {})[str(seed)] = _once(workdir, f"privacy/{name}/seed{seed}", {**settings, "model": name},
                                                   go)
    common.say(cfg, f"privacy seed {seed}: forgotten-set accuracy / membership AUC: " + ", ".join(
        f"{name} {runs[name][str(seed)]['accuracy_forgotten']:.3f}/{runs[name][str(seed)]['membership_auc']:.3f}"
        for name in PRIVACY_MODELS))
  out["epsilon"] = {k: out["runs"]["dp"][str(common.seeds(cfg)[0])][k] for k in ("epsilon_rdp", "epsilon_pld")}
  out["sampling_rate"] = c.batch_size / n
  return out


def _run_dir(workdir: str, name: str, seed: int) -> str:
  return os.path.join(workdir, "privacy", name, f"seed{seed}")


# --- entry point ---------------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[ml_collections.ConfigDict, str], dict]] = {
    "budget": run_budget, "interval": run_interval, "staged": run_staged, "noprop": run_noprop,
    "privacy": run_privacy}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the selected parts (finished runs are read back), then writes results.md/json and the plots."""
  validate(config, workdir)
  started = time.perf_counter()
  results, seconds, trained, read_back = common.run_parts(workdir, parts(config),
                                                          lambda part: RUNNERS[part](config, workdir))
  total = time.perf_counter() - started
  comparisons = expected_effects(config, results)
  md = markdown(config, results, comparisons, seconds, trained, read_back)
  report.write_results(workdir, {"config": config, "seconds": total, "part_seconds": seconds,
                                 "runs_trained": trained, "runs_read_back": read_back,
                                 "expected_effects": comparisons, "results": results}, md, figures(config, results))
  common.say(config, f"budgets: {trained} runs trained, {read_back} read back ({total:.0f} s); results.md in {workdir}")
  headline: dict[str, Any] = {"seconds": total, "runs_trained": trained, "runs_read_back": read_back}
  for effect in comparisons:
    headline[f"{effect['name']}_diff"] = effect["comparison"]["diff_mean"]
    headline[f"{effect['name']}_held"] = effect["held"]
  return headline


# --- report --------------------------------------------------------------------------------------------

def _per_seed(by_seed: dict, key: str) -> dict[str, float]:
  return {seed: float(r[key]) for seed, r in by_seed.items() if r.get(key) is not None}


def _cell(by_seed: dict, key: str, *, digits: int = 3, percent: bool = False) -> str:
  return report.fmt_mean_std(_per_seed(by_seed, key).values(), digits=digits, percent=percent)


def _diff(comp: dict, *, percent: bool = True) -> tuple[str, str]:
  scale = 100.0 if percent else 1.0
  low, high = comp["ci95"]
  return f"{scale * comp['diff_mean']:+.2f}", f"{scale * low:+.2f} to {scale * high:+.2f}"


def expected_effects(config: ml_collections.ConfigDict, results: dict) -> list[dict]:
  """The expected effects of the module docstring, each a paired comparison over seeds and a verdict.

  ``beats``: held when the paired 95% interval lies above 0 (``paired_comparison``'s ``better``);
  ``within 2 points``: held when the mean paired difference is at most 0.02 in absolute value;
  ``fraction of the cost``: held when fine-tuning's steps and training seconds are both below
  retraining's (means over seeds).
  """
  out = []
  if "budget" in results:
    for dataset, runs in results["budget"]["datasets"].items():
      if "decay" in runs and "fixed" in runs:
        comp = report.paired_comparison(_per_seed(runs["decay"], "accuracy_final_budget"),
                                        _per_seed(runs["fixed"], "accuracy_final_budget"))
        out.append({"name": f"budget_{dataset}", "effect": f"decaying budget beats the fixed tight budget at "
                    f"budget {config.budget.end} ({dataset})", "comparison": comp,
                    "held": comp["verdict"] == "better"})
  if "noprop" in results and "digits" in results["noprop"]["datasets"]:
    runs = results["noprop"]["datasets"]["digits"]
    comp = report.paired_comparison(_per_seed(runs["noprop"], "accuracy"), _per_seed(runs["backprop"], "accuracy"))
    out.append({"name": "noprop_digits", "effect": "NoProp within 2 points of backprop on digits",
                "comparison": comp, "held": abs(comp["diff_mean"]) <= 0.02,
                "ci_inside": -0.02 <= comp["ci95"][0] and comp["ci95"][1] <= 0.02})
  if "privacy" in results:
    runs = results["privacy"]["runs"]
    comp = report.paired_comparison(_per_seed(runs["finetune_dp"], "accuracy_forgotten"),
                                    _per_seed(runs["retrain"], "accuracy_forgotten"))
    cost = {k: float(np.mean(list(_per_seed(runs["finetune_dp"], k).values())))
            / float(np.mean(list(_per_seed(runs["retrain"], k).values()))) for k in ("steps", "train_seconds")}
    out.append({"name": "unlearning", "effect": "fine-tuning the DP model reaches retraining's forgotten-set "
                "accuracy (within 2 points) at a fraction of its cost", "comparison": comp, "cost_ratio": cost,
                "held": abs(comp["diff_mean"]) <= 0.02 and all(v < 1 for v in cost.values()),
                "ci_inside": -0.02 <= comp["ci95"][0] and comp["ci95"][1] <= 0.02})
  return out


def markdown(config: ml_collections.ConfigDict, results: dict, comparisons: list[dict], seconds: dict,
             trained: int, read_back: int) -> str:
  seeds = common.seeds(config)
  lines = ["# budgets: compute-budget curricula, NoProp, private training and unlearning", "",
           f"Seeds {', '.join(map(str, seeds))}; every table cell is the mean ± std over seeds (sample std), "
           "every comparison is paired by seed (same initialisation and data order). "
           f"This invocation: {trained} runs trained, {read_back} read back, wall seconds per part "
           + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
           + f"; the runs' own wall seconds, summed over every run shown: {common.run_seconds(results):.0f}.", "",
           "## Expected effects (fixed before any run)", "",
           "Criteria: *beats*: the paired 95% interval lies above 0; *within 2 points*: |mean paired difference| "
           "<= 2 points (the last column says whether the 95% interval also lies inside ±2 points); *fraction of "
           "the cost*: fine-tuning's mean steps and training seconds both below retraining's.", ""]
  rows = []
  for e in comparisons:
    comp = e["comparison"]
    diff, ci = _diff(comp)
    extra = ""
    if "cost_ratio" in e:
      extra = f"cost ratio: steps {e['cost_ratio']['steps']:.3f}, train s {e['cost_ratio']['train_seconds']:.3f}; "
    if "ci_inside" in e:
      extra += f"CI inside ±2: {'yes' if e['ci_inside'] else 'no'}"
    rows.append([e["effect"], diff, ci, f"{comp['wins']}/{comp['num_pairs']}", f"{comp['p_value']:.3g}",
                 comp["verdict"], "**met**" if e["held"] else "**not met**", extra])
  lines += [report.markdown_table(["expected effect", "diff (points)", "95% CI", "wins", "p", "verdict", "result",
                                   "notes"], rows) if rows else "(no part with an expected effect was run)", ""]
  for part in results:
    lines += globals()[f"_{part}_md"](config, results[part])
  return "\n".join(lines) + "\n"


def _vs(runs: dict, ours: str, base: str, key: str, label: str, *, percent: bool = True) -> list[str]:
  comp = report.paired_comparison(_per_seed(runs[ours], key), _per_seed(runs[base], key))
  diff, ci = _diff(comp, percent=percent)
  return [f"{ours} - {base}", label, diff, ci, f"{comp['wins']}/{comp['num_pairs']}", comp["verdict"]]


_VS_HEADERS = ["comparison", "metric", "diff", "95% CI", "wins", "verdict"]


def _budget_md(config: ml_collections.ConfigDict, part: dict) -> list[str]:
  c = config.budget
  lines = ["## Compute-budget curricula", "",
           f"IterativeClassifier with K = {c.max_steps} refinement steps, {c.num_steps} Adam steps of batch "
           f"{c.batch_size} per arm; decaying budget {c.start} -> {c.end} ({c.kind}) over the first "
           f"{c.decay_fraction:.0%} of the steps. Test accuracy of the prediction after n steps.", ""]
  for dataset, runs in part["datasets"].items():
    rows = [[arm, _cell(r, "accuracy_final_budget", percent=True, digits=2),
             _cell(r, "accuracy_max_budget", percent=True, digits=2),
             _cell(r, "expected_halting_step", digits=2) if arm == "grpo" else "",
             _cell(r, "train_seconds", digits=1)] for arm, r in runs.items()]
    lines += [f"### {dataset}", "",
              report.markdown_table(["arm", f"acc @ budget {c.end} (%)", f"acc @ budget {c.max_steps} (%)",
                                     "expected halting step", "train s"], rows), ""]
    vs = [_vs(runs, arm, "fixed", "accuracy_final_budget", f"acc @ {c.end} (points)")
          for arm in runs if arm != "fixed" and "fixed" in runs]
    if vs:
      lines += [report.markdown_table(_VS_HEADERS, vs), ""]
  return lines


def _interval_md(config: ml_collections.ConfigDict, part: dict) -> list[str]:
  c = config.interval
  pre = part["pretrain"]
  lines = ["## Backward interval (2-D denoising chain, sparse reward)", "",
           f"DDPM chain of T = {c.chain_steps} steps pretrained for {c.pretrain_steps} steps: reward "
           f"{_cell(pre, 'reward')}, diversity {_cell(pre, 'diversity')}, quality {_cell(pre, 'quality')}. "
           f"Then {c.rl_steps} policy-gradient steps of {c.batch_size} trajectories; `backward` grows the "
           f"trained interval from the last step to the whole chain over {c.grow_fraction:.0%} of them.", ""]
  runs = part["runs"]
  rows = [[arm, _cell(r, "reward"), _cell(r, "diversity"), _cell(r, "quality"), _cell(r, "train_seconds", digits=1)]
          for arm, r in runs.items()]
  lines += [report.markdown_table(["arm", "final reward", "diversity", "quality", "train s"], rows), ""]
  if "backward" in runs and "all" in runs:
    lines += [report.markdown_table(_VS_HEADERS, [
        _vs(runs, "backward", "all", "reward", "reward (x100)"),
        _vs(runs, "backward", "all", "diversity", "diversity (x100)")]), ""]
  return lines


def _staged_md(config: ml_collections.ConfigDict, part: dict) -> list[str]:
  c = config.staged
  crowd = part["crowd_accuracy"]
  lines = ["## Staged difficulty sampler (IRT difficulties)", "",
           f"{c.dataset}: a crowd of {c.crowd_size} MLPs (accuracy {min(crowd):.3f} to {max(crowd):.3f}) answers "
           f"every train item; 1PL IRT difficulties ({part['irt_steps']} fit steps), {c.num_levels} levels of "
           f"{part['levels']} items. An MLP {tuple(c.hidden)} trained {c.epochs} epochs in each order.", ""]
  runs = part["runs"]
  rows = [[s, _cell(r, "accuracy", percent=True, digits=2), str(next(iter(r.values()))["first_levels"]),
           _cell(r, "train_seconds", digits=1)] for s, r in runs.items()]
  lines += [report.markdown_table(["schedule", "final test acc (%)", "levels in the first 4 batches (seed 0)",
                                   "train s"], rows), ""]
  vs = [_vs(runs, s, "random", "accuracy", "acc (points)") for s in runs if s != "random" and "random" in runs]
  if vs:
    lines += [report.markdown_table(_VS_HEADERS, vs), ""]
  return lines


def _noprop_md(config: ml_collections.ConfigDict, part: dict) -> list[str]:
  c = config.noprop
  lines = ["## NoProp-DT vs backprop", "",
           f"NoProp-DT with T = {c.num_blocks} blocks of width {c.hidden} (one block per step) and an MLP with "
           f"{c.baseline_depth} hidden layers of about the same parameter count, each {c.num_steps} AdamW steps of "
           f"batch {c.batch_size}. Memory: XLA's temporary bytes of the compiled training step; where they are "
           f"about two float32 parameter trees (gradients and updates) the activations are too small at this batch "
           f"for NoProp's block-local training to save memory.", ""]
  for dataset, runs in part["datasets"].items():
    rows = []
    for arm, r in runs.items():
      first = next(iter(r.values()))
      mem = first.get("step_temp_bytes")
      rows.append([arm if first["width"] is None else f"{arm} (width {first['width']})", first["params"],
                   _cell(r, "accuracy", percent=True, digits=2), "n/a" if mem is None else f"{mem / 2**20:.2f}",
                   "n/a" if mem is None else f"{mem / (4 * first['params']):.2f}", _cell(r, "train_seconds", digits=1)])
    lines += [f"### {dataset}", "", report.markdown_table(["model", "params", "test acc (%)", "step temp MiB",
                                                           "temp / float32 params", "train s"], rows), "",
              report.markdown_table(_VS_HEADERS, [_vs(runs, "noprop", "backprop", "accuracy", "acc (points)")]), ""]
  return lines


def _privacy_md(config: ml_collections.ConfigDict, part: dict) -> list[str]:
  c = config.privacy
  eps = part["epsilon"]
  n = part["num_examples"]
  lines = ["## Private training and unlearning", "",
           f"{c.dataset}, N = {n} train examples, MLP {tuple(c.hidden)}. DP-SGD (ghost clipping, Poisson sampling) "
           f"with sigma = {c.noise_multiplier}, C = {c.clip}, q = {part['sampling_rate']:.5f} (expected batch "
           f"{c.batch_size}), {c.base_steps} steps, delta = {c.delta}: epsilon = {eps['epsilon_rdp']:.3f} (RDP), "
           f"{eps['epsilon_pld']:.3f} (PLD). The forgotten set: {round(c.forget_fraction * n)} random train "
           f"examples per seed; fine-tuning {c.finetune_steps} steps, retraining {c.retrain_steps} steps on the "
           "retained data (batch " + f"{c.batch_size}). Membership AUC: loss-threshold attack, forgotten set vs test "
           "set (0.5: no leak).", ""]
  runs = part["runs"]
  rows = [[name, _cell(r, "accuracy_forgotten", percent=True, digits=2),
           _cell(r, "accuracy_retained", percent=True, digits=2), _cell(r, "accuracy_test", percent=True, digits=2),
           _cell(r, "membership_auc"), _cell(r, "steps", digits=0), _cell(r, "train_seconds", digits=2)]
          for name, r in runs.items()]
  lines += [report.markdown_table(["model", "forgotten acc (%)", "retained acc (%)", "test acc (%)",
                                   "membership AUC", "steps", "train s"], rows), ""]
  lines += [report.markdown_table(_VS_HEADERS, [
      _vs(runs, "finetune_dp", "retrain", "accuracy_forgotten", "forgotten acc (points)"),
      _vs(runs, "finetune_dp", "retrain", "accuracy_test", "test acc (points)"),
      _vs(runs, "finetune_dp", "retrain", "membership_auc", "membership AUC (x100)"),
      _vs(runs, "finetune_plain", "retrain", "accuracy_forgotten", "forgotten acc (points)"),
      _vs(runs, "finetune_plain", "retrain", "membership_auc", "membership AUC (x100)"),
      _vs(runs, "dp", "plain", "accuracy_test", "test acc (points)")]), ""]
  return lines


# --- plots ---------------------------------------------------------------------------------------------

def _mean_curve(by_seed: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
  curves = [r["curve"] for r in by_seed.values()]
  length = min(len(cv) for cv in curves)
  steps = np.asarray([p["step"] for p in curves[0][:length]])
  return steps, np.mean([[p[key] for p in cv[:length]] for cv in curves], 0)


def figures(config: ml_collections.ConfigDict, results: dict) -> dict[str, Callable[[str], None]]:
  out: dict[str, Callable[[str], None]] = {}
  if "budget" in results:
    out["budget.png"] = lambda path: _plot_budget(config, results["budget"], path)
  if "interval" in results:
    out["interval.png"] = lambda path: _plot_curves({"": results["interval"]["runs"]}, "reward", "RL reward", path)
  if "staged" in results:
    out["staged.png"] = lambda path: _plot_curves({"": results["staged"]["runs"]}, "accuracy", "test accuracy", path,
                                                  xlabel="step (one point per epoch)")
  if "noprop" in results:
    out["noprop.png"] = lambda path: _plot_curves(results["noprop"]["datasets"], "accuracy", "test accuracy", path)
  if "privacy" in results:
    out["privacy.png"] = lambda path: _plot_privacy(results["privacy"], path)
  return out


def _plot_budget(config: ml_collections.ConfigDict, part: dict, path: str) -> None:
  datasets = part["datasets"]
  fig, axes = report.figure(5.0 * len(datasets), 7.0, nrows=2, ncols=len(datasets), squeeze=False)
  for j, (dataset, runs) in enumerate(datasets.items()):
    for arm, by_seed in runs.items():
      acc = np.mean([r["accuracy_by_budget"] for r in by_seed.values()], 0)
      axes[0][j].plot(np.arange(1, len(acc) + 1), acc, marker="o", label=arm)
      steps, curve = _mean_curve(by_seed, "accuracy_final_budget")
      axes[1][j].plot(steps, curve, label=arm)
    axes[0][j].axvline(config.budget.end, color="gray", ls=":")
    axes[0][j].set(title=f"{dataset}: final test accuracy by budget", xlabel="refinement steps n",
                   ylabel="test accuracy")
    axes[1][j].set(title=f"{dataset}: accuracy at budget {config.budget.end}", xlabel="step", ylabel="test accuracy")
    axes[0][j].legend()
  report.save_figure(fig, path)


def _plot_curves(groups: dict, key: str, ylabel: str, path: str, *, xlabel: str = "step") -> None:
  fig, axes = report.figure(5.0 * len(groups), 3.5, ncols=len(groups), squeeze=False)
  for j, (title, runs) in enumerate(groups.items()):
    for arm, by_seed in runs.items():
      steps, curve = _mean_curve(by_seed, key)
      axes[0][j].plot(steps, curve, marker=".", label=arm)
    axes[0][j].set(title=title or None, xlabel=xlabel, ylabel=f"{ylabel} (mean over seeds)")
    axes[0][j].legend()
  report.save_figure(fig, path)


def _plot_privacy(part: dict, path: str) -> None:
  runs = part["runs"]
  keys = ("accuracy_forgotten", "accuracy_retained", "accuracy_test", "membership_auc")
  fig, ax = report.figure(8.0, 3.5)
  width = 0.8 / len(runs)
  for i, (name, by_seed) in enumerate(runs.items()):
    means = [np.mean(list(_per_seed(by_seed, k).values())) for k in keys]
    stds = [np.std(list(_per_seed(by_seed, k).values())) for k in keys]
    ax.bar(np.arange(len(keys)) + i * width, means, width, yerr=stds, label=name)
  ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, ["forgotten acc", "retained acc", "test acc",
                                                         "membership AUC"])
  ax.set(ylim=(0, 1), title="private training and unlearning (mean over seeds)")
  ax.legend(fontsize="small", ncols=len(runs))
  report.save_figure(fig, path)
