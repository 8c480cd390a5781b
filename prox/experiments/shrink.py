"""Experiment ``shrink``: elastic networks (Once-for-All) and budgeted structured pruning (LAPP) on digits.

Expected effects, fixed before running and reported either way (paired comparisons over seeds):

* ``ofa``: "OFA sub-networks within 1 point of the same architectures trained alone" -- for every
  sub-network of the grid, ``|mean_seeds (acc_OFA - acc_alone)| <= 1`` point.
* ``lapp``: "LAPP above uniform pruning at equal FLOPs" -- at each budget (40% and 60% of the MACs
  removed), LAPP's accuracy beats magnitude channel pruning's at the same FLOPs budget (paired 95%
  interval above 0).
* ``lapp`` arm ``lapp_bypass``: "LAPP with its bypass above LAPP without at equal FLOPs" -- at each budget,
  LAPP with the bypass around the heavily pruned ``lapp.bypass`` groups (its MACs taken out of the
  channels' budget) beats LAPP without it (paired 95% interval above 0).
* ``proard``: "robust-gap student sampling above uniform student sampling in robust accuracy" -- the
  mean over the grid's sub-networks of the robust test accuracy (PGD) is higher with ProARD's sampler
  than with uniform sampling (paired 95% interval above 0).
* ``lightweight``: "the unified + fine-tuned model at or above the single model's test accuracy" -- the
  mean paired difference (dual-input/dual-output, unified, fine-tuned minus the same cnn trained on the
  augmented stream alone for the same number of steps) is >= 0 points and the paired 95% interval does
  not lie below 0.
* ``fedtiny``: "FedTiny above pruning at the server once at equal density" -- after the same number of
  FedAvg rounds at the same weight density, FedTiny's server model beats the one pruned once by magnitude
  at the server (paired 95% interval above 0).

  prox --config=prox/experiments/configs/shrink.py --workdir=runs/shrink

Part ``ofa`` (Cai, Gan, Wang, Zhang, Han 2020, "Once-for-All: Train One Network and Specialize it for
Efficient Deployment"). One elastic inverted-residual CNN (``prox.models.ElasticConfig``: elastic kernel
size, depth per stage, width of every block's middle channels) is trained with progressive shrinking
(``prox.tasks.progressive_shrinking``): phase ``full`` trains the largest network alone
(``L = CE(f_L)``), then phases ``kernel``, ``depth1``, ``width1`` enlarge the supported options one
dimension at a time; in those phases every step trains the sandwich (Yu & Huang 2019) -- the largest, the
smallest allowed and one uniformly drawn sub-network -- with in-place distillation from the largest,
``L = CE(f_L) + sum_{s in (S, R)} [CE(f_s) + kd T^2 KL(softmax(sg(f_L)/T) || softmax(f_s/T))]``
(``prox.models.sandwich_loss``). The phase machine's state lives in ``TrainState.extra["shrink"]`` and is
stepped by a transition inside the compiled step; the loss reads it (``ctx.extra``) and draws the
sub-networks from ``ctx.rng``, so the sampled architectures change inside one compiled step (traced
choices, ``lax.switch`` over the variants) without a recompile. Adam with a cosine decay restarted in each
phase (OFA trains each phase as its own schedule). Baseline: every sub-network of the grid (uniform
``kernel:depth:width`` over the blocks) trained alone from the same initialisation and data order for the
same number of steps as the whole OFA run (CE, Adam, cosine over the run). Departures from OFA: no channel
re-organisation before the width phase (the Adam moments would have to be permuted with the weights), no
BatchNorm, the smaller search space of ``prox.models.ElasticConfig``.

Part ``lapp`` (Zhai, Guo, Liu, Xing, Xu 2023, "LAPP: Layer Adaptive Progressive Pruning for Compressing
CNNs from Scratch"). The zoo ``cnn`` (two convs, a dense layer, a head) is pruned from scratch to keep
``b = 1 - removed`` of its MACs. LAPP (``prox.transforms.lapp``): learnable per-layer thresholds (in the
parameters, with their own Adam learning rate ``threshold_learning_rate``) on scale-free L1 channel scores, soft masks ``sigmoid(T_t (s_c - t_l))`` with ``T_t`` rising
geometrically, and the penalty ``lambda max(0, F(m)/F - b_t)^2`` against the budget ``b_t`` that tightens
cubically over ``[0, prune_steps]``; at ``prune_steps`` a transition inside the step freezes LAPP's hard
masks (``s_c > t_l``) into a ``prox.transforms.channel_pruning`` state, whose one update at
``prune_steps + 1`` removes the lowest-L1 channels only if LAPP's masks still exceed the budget (the
achieved FLOPs always meet it; the report shows LAPP's own FLOPs before that trim); then fine-tuning with
the masks fixed. Baseline ("uniform" magnitude pruning): ``prox.transforms.channel_pruning`` with the same
budget schedule (masks recomputed every ``frequency`` steps from group-normalised L1 norms, Li et al.
2017), and the dense network; all for ``num_steps`` steps. Arm ``lapp_bypass``: LAPP with a bypass
around each group of ``lapp.bypass`` (``cnn_forward``: a zero-initialised linear map
``prox.transforms.bypass_init`` from the group's producer's input to its consumer's pre-activation,
``prox.transforms.bypass_apply``, trained with the weights and never masked), whose MACs
(``prox.transforms.bypass_flops``) come out of the budget: the channels get ``1 - removed - F_bypass/F``.
Departure: LAPP adds the bypass to the layers its thresholds prune hard, found during training; here the
groups are fixed before training (so the budget is known), chosen from the runs without bypass.

Part ``proard`` (after Mousavi, Mousavi, Daneshtalab 2025, "ProARD: Progressive Adversarial Robustness
Distillation"; the loss after Goldblum, Fowl, Feizi, Goldstein 2020, "Adversarially Robust Distillation").
The elastic network of ``ofa`` is trained adversarially: per step the teacher (the largest sub-network,
``T``) and one student ``S`` (a uniform sub-network of the candidate table: every ``kernel:depth:width``
combination but the largest) each see FGSM examples against their own loss (Goodfellow et al. 2015,
``x' = clip(x + eps sign grad_x CE)``), and
``L = CE(f_T(x'_T), y) + CE(f_S(x'_S), y) + kd T^2 KL(softmax(sg f_T(x'_S)/T) || softmax(f_S(x'_S)/T))``.
The student of the next step is drawn inside the step by a transition: arm ``gap``,
``prox.tasks.robust_gap_sampler`` (``P(i) = softmax(g/tau)``, ``g_i`` the running gap between the
teacher's and student ``i``'s robust batch accuracies, updated from the step's metrics); arm ``uniform``,
uniformly (the gaps are tracked too). Departures: no progressive phases (the full space from the start),
a finite candidate table. Test: clean accuracy and robust accuracy under PGD (``eval_pgd_steps`` steps of
size ``eps/4``, random start) of every grid sub-network.

Part ``lightweight`` (Isong 2025, "Building Efficient Lightweight CNN Models"). Two identical zoo cnns
(the sub-models) are trained at once for ``dual_steps`` steps, one on the original digits and one on their
augmented copies (``PairSource``: the augmented stream and, from the same stream with the identity warp,
each sample's source image), with ``L = CE(f_o(x), y) + CE(f_a(aug(x)), y)`` (``prox.robust.dual_io_loss``
over ``prox.robust.pair_apply``, Adam). They are unified into one cnn, ``theta = w theta_o + (1 - w)
theta_a`` (``prox.robust.unify_submodels``), which is fine-tuned for ``finetune_steps`` steps on the
augmented stream (continuing where the dual phase left it) with ``prox.transforms.progressive_unfreezing``
(Howard & Ruder 2018): the head trains from the start, the layers below unfreeze one every
``finetune_steps / len(unfreeze)`` steps, each with fresh Adam moments. Baseline ``single``: the same cnn,
initialisation and augmented data order, Adam, ``dual_steps + finetune_steps`` steps. Departures from the
paper: both sub-models start from the same initialisation (averaging two independently initialised
networks mixes unrelated features: Frankle et al. 2020 on linear mode connectivity), the unified model is
their parameter average with no added layers, the augmentation is ``prox.tasks.StreamSource``'s
(rotation, zoom, shift, pixel noise), and the fine-tuning runs on the augmented stream.

Part ``fedtiny`` (Huang, Zhang, Sun, Fang, Yuan, Wu 2023, "Distributed Pruning Towards Tiny Neural Networks
in Federated Learning"; FedAvg after McMahan et al. 2017). ``N`` clients hold a label-sorted shard split of
the digits (``client_split``: about two digits each). The clients are a leading axis of the parameters:
one compiled step is one local SGD step of every client at once (``fed_loss``: ``sum_i CE_i(theta_i)``
over the client-major batch, vmapped, so client ``i``'s gradient is its own), and the step's transition
re-applies the masks, feeds each client's gradient into its own per-layer top-K buffer
(``prox.transforms.topk_accumulate`` vmapped over clients) and, after every ``local_steps``-th step,
runs the server: FedAvg (``theta <- mean_i theta_i``, equal shard sizes, sent back to every client) and,
in rounds ``r < prune_rounds``, ``prox.transforms.grow_and_prune`` of layer ``r mod L`` with
``n_r = adjust_count(r)`` from the clients' summed buffers. The rounds are the loop's steps, so the whole
federated run is one ``prox.loop.run``. FedTiny starts from the coarse candidate chosen by
``prox.transforms.adaptive_bn_selection`` among ``candidates`` magnitude masks of the target density
with random per-layer densities (``random_layer_densities``, row 0 uniform). Baseline ``server``: row 0
(magnitude pruning once at the server, uniform per-layer density), then FedAvg with the masks fixed.
Diagnostic arm ``select``: FedTiny's selected candidate with the masks fixed (the selection alone).
Departures: the zoo cnn has no batch norm, so the selection has no statistics to recalibrate: each
candidate is scored by the clients' mean loss on one local batch each (what the selection minimises once
the statistics are recalibrated); the server prunes the initialisation (it has no data); the layers are
adjusted in turn, one per round; SGD without momentum; the transition, not the clients, keeps the buffers
(the same arithmetic: each client's buffer sees only its own gradients). The clients are spread over the
mesh's data axis (``num_clients`` a multiple of the devices): each device computes its clients' local
steps on its rows of the client-major batch; FedAvg and the pruning run on the global arrays.

Outputs in ``workdir``: ``results.md``, ``results.json``, ``ofa.png`` (accuracy against MACs),
``lapp.png``, ``proard.png``, ``lightweight.png`` and ``fedtiny.png``; one directory per run (``<part>/<run>/seed<k>/result.json``): a rerun reads finished runs
back.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from prox import loop
from prox import models
from prox import robust
from prox import step as step_lib
from prox import tasks
from prox import transforms
from prox.experiments import common
from prox.experiments import report
from prox.tasks import data as data_lib

PARTS = ("ofa", "lapp", "proard", "lightweight", "fedtiny")
QUICK = {"num_seeds": 1, "ofa.phase_steps": (20, 10, 10, 10), "ofa.grid": "3:1:0.5,5:2:1.0",
         "lapp.removed": (0.5,), "lapp.num_steps": 60, "lapp.prune_steps": 30, "lapp.frequency": 5,
         "lapp.eval_every": 30, "proard.num_steps": 20, "lightweight.dual_steps": 20,
         "lightweight.finetune_steps": 20, "lightweight.eval_every": 20, "fedtiny.arms": "fedtiny,server",
         "fedtiny.rounds": 8, "fedtiny.local_steps": 2, "fedtiny.prune_rounds": 4, "fedtiny.eval_every": 4}
# Each run has its own directory and record (with its part's settings), so other parts or more seeds may
# follow in the same workdir, and a part's section may change there (its runs check their own settings).
RESUMABLE = ("parts", "num_seeds", "eval_batch_size", "progress", "ofa", "lapp", "proard", "lightweight", "fedtiny")


# --- config --------------------------------------------------------------------------------------------

def parts(config: ml_collections.ConfigDict) -> list[str]:
  names = common.names(config, "parts", PARTS)
  common.require(len(set(names)) == len(names), f"parts names a part twice: {config.parts!r}")
  return names


def validate(config: ml_collections.ConfigDict, workdir: str | None) -> None:
  """Checks every value the selected parts use; raises ``ConfigError`` naming the first bad one."""
  selected = parts(config)
  c = config
  common.positive_ints(c, "seed", zero_ok=True)
  common.positive_ints(c, "num_seeds")
  common.require(c.dataset == "digits", f"dataset must be 'digits' (8x8 images), got {c.dataset!r}")
  common.check_batch("batch_size", c.batch_size)
  common.check_batch("eval_batch_size", c.eval_batch_size)
  if "ofa" in selected:
    o = c.ofa
    ec = common.library_check("ofa", elastic_config, o, (8, 8, 1), 10)
    common.numbers(c, "ofa.learning_rate", "ofa.temperature", low=0, low_open=True)
    common.numbers(c, "ofa.kd_weight", low=0)
    common.library_check("ofa", shrinking, o, ec)
    grid(o, ec)
  if "lapp" in selected:
    p = c.lapp
    common.positive_ints(c, "lapp.width", "lapp.hidden", "lapp.num_steps", "lapp.prune_steps", "lapp.frequency",
                         "lapp.eval_every")
    common.require(p.prune_steps < p.num_steps,
                   f"lapp.prune_steps ({p.prune_steps}) must be below lapp.num_steps ({p.num_steps})")
    removed = tuple(p.removed) if isinstance(p.removed, (tuple, list)) else ()
    common.require(bool(removed) and all(common.is_number(r) and 0 < r < 1 for r in removed)
                   and len(set(removed)) == len(removed),
                   f"lapp.removed must be distinct fractions in (0, 1), got {p.removed!r}")
    common.numbers(c, "lapp.learning_rate", "lapp.threshold_learning_rate", low=0, low_open=True)
    arms = common.distinct_names(c, "lapp.arms", PRUNED_ARMS)
    if "lapp_bypass" in arms:
      common.distinct_names(c, "lapp.bypass", BYPASS_GROUPS)
      net, structure = cnn_structure(p, (8, 8, 1), 10)
      share = bypass_macs(net.params, (8, 8, 1), common.names(c, "lapp.bypass")) / transforms.full_flops(structure)
      common.require(max(removed) + share < 1, f"lapp.bypass: the bypasses take {share:.3f} of the MACs, more than "
                     f"the budget of {1 - max(removed):.3f} leaves")
    common.library_check("lapp", transforms.lapp, cnn_structure(p, (8, 8, 1), 10)[1], flops_target=0.5,
                         end_step=p.prune_steps, temperature=p.temperature, penalty_weight=p.penalty_weight)
  if "proard" in selected:
    if "ofa" not in selected:
      ec = common.library_check("ofa", elastic_config, c.ofa, (8, 8, 1), 10)
      grid(c.ofa, ec)
    common.positive_ints(c, "proard.num_steps")
    common.positive_ints(c, "proard.eval_pgd_steps", zero_ok=True)
    common.numbers(c, "proard.learning_rate", "proard.eps", "proard.temperature", "proard.kd_temperature",
                   low=0, low_open=True)
    common.numbers(c, "proard.kd_weight", low=0)
    common.numbers(c, "proard.momentum", low=0, high=1, high_open=True)
    common.distinct_names(c, "proard.arms", PROARD_ARMS)
  if "lightweight" in selected:
    common.positive_ints(c, "lightweight.width", "lightweight.hidden", "lightweight.dual_steps",
                         "lightweight.finetune_steps", "lightweight.eval_every")
    common.numbers(c, "lightweight.learning_rate", "lightweight.finetune_learning_rate", low=0, low_open=True)
    common.numbers(c, "lightweight.weight", low=0, high=1)
    groups = common.distinct_names(c, "lightweight.unfreeze", CNN_LAYERS)
    common.require(c.lightweight.finetune_steps >= len(groups),
                   f"lightweight.finetune_steps ({c.lightweight.finetune_steps}) must be at least the number of "
                   f"unfreezing groups ({len(groups)})")
  if "fedtiny" in selected:
    f = c.fedtiny
    common.positive_ints(c, "fedtiny.num_clients", "fedtiny.shards_per_client", "fedtiny.width", "fedtiny.hidden",
                         "fedtiny.rounds", "fedtiny.local_steps", "fedtiny.client_batch", "fedtiny.candidates",
                         "fedtiny.select_batch", "fedtiny.prune_rounds", "fedtiny.topk", "fedtiny.eval_every")
    common.numbers(c, "fedtiny.density", low=0, high=1, low_open=True)
    common.distinct_names(c, "fedtiny.arms", FED_ARMS)
    common.numbers(c, "fedtiny.alpha", low=0, high=1)
    common.numbers(c, "fedtiny.learning_rate", low=0, low_open=True)
    common.numbers(c, "fedtiny.spread", low=0)
    shard = DIGITS_TRAIN_ROWS // (f.num_clients * f.shards_per_client) * f.shards_per_client   # rows per client
    common.require(f.client_batch <= shard and f.select_batch <= shard,
                   f"fedtiny.client_batch ({f.client_batch}) and fedtiny.select_batch ({f.select_batch}) must not "
                   f"exceed a client's {shard} rows")
    common.require(f.prune_rounds <= f.rounds,
                   f"fedtiny.prune_rounds ({f.prune_rounds}) must not exceed fedtiny.rounds ({f.rounds})")
    common.require(f.num_clients % jax.device_count() == 0,
                   f"fedtiny.num_clients ({f.num_clients}) must be a multiple of the {jax.device_count()} devices "
                   "(the clients are spread over the data axis)")
  if workdir is not None:
    common.check_workdir(workdir)


class Env(NamedTuple):
  """What every run shares: config, workdir, mesh, splits, compile cache, memoised steps/evaluators."""
  c: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  train: data_lib.ArrayDataset
  test: data_lib.ArrayDataset
  cache: loop.CompileCache
  memo: dict

  def get(self, key: Any, build: Callable[[], Any]) -> Any:
    if key not in self.memo:
      self.memo[key] = build()
    return self.memo[key]


def _once(env: Env, part: str, name: str, seed: int, settings: dict, fn: Callable[[], dict]) -> dict:
  directory = os.path.join(env.workdir, part, name, f"seed{seed}")
  record = {"part": part, "run": name, "seed": seed, "batch_size": env.c.batch_size, "settings": settings}
  return common.run_once(directory, "shrink", record, fn)


def _state(env: Env, params: Any, tx: optax.GradientTransformation, seed: int, extra: Any = ()) -> step_lib.TrainState:
  return common.replicated_state(params, tx, env.mesh, seed=seed, extra=extra)


def fit(env: Env, step: Callable, state: step_lib.TrainState, num_steps: int, seed: int, *,
        evaluate: Callable[[step_lib.TrainState], dict] | None = None, every: int | None = None,
        source: Any = None) -> tuple[loop.LoopResult, dict]:
  """One ``prox.loop.run`` on the augmented digits stream (``StreamSource(train, seed)``: the same data
  order for every run of a seed; or ``source``); ``evaluate`` every ``every`` steps and at the end into
  ``curve``."""
  actions = ()
  if evaluate is not None:
    def log(ctx: loop.Context) -> None:
      ctx.record.setdefault("curve", []).append({"step": ctx.step, **evaluate(ctx.state)})
    actions = ((loop.Every(steps=every or num_steps, end=True), log),)
  started = time.perf_counter()
  source = tasks.StreamSource(env.train, seed) if source is None else source
  result = loop.run(step, state, source, mesh=env.mesh, batch_size=env.c.batch_size,
                    num_steps=num_steps, actions=actions, compile_cache=env.cache)
  cost = {"steps": int(jax.device_get(result.state.step)), "train_seconds": result.train_seconds,
          "wall_seconds": time.perf_counter() - started, "compile_seconds": result.compile_seconds}
  return result, cost


def accuracy(env: Env, apply: Callable, params: Any) -> float:
  """Test accuracy of ``apply(params, model_state, x, train=...)``; one compiled evaluator per ``apply``."""
  fn = env.get(("eval", id(apply)), lambda: common.evaluator(apply, env.mesh))
  return fn(_state(env, params, optax.identity(), 0), env.test, env.c.eval_batch_size)["accuracy"]


# --- part ofa: progressive shrinking ------------------------------------------------------------------

def elastic_config(o: ml_collections.ConfigDict, input_shape: tuple[int, ...], num_classes: int
                   ) -> models.ElasticConfig:
  return models.ElasticConfig(input_shape=tuple(int(d) for d in input_shape), num_classes=int(num_classes),
                              stem_channels=o.stem_channels, stages=tuple(tuple(s) for s in o.stages),
                              kernel_sizes=tuple(o.kernel_sizes), width_fractions=tuple(o.width_fractions),
                              expand_ratio=o.expand_ratio)


def shrinking(o: ml_collections.ConfigDict, ec: models.ElasticConfig) -> tasks.ProgressiveShrinking:
  return tasks.progressive_shrinking(num_kernels=len(ec.kernel_sizes), max_depths=ec.max_depths,
                                     num_widths=len(ec.width_fractions), phase_steps=tuple(o.phase_steps),
                                     min_depth=o.min_depth)


def uniform_subnet(ec: models.ElasticConfig, kernel: int, depth: int, width: float) -> tasks.Subnet:
  """Kernel size ``kernel`` and width fraction ``width`` in every block, depth ``min(depth, D_s)``."""
  n = len(ec.blocks)
  return tasks.Subnet(np.full([n], ec.kernel_sizes.index(kernel), np.int32),
                      np.full([n], ec.width_fractions.index(width), np.int32),
                      np.asarray([min(depth, d) for d in ec.max_depths], np.int32))


def grid(o: ml_collections.ConfigDict, ec: models.ElasticConfig) -> list[tuple[str, tasks.Subnet]]:
  """The ``ofa.grid`` sub-networks ``(name, Subnet)``, ascending in MACs."""
  common.require(isinstance(o.grid, str) and bool(o.grid.strip()),
                 f"ofa.grid must be a comma-separated string of kernel:depth:width, got {o.grid!r}")
  entries = [e.strip() for e in o.grid.split(",") if e.strip()]
  out = []
  for entry in entries:
    parts_ = entry.split(":")
    ok = len(parts_) == 3
    try:
      k, d, w = int(parts_[0]), int(parts_[1]), float(parts_[2])
    except (ValueError, IndexError):
      ok = False
    common.require(ok and k in ec.kernel_sizes and w in ec.width_fractions and o.min_depth <= d <= max(ec.max_depths),
                   f"ofa.grid: {entry!r} is not kernel:depth:width with kernel in {ec.kernel_sizes}, depth in "
                   f"[{o.min_depth}, {max(ec.max_depths)}] and width in {ec.width_fractions}")
    out.append((f"k{k}-d{d}-w{w:g}", uniform_subnet(ec, k, d, w)))
  common.require(len({n for n, _ in out}) == len(out), f"ofa.grid names a sub-network twice: {o.grid!r}")
  return sorted(out, key=lambda e: float(models.elastic_flops(e[1], config=ec)))


def _ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def ofa_loss(ec: models.ElasticConfig, ps: tasks.ProgressiveShrinking, *, kd_weight: float,
             temperature: float) -> Callable:
  """The progressive-shrinking loss: ``CE(f_L)`` in phase ``full``, the sandwich loss with in-place KD
  after (``lax.cond`` on the phase: only the taken branch runs). The phase is ``ctx.extra["shrink"]``;
  the random sub-network is drawn from ``ctx.rng``. Metrics: the sampled sub-networks' MACs (fractions
  of the full network's) and the phase, so a caller sees what the step trained."""
  full = float(models.elastic_flops(ps.largest(), config=ec))

  def loss_fn(params, model_state, batch, ctx):
    x, y = batch["image"], batch["label"]
    state = ctx.extra["shrink"]
    large, small, rand = ps.sandwich(state, ctx.rng)
    phase = ps.phase(state)

    def largest_only():
      logits = models.elastic_apply(params, x, large, config=ec)
      ce = _ce(logits, y)
      zero = 0.0 * ce   # (varying over the data axis like the sandwich branch's terms)
      return ce, {"loss_0": ce, "loss_1": zero, "kd_1": zero, "loss_2": zero, "kd_2": zero}

    def sandwich():
      return models.sandwich_loss(params, x, y, (large, small, rand), config=ec, kd_weight=kd_weight,
                                  temperature=temperature)

    loss, aux = lax.cond(phase == 0, largest_only, sandwich)
    trained = phase > 0
    metrics = {**aux, "phase": phase.astype(jnp.float32),
               "macs_smallest": jnp.where(trained, models.elastic_flops(small, config=ec), full) / full,
               "macs_random": jnp.where(trained, models.elastic_flops(rand, config=ec), full) / full}
    return loss, (metrics, model_state)

  return loss_fn


def alone_loss(ec: models.ElasticConfig) -> Callable:
  """``CE(f_s)`` of the fixed sub-network ``ctx.extra["subnet"]`` (one compiled step serves the grid)."""

  def loss_fn(params, model_state, batch, ctx):
    logits = models.elastic_apply(params, batch["image"], ctx.extra["subnet"], config=ec)
    ce = _ce(logits, batch["label"])
    return ce, ({"loss": ce, "accuracy": jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))},
                model_state)

  return loss_fn


def subnet_apply(ec: models.ElasticConfig) -> Callable:
  """``apply({"net", "subnet"}, model_state, x, train)``: the sub-network as data (one evaluator)."""

  def apply(tree, model_state, x, *, train: bool = False):
    del train
    return models.elastic_apply(tree["net"], x, tasks.Subnet(*tree["subnet"]), config=ec), model_state

  return apply


def phase_schedule(learning_rate: float, phase_steps: tuple[int, ...]) -> optax.Schedule:
  """Cosine decay restarted at every phase boundary."""
  steps = [int(s) for s in phase_steps]
  return optax.join_schedules([optax.cosine_decay_schedule(learning_rate, s) for s in steps],
                              [int(b) for b in np.cumsum(steps)[:-1]])


class OfaTools(NamedTuple):
  ec: models.ElasticConfig
  ps: tasks.ProgressiveShrinking
  grid: list
  ofa_tx: optax.GradientTransformation
  ofa_step: Callable
  alone_tx: optax.GradientTransformation
  alone_step: Callable
  apply: Callable
  total: int


def ofa_tools(env: Env) -> OfaTools:
  def build():
    o = env.c.ofa
    ec = elastic_config(o, env.train.images.shape[1:], env.train.num_classes)
    ps = shrinking(o, ec)
    total = int(sum(o.phase_steps))
    ofa_tx = optax.adam(phase_schedule(o.learning_rate, tuple(o.phase_steps)))
    ofa_step = step_lib.make_train_step(ofa_loss(ec, ps, kd_weight=o.kd_weight, temperature=o.temperature), ofa_tx,
                                        mesh=env.mesh, transition=step_lib.in_extra("shrink", lambda s, _: ps.update(s)))
    alone_tx = optax.adam(optax.cosine_decay_schedule(o.learning_rate, total))
    alone_step = step_lib.make_train_step(alone_loss(ec), alone_tx, mesh=env.mesh)
    return OfaTools(ec, ps, grid(o, ec), ofa_tx, ofa_step, alone_tx, alone_step, subnet_apply(ec), total)
  return env.get("ofa_tools", build)


def _grid_accuracy(env: Env, t: OfaTools, params: Any) -> dict[str, float]:
  return {name: accuracy(env, t.apply, {"net": params, "subnet": tuple(s)}) for name, s in t.grid}


def ofa_run(env: Env, seed: int) -> dict:
  """The OFA network of ``seed``: progressive shrinking, then every grid sub-network's test accuracy."""
  t = ofa_tools(env)

  def fn() -> dict:
    params = models.init_elastic(t.ec, jax.random.key(seed))
    state = _state(env, params, t.ofa_tx, seed, {"shrink": t.ps.init()})
    largest = lambda s: {"largest": accuracy(env, t.apply, {"net": s.params, "subnet": tuple(t.ps.largest())})}
    boundaries = set(t.ps.boundaries)

    def at_boundaries(ctx: loop.Context) -> None:   # the phases' ends: largest and smallest allowed
      if ctx.step in boundaries or ctx.step == t.total:   # (not again at the end of a resumed run)
        smallest = tuple(jax.device_get(t.ps.smallest(ctx.state.extra["shrink"]._replace(
            count=jnp.asarray(ctx.step - 1, jnp.int32)))))
        ctx.record.setdefault("phases", []).append({
            "step": ctx.step, **largest(ctx.state),
            "smallest_allowed": accuracy(env, t.apply, {"net": ctx.state.params, "subnet": smallest}),
            "metrics": common.scalars(ctx.out.metrics) if ctx.out is not None else {}})

    started = time.perf_counter()
    result = loop.run(t.ofa_step, state, tasks.StreamSource(env.train, seed), mesh=env.mesh,
                      batch_size=env.c.batch_size, num_steps=t.total, compile_cache=env.cache,
                      actions=((loop.Every(at=frozenset(boundaries | {t.total})), at_boundaries),))
    final = jax.device_get(result.state)
    return {"accuracy": _grid_accuracy(env, t, final.params), "phases": result.record.get("phases", []),
            "shrink_count": int(final.extra["shrink"].count), "steps": int(final.step),
            "train_seconds": result.train_seconds, "wall_seconds": time.perf_counter() - started,
            "compile_seconds": result.compile_seconds}

  return _once(env, "ofa", "ofa", seed, env.c.ofa.to_dict(), fn)


def alone_run(env: Env, name: str, subnet: tasks.Subnet, seed: int) -> dict:
  """Sub-network ``name`` trained alone (same initialisation, data order and number of steps as OFA)."""
  t = ofa_tools(env)

  def fn() -> dict:
    params = models.init_elastic(t.ec, jax.random.key(seed))
    state = _state(env, params, t.alone_tx, seed, {"subnet": subnet})
    result, cost = fit(env, t.alone_step, state, t.total, seed)
    acc = accuracy(env, t.apply, {"net": jax.device_get(result.state.params), "subnet": tuple(subnet)})
    return {"accuracy": acc, **cost}

  return _once(env, "ofa", f"alone_{name}", seed, env.c.ofa.to_dict(), fn)


def run_ofa(env: Env) -> dict:
  t = ofa_tools(env)
  macs = {name: float(models.elastic_flops(s, config=t.ec)) for name, s in t.grid}
  runs: dict[str, dict] = {"ofa": {}}
  for seed in common.seeds(env.c):
    out = ofa_run(env, seed)
    runs["ofa"][str(seed)] = out
    common.say(env.c, f"shrink: ofa seed {seed}: " + " ".join(f"{k}={v:.4f}" for k, v in out["accuracy"].items())
         + f" ({out['wall_seconds']:.0f} s)")
    for name, s in t.grid:
      r = alone_run(env, name, s, seed)
      runs.setdefault(f"alone_{name}", {})[str(seed)] = r
      common.say(env.c, f"shrink: alone {name} seed {seed}: {r['accuracy']:.4f} ({r['wall_seconds']:.0f} s)")
  full = float(models.elastic_flops(t.ps.largest(), config=t.ec))
  params = models.param_count(models.init_elastic(t.ec, jax.random.key(0)))
  return {"macs": macs, "full_macs": full, "params": params, "phases": list(t.ps.names),
          "boundaries": list(t.ps.boundaries), "total_steps": t.total, "runs": runs}


# --- part lapp: budgeted structured pruning --------------------------------------------------------------

def cnn_structure(p: ml_collections.ConfigDict, input_shape: tuple[int, ...], num_classes: int, seed: int = 0
                  ) -> tuple[models.Functional, transforms.Structure]:
  """The zoo cnn and its channel structure (``prox.models.structure_of``)."""
  net = models.functional(models.make_model("cnn", input_shape=tuple(input_shape), num_classes=num_classes, seed=seed,
                                            width=p.width, hidden=p.hidden))
  return net, models.structure_of("cnn", net.params, input_shape=tuple(input_shape))


def prefixed(structure: transforms.Structure, prefix: str) -> transforms.Structure:
  """The same structure for the tree ``{prefix: params, ...}`` (every axis path under ``prefix``)."""
  move = lambda axes: tuple(dataclasses.replace(a, path=(prefix, *a.path)) for a in axes)
  groups = tuple(dataclasses.replace(g, producers=move(g.producers), consumers=move(g.consumers), state=move(g.state))
                 for g in structure.groups)
  return dataclasses.replace(structure, groups=groups)


def lapp_loss(apply: Callable, structure: transforms.Structure, lp: transforms.LAPP, prune_steps: int, *,
              bypass: bool = False) -> Callable:
  """Before ``prune_steps``: ``CE(f(m * W)) + penalty(m)`` with LAPP's soft masks ``m`` (the thresholds
  are trained parameters); after: ``CE(f(W))`` (the weights are hard-masked by the optimizer state).
  With ``bypass``, ``f`` is ``apply(model, params["bypass"], model_state, x, train=...)`` (the cnn with
  LAPP's bypasses, never masked). Metrics: ``soft_flops``, the soft masks' MACs as a fraction of the dense
  network's (0 once hard; without the bypasses' MACs)."""
  dense = float(transforms.full_flops(structure))

  def loss_fn(params, model_state, batch, ctx):
    x, y = batch["image"], batch["label"]
    if bypass:
      net = lambda model, x: apply(model, params["bypass"], model_state, x, train=True)[0]
    else:
      net = lambda model, x: apply(model, model_state, x, train=True)[0]

    def soft():
      m = lp.masks(params["model"], params["thresholds"], ctx.step)
      logits = net(transforms.apply_channel_masks(structure, m, params["model"]), x)
      ce = _ce(logits, y)
      vary = 0.0 * ce   # (the batch-independent terms made varying over the data axis like the other branch's)
      penalty = lp.penalty(m, ctx.step) + vary
      return ce + penalty, (logits, penalty, transforms.masked_flops(structure, m) / dense + vary)

    def hard():
      logits = net(params["model"], x)
      ce = _ce(logits, y)
      return ce, (logits, 0.0 * ce, 0.0 * ce)   # penalty and soft_flops: 0 once the masks are hard

    loss, (logits, penalty, flops) = lax.cond(ctx.step < prune_steps, soft, hard)
    return loss, ({"loss": loss, "penalty": penalty, "soft_flops": flops,
                   "accuracy": jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))}, model_state)

  return loss_fn


def lapp_transition(structure: transforms.Structure, lp: transforms.LAPP, prune_steps: int) -> step_lib.Transition:
  """After the update of step ``prune_steps - 1``: LAPP's hard masks become the ``channel_pruning`` state's
  masks (and ``extra["lapp_masks"]``), and the weights are multiplied by them."""
  outer = prefixed(structure, "model")

  def transition(state: step_lib.TrainState, info: step_lib.StepInfo) -> step_lib.TrainState:
    def freeze(state):
      hard = lp.hard_masks(state.params["model"], state.params["thresholds"])
      opt = state.opt_state._replace(channel_masks=hard,
                                     masks=transforms.expand_channel_masks(outer, hard, state.params))
      model = transforms.apply_channel_masks(structure, hard, state.params["model"])
      return state._replace(params={**state.params, "model": model}, opt_state=opt,
                            extra={**state.extra, "lapp_masks": hard})
    return lax.cond(info.step == prune_steps - 1, freeze, lambda s: s, state)

  return transition


ARMS = ("dense", "magnitude", "lapp", "lapp_bypass")
BYPASS_GROUPS = ("conv1", "conv2", "dense")
PRUNED_ARMS = ARMS[1:]


def _half(n: int) -> int:
  return (n + 1) // 2   # a stride-2 SAME pooling


def bypass_shapes(model: Any, input_shape: tuple[int, ...]) -> dict[str, tuple[int, int, int]]:
  """``{group: (in_channels, out_channels, positions)}`` of LAPP's bypass around each channel group of the
  zoo cnn: from the group's producer's input to its consumer's output (see ``cnn_forward``)."""
  h, w, c = input_shape
  c1, c2 = model["conv1"]["kernel"].shape[-1], model["conv2"]["kernel"].shape[-1]
  hidden, classes = model["dense"]["kernel"].shape[1], model["head"]["kernel"].shape[1]
  h1, w1 = _half(h), _half(w)
  return {"conv1": (c, c2, h1 * w1), "conv2": (_half(h1) * _half(w1) * c1, hidden, 1),
          "dense": (_half(h1) * _half(w1) * c2, classes, 1)}


def bypass_macs(model: Any, input_shape: tuple[int, ...], groups: list[str]) -> int:
  """MACs per example of the bypasses of ``groups`` (``prox.transforms.bypass_flops``)."""
  shapes = bypass_shapes(model, input_shape)
  return sum(transforms.bypass_flops(*shapes[g]) for g in groups)


def cnn_forward(model: Any, bypass: dict, x: jax.Array) -> jax.Array:
  """The zoo cnn (conv-ReLU-pool twice, ReLU dense, head) with LAPP's bypasses ``{group: kernel}``
  (``prox.transforms.bypass_apply``) added to the pre-activations of the group's consumer:

  * ``conv1``: ``conv2(p1) + x[::2, ::2] W`` (a 1x1 conv from the image, strided like conv1's pooling);
  * ``conv2``: ``dense(flatten(p2)) + flatten(p1[::2, ::2]) W`` (conv2's input, subsampled to p2's grid);
  * ``dense``: ``head(h) + flatten(p2) W`` (the dense layer's input).
  Without bypasses it computes the zoo cnn's logits."""
  conv = lambda p, z: lax.conv_general_dilated(z, p["kernel"], (1, 1), "SAME",
                                               dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
  pool = lambda z: lax.reduce_window(z, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "SAME")
  p1 = pool(jax.nn.relu(conv(model["conv1"], x)))
  z2 = conv(model["conv2"], p1)
  if "conv1" in bypass:
    z2 = z2 + transforms.bypass_apply(bypass["conv1"], x, stride=2)
  p2 = pool(jax.nn.relu(z2))
  flat = p2.reshape(p2.shape[0], -1)
  z3 = flat @ model["dense"]["kernel"] + model["dense"]["bias"]
  if "conv2" in bypass:
    z3 = z3 + transforms.bypass_apply(bypass["conv2"], p1[:, ::2, ::2, :].reshape(p1.shape[0], -1))
  logits = jax.nn.relu(z3) @ model["head"]["kernel"] + model["head"]["bias"]
  if "dense" in bypass:
    logits = logits + transforms.bypass_apply(bypass["dense"], flat)
  return logits.astype(jnp.float32)


def bypass_apply(model: Any, bypass: dict, model_state: Any, x: jax.Array, *, train: bool = False):
  del train
  return cnn_forward(model, bypass, x), model_state


def lapp_run(env: Env, arm: str, removed: float | None, seed: int) -> dict:
  p = env.c.lapp
  shape, classes = env.train.images.shape[1:], env.train.num_classes
  net, structure = env.get("cnn", lambda: cnn_structure(p, shape, classes))
  outer = prefixed(structure, "model")
  dense = float(transforms.full_flops(structure))
  groups = common.names(env.c, "lapp.bypass", BYPASS_GROUPS) if arm == "lapp_bypass" else []
  extra_macs = bypass_macs(net.params, shape, groups)
  # the bypasses' MACs come out of the budget: the channels get 1 - removed - bypass / dense
  target = None if removed is None else 1.0 - removed - extra_macs / dense
  name = arm if removed is None else f"{arm}{round(100 * removed)}"
  if arm == "lapp_bypass":
    apply = env.get("cnn_bypass_apply", lambda: (lambda tree, ms, x, *, train=False: bypass_apply(
        tree["model"], tree["bypass"], ms, x)))
  else:
    apply = env.get("cnn_apply", lambda: (lambda tree, ms, x, *, train=False: net.apply(tree["model"], ms, x, train=train)))

  def build():
    adam = optax.adam(p.learning_rate)
    if arm == "dense":
      return adam, step_lib.make_train_step(
          lambda params, ms, batch, ctx: _plain_loss(apply, params, ms, batch), adam, mesh=env.mesh)
    if arm == "magnitude":
      tx = transforms.channel_pruning(adam, structure=outer, flops_target=target, start_step=0,
                                      end_step=p.prune_steps, frequency=p.frequency)
      return tx, step_lib.make_train_step(
          lambda params, ms, batch, ctx: _plain_loss(apply, params, ms, batch), tx, mesh=env.mesh)
    lp = transforms.lapp(structure, flops_target=target, end_step=p.prune_steps, temperature=tuple(p.temperature),
                         penalty_weight=p.penalty_weight)
    # the thresholds get their own Adam learning rate (they live on the scale of the scores, mean 1); the
    # bypass kernels train like the weights
    inner = optax.multi_transform({"model": adam, "thresholds": optax.adam(p.threshold_learning_rate),
                                   **({"bypass": adam} if groups else {})},
                                  lambda tree: {k: jax.tree.map(lambda _, k=k: k, v) for k, v in tree.items()})
    tx = transforms.channel_pruning(inner, structure=outer, flops_target=target, start_step=p.prune_steps,
                                    end_step=p.prune_steps + 1, frequency=1)
    loss = (lapp_loss(bypass_apply, structure, lp, p.prune_steps, bypass=True) if groups
            else lapp_loss(net.apply, structure, lp, p.prune_steps))
    return tx, step_lib.make_train_step(loss, tx, mesh=env.mesh,
                                        transition=lapp_transition(structure, lp, p.prune_steps))

  def fn() -> dict:
    tx, step = env.get(("lapp_step", name), build)
    model = models.functional(models.make_model("cnn", input_shape=shape, num_classes=classes, seed=seed,
                                                width=p.width, hidden=p.hidden)).params
    params, extra = {"model": model}, {}
    if arm in ("lapp", "lapp_bypass"):
      params["thresholds"] = {g.name: jnp.zeros([], jnp.float32) for g in structure.groups}
      extra = {"lapp_masks": transforms.full_channel_masks(structure)}
    shapes = bypass_shapes(model, shape)
    if groups:
      params["bypass"] = {g: transforms.bypass_init(*shapes[g][:2]) for g in groups}
    tree = lambda s: {"model": s.params["model"], **({"bypass": s.params["bypass"]} if groups else {})}
    state = _state(env, params, tx, seed, extra)
    result, cost = fit(env, step, state, p.num_steps, seed, every=p.eval_every,
                       evaluate=lambda s: {"accuracy": accuracy(env, apply, tree(s))})
    final = jax.device_get(result.state)
    out = {"accuracy": result.record["curve"][-1]["accuracy"], "curve": result.record["curve"], **cost}
    if arm != "dense":
      cm = {k: np.asarray(v) for k, v in final.opt_state.channel_masks.items()}
      out["flops_fraction"] = (float(transforms.masked_flops(structure, cm)) + extra_macs) / dense
      out["kept"] = {k: int(v.sum()) for k, v in cm.items()}
      out["params_kept"] = float(transforms.masked_param_count(structure, cm, final.params["model"]))
    if groups:
      out["bypass_flops_fraction"] = extra_macs / dense
      out["bypass_norm"] = {g: float(np.abs(np.asarray(final.params["bypass"][g])).sum()) for g in groups}
    if arm in ("lapp", "lapp_bypass"):
      own = {k: np.asarray(v) for k, v in final.extra["lapp_masks"].items()}
      out["lapp_flops_fraction"] = (float(transforms.masked_flops(structure, own)) + extra_macs) / dense
      out["lapp_kept"] = {k: int(v.sum()) for k, v in own.items()}
      out["thresholds"] = {k: float(v) for k, v in final.params["thresholds"].items()}
    return out

  # the fields the arm uses (the thresholds' learning rate only LAPP's)
  # (the arms and bypass fields came later: the arms before them keep their records' settings)
  settings = {k: v for k, v in p.to_dict().items()
              if k not in ("removed", "arms", "bypass") and (arm in ("lapp", "lapp_bypass") or k != "threshold_learning_rate")}
  if groups:
    settings["bypass"] = p.bypass
  return _once(env, "lapp", name, seed, {**settings, "removed": removed}, fn)


def _plain_loss(apply: Callable, params: Any, model_state: Any, batch: dict):
  logits, model_state = apply(params, model_state, batch["image"], train=True)
  ce = _ce(logits, batch["label"])
  return ce, ({"loss": ce, "accuracy": jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))},
              model_state)


def run_lapp(env: Env) -> dict:
  p = env.c.lapp
  _, structure = env.get("cnn", lambda: cnn_structure(p, env.train.images.shape[1:], env.train.num_classes))
  runs: dict[str, dict] = {}
  for seed in common.seeds(env.c):
    arms = common.distinct_names(env.c, "lapp.arms", PRUNED_ARMS)
    for arm, removed in [("dense", None)] + [(a, r) for r in p.removed for a in arms]:
      name = arm if removed is None else f"{arm}{round(100 * removed)}"
      r = lapp_run(env, arm, removed, seed)
      runs.setdefault(name, {})[str(seed)] = r
      common.say(env.c, f"shrink: lapp {name} seed {seed}: {r['accuracy']:.4f}"
           + (f" flops {r['flops_fraction']:.3f}" if "flops_fraction" in r else "") + f" ({r['wall_seconds']:.0f} s)")
  groups = {g.name: g.size for g in structure.groups}
  return {"full_macs": float(transforms.full_flops(structure)), "groups": groups, "removed": list(p.removed),
          "arms": common.distinct_names(env.c, "lapp.arms", PRUNED_ARMS), "runs": runs}


# --- part proard: adversarial elastic training, robust-gap student sampling -------------------------------

PROARD_ARMS = ("gap", "uniform")


def candidates(ec: models.ElasticConfig) -> list[tuple[str, tasks.Subnet]]:
  """Every uniform ``kernel:depth:width`` sub-network but the largest (the students), ascending in MACs."""
  out = []
  for k in ec.kernel_sizes:
    for d in range(1, max(ec.max_depths) + 1):
      for w in ec.width_fractions:
        if (k, d, w) != (ec.kernel_sizes[-1], max(ec.max_depths), ec.width_fractions[-1]):
          out.append((f"k{k}-d{d}-w{w:g}", uniform_subnet(ec, k, d, w)))
  return sorted(out, key=lambda e: float(models.elastic_flops(e[1], config=ec)))


def proard_loss(ec: models.ElasticConfig, table: tasks.Subnet, *, eps: float, clip: tuple[float, float],
                kd_weight: float, temperature: float) -> Callable:
  """The robust teacher (largest) and the student ``table[ctx.extra["student"]]``, each on FGSM examples
  against its own loss; KD from the teacher on the student's examples (see the module docstring).
  Metrics: the batch's robust accuracies ``robust_teacher`` / ``robust_student``."""
  largest = tasks.Subnet(np.full([len(ec.blocks)], len(ec.kernel_sizes) - 1, np.int32),
                         np.full([len(ec.blocks)], len(ec.width_fractions) - 1, np.int32),
                         np.asarray(ec.max_depths, np.int32))

  def loss_fn(params, model_state, batch, ctx):
    x, y = batch["image"], batch["label"]
    student = tasks.take_subnet(table, ctx.extra["student"])
    net = lambda s: (lambda p, x, y: _ce(models.elastic_apply(p, x, s, config=ec), y))
    fixed = _varying_like(params, x)   # the attacks differentiate in x only (see _varying_like)
    x_t = robust.fgsm(net(largest), fixed, x, y, eps=eps, clip=clip)
    x_s = robust.fgsm(net(student), fixed, x, y, eps=eps, clip=clip)
    z_t = models.elastic_apply(params, x_t, largest, config=ec)
    z_s = models.elastic_apply(params, x_s, student, config=ec)
    target = jax.nn.softmax(lax.stop_gradient(models.elastic_apply(params, x_s, largest, config=ec)) / temperature)
    kd = jnp.mean(jnp.sum(target * (jnp.log(target + 1e-20) - jax.nn.log_softmax(z_s / temperature)), -1))
    ce_t, ce_s = _ce(z_t, y), _ce(z_s, y)
    loss = ce_t + ce_s + kd_weight * temperature ** 2 * kd
    hit = lambda z: jnp.mean((jnp.argmax(z, -1) == y).astype(jnp.float32))
    return loss, ({"ce_teacher": ce_t, "ce_student": ce_s, "kd": kd, "robust_teacher": hit(z_t),
                   "robust_student": hit(z_s)}, model_state)

  return loss_fn


def _varying_like(tree: Any, x: jax.Array) -> Any:
  """``tree`` cast to vary over the mesh axes ``x`` varies over (inside the step's ``shard_map``), so that
  an input gradient through a custom VJP (the elastic depthwise conv) type-checks; a no-op outside."""
  axes = tuple(jax.typeof(x).manual_axis_type.varying)

  def cast(a):
    missing = tuple(ax for ax in axes if ax not in jax.typeof(a).manual_axis_type.varying)
    return lax.pcast(a, missing, to="varying") if missing else a

  return jax.tree.map(cast, tree)


def proard_transition(sampler: tasks.RobustGapSampler, num: int, arm: str) -> step_lib.Transition:
  """Updates the gap of the step's student from its metrics, then draws the next step's student:
  ``sampler.sample`` (arm ``gap``) or uniformly (arm ``uniform``); counts the draws per candidate."""

  def transition(state: step_lib.TrainState, info: step_lib.StepInfo) -> step_lib.TrainState:
    extra = state.extra
    gaps = sampler.update(extra["gaps"], extra["student"], info.metrics["robust_teacher"],
                          info.metrics["robust_student"])
    if arm == "gap":
      nxt = sampler.sample(gaps, info.rng, 1)[0]
    else:
      nxt = jax.random.randint(info.rng, [], 0, num, jnp.int32)
    return state._replace(extra={**extra, "gaps": gaps, "student": nxt,
                                 "draws": extra["draws"].at[nxt].add(1)})

  return transition


def robust_evaluator(ec: models.ElasticConfig, *, eps: float, steps: int, clip: tuple[float, float]) -> Callable:
  """``(params, subnet, x, y, key) -> (clean correct, PGD-robust correct)`` counts, jitted once."""

  @jax.jit
  def evaluate(params, subnet, x, y, key):
    s = tasks.Subnet(*subnet)
    loss = lambda p, x, y: _ce(models.elastic_apply(p, x, s, config=ec), y)
    x_adv = robust.pgd(loss, params, x, y, key, eps=eps, step_size=eps / 4, steps=steps, clip=clip)
    hit = lambda xx: jnp.sum(jnp.argmax(models.elastic_apply(params, xx, s, config=ec), -1) == y)
    return hit(x), hit(x_adv)

  return evaluate


class ProardTools(NamedTuple):
  ec: models.ElasticConfig
  names: list
  table: tasks.Subnet
  sampler: tasks.RobustGapSampler
  tx: optax.GradientTransformation
  steps: dict
  evaluate: Callable
  clip: tuple


def proard_tools(env: Env) -> ProardTools:
  def build():
    c, o = env.c.proard, env.c.ofa
    ec = elastic_config(o, env.train.images.shape[1:], env.train.num_classes)
    cands = candidates(ec)
    table = tasks.stack_subnets([s for _, s in cands])
    clip = (float(env.train.images.min()), float(env.train.images.max()))
    sampler = tasks.robust_gap_sampler(len(cands), temperature=c.temperature, momentum=c.momentum)
    tx = optax.adam(optax.cosine_decay_schedule(c.learning_rate, c.num_steps))
    loss = proard_loss(ec, table, eps=c.eps, clip=clip, kd_weight=c.kd_weight, temperature=c.kd_temperature)
    steps = {arm: step_lib.make_train_step(loss, tx, mesh=env.mesh,
                                           transition=proard_transition(sampler, len(cands), arm))
             for arm in PROARD_ARMS}
    evaluate = robust_evaluator(ec, eps=c.eps, steps=c.eval_pgd_steps, clip=clip)
    return ProardTools(ec, [n for n, _ in cands], table, sampler, tx, steps, evaluate, clip)
  return env.get("proard_tools", build)


def proard_run(env: Env, arm: str, seed: int) -> dict:
  t = proard_tools(env)
  c = env.c.proard

  def fn() -> dict:
    params = models.init_elastic(t.ec, jax.random.key(seed))
    extra = {"gaps": t.sampler.init(), "student": np.int32(0), "draws": np.zeros(len(t.names), np.int32)}
    state = _state(env, params, t.tx, seed, extra)
    result, cost = fit(env, t.steps[arm], state, c.num_steps, seed)
    final = jax.device_get(result.state)
    x, y = env.test.images, env.test.labels
    clean, rob = {}, {}
    for name, s in grid(env.c.ofa, t.ec):
      hits = jax.device_get(t.evaluate(final.params, tuple(s), x, y, jax.random.key(seed)))
      clean[name], rob[name] = float(hits[0]) / len(y), float(hits[1]) / len(y)
    return {"clean": clean, "robust": rob, "gaps": dict(zip(t.names, np.asarray(final.extra["gaps"].gaps).tolist())),
            "draws": dict(zip(t.names, np.asarray(final.extra["draws"]).tolist())), **cost}

  settings = {"proard": c.to_dict(), "ofa": {k: v for k, v in env.c.ofa.to_dict().items()
                                               if k not in ("phase_steps", "learning_rate", "kd_weight", "temperature")}}
  return _once(env, "proard", arm, seed, settings, fn)


def run_proard(env: Env) -> dict:
  t = proard_tools(env)
  arms = common.distinct_names(env.c, "proard.arms", PROARD_ARMS)
  runs: dict[str, dict] = {}
  for seed in common.seeds(env.c):
    for arm in arms:
      r = proard_run(env, arm, seed)
      runs.setdefault(arm, {})[str(seed)] = r
      common.say(env.c, f"shrink: proard {arm} seed {seed}: robust " + " ".join(f"{k}={v:.3f}" for k, v in r["robust"].items())
           + f" ({r['wall_seconds']:.0f} s)")
  macs = {name: float(models.elastic_flops(s, config=t.ec)) for name, s in grid(env.c.ofa, t.ec)}
  return {"macs": macs, "candidates": t.names, "arms": arms, "runs": runs}


# --- part lightweight: dual-input/dual-output sub-models, unified, fine-tuned with progressive unfreezing ---

LIGHT_ARMS = ("dual", "single")
CNN_LAYERS = ("head", "dense", "conv2", "conv1")   # the zoo cnn's layers, output first
# the identity warp of ``data.next_stream_batch``: the stream's source images themselves
IDENTITY = {"max_shift": 0.0, "max_rotation": 0.0, "scale_range": (1.0, 1.0), "noise_std": 0.0}


class PairSource:
  """The augmented digits stream with each sample's original image: batches ``{"image": original,
  "augmented": warped, "label"}``. Two ``StreamSource``s of one seed draw the same source images in the
  same order (a sample depends only on ``(seed, position)``), one with the identity warp."""

  def __init__(self, ds: data_lib.ArrayDataset, seed: int):
    self.original = tasks.StreamSource(ds, seed, **IDENTITY)
    self.augmented = tasks.StreamSource(ds, seed)

  def next(self, batch_size: int, context: Any = None) -> tasks.Batch:
    o, a = self.original.next(batch_size), self.augmented.next(batch_size)
    return tasks.Batch({"image": o.data["image"], "augmented": a.data["image"], "label": a.data["label"]})

  def get_state(self) -> dict:
    return {"original": self.original.get_state(), "augmented": self.augmented.get_state()}

  def set_state(self, state: dict) -> None:
    self.original.set_state(state["original"])
    self.augmented.set_state(state["augmented"])


def stream_from(ds: data_lib.ArrayDataset, seed: int, position: int) -> tasks.StreamSource:
  """The augmented stream of ``seed`` from sample ``position`` on (the fine-tuning continues the data)."""
  source = tasks.StreamSource(ds, seed)
  source.set_state({**source.get_state(), "position": int(position)})
  return source


def unfreeze_groups(lw: ml_collections.ConfigDict) -> list[str]:
  """``lightweight.unfreeze`` as leaf-path regexes of the zoo cnn (``"head"`` -> ``"^head/"``), head first."""
  return [f"^{name}/" for name in lw.unfreeze.split(",")]


def dual_loss(apply: Callable) -> Callable:
  """``CE(f_o(x), y) + CE(f_a(aug(x)), y)`` of the two sub-models ``params = {"original", "augmented"}``
  (``prox.robust.dual_io_loss`` over ``prox.robust.pair_apply``); the zoo cnn has no model state."""
  pair = robust.pair_apply(lambda p, x: apply(p, {}, x, train=True)[0])

  def loss_fn(params, model_state, batch, ctx):
    loss, ce = robust.dual_io_loss(pair, params, batch["image"], batch["augmented"], batch["label"])
    return loss, ({"loss": loss, "ce_original": ce["original"], "ce_augmented": ce["augmented"]}, model_state)

  return loss_fn


class LightTools(NamedTuple):
  net: models.Functional
  apply: Callable
  dual_tx: optax.GradientTransformation
  dual_step: Callable
  finetune_tx: optax.GradientTransformation
  single_tx: optax.GradientTransformation
  plain_step: Callable
  finetune_step: Callable


def light_tools(env: Env) -> LightTools:
  def build():
    lw = env.c.lightweight
    net = models.functional(models.make_model("cnn", input_shape=env.train.images.shape[1:],
                                              num_classes=env.train.num_classes, seed=0, width=lw.width,
                                              hidden=lw.hidden))
    apply = lambda params, ms, x, *, train=False: net.apply(params, ms, x, train=train)
    dual_tx = optax.adam(lw.learning_rate)
    groups = unfreeze_groups(lw)
    finetune_tx = transforms.progressive_unfreezing(optax.adam(lw.finetune_learning_rate), groups,
                                                    interval=lw.finetune_steps // len(groups))
    plain = lambda params, ms, batch, ctx: _plain_loss(apply, params, ms, batch)
    single_tx = optax.adam(lw.learning_rate)
    return LightTools(net, apply, dual_tx, step_lib.make_train_step(dual_loss(net.apply), dual_tx, mesh=env.mesh),
                      finetune_tx, single_tx, step_lib.make_train_step(plain, single_tx, mesh=env.mesh),
                      step_lib.make_train_step(plain, finetune_tx, mesh=env.mesh))
  return env.get("light_tools", build)


def light_run(env: Env, arm: str, seed: int) -> dict:
  """Arm ``dual``: the two sub-models (both from the seed's initialisation) trained together for
  ``dual_steps`` steps, unified, then fine-tuned with progressive unfreezing for ``finetune_steps`` steps
  on the augmented stream from where the dual phase left it. Arm ``single``: the same cnn and
  initialisation on the augmented stream for ``dual_steps + finetune_steps`` steps."""
  lw = env.c.lightweight
  t = light_tools(env)
  total = lw.dual_steps + lw.finetune_steps
  acc = lambda params: accuracy(env, t.apply, params)

  def fn() -> dict:
    init = models.functional(models.make_model("cnn", input_shape=env.train.images.shape[1:],
                                               num_classes=env.train.num_classes, seed=seed, width=lw.width,
                                               hidden=lw.hidden)).params
    if arm == "single":
      state = _state(env, init, t.single_tx, seed)
      result, cost = fit(env, t.plain_step, state, total, seed, every=lw.eval_every,
                         evaluate=lambda s: {"accuracy": acc(s.params)})
      return {"accuracy": result.record["curve"][-1]["accuracy"], "curve": result.record["curve"], **cost}
    state = _state(env, {"original": init, "augmented": init}, t.dual_tx, seed)
    dual, dual_cost = fit(env, t.dual_step, state, lw.dual_steps, seed, source=PairSource(env.train, seed))
    pair = jax.device_get(dual.state.params)
    unified = robust.unify_submodels(pair, weight=lw.weight)
    state = _state(env, unified, t.finetune_tx, seed)
    tuned, cost = fit(env, t.finetune_step, state, lw.finetune_steps, seed, every=lw.eval_every,
                      evaluate=lambda s: {"accuracy": acc(s.params)},
                      source=stream_from(env.train, seed, lw.dual_steps * env.c.batch_size))
    return {"accuracy": tuned.record["curve"][-1]["accuracy"], "curve": tuned.record["curve"],
            "original": acc(pair["original"]), "augmented": acc(pair["augmented"]), "unified": acc(unified),
            "dual": dual_cost, **cost,
            "train_seconds": dual_cost["train_seconds"] + cost["train_seconds"],
            "wall_seconds": dual_cost["wall_seconds"] + cost["wall_seconds"]}

  return _once(env, "lightweight", arm, seed, {**lw.to_dict(), "total_steps": total}, fn)


def run_lightweight(env: Env) -> dict:
  lw = env.c.lightweight
  t = light_tools(env)
  runs: dict[str, dict] = {}
  for seed in common.seeds(env.c):
    for arm in LIGHT_ARMS:
      r = light_run(env, arm, seed)
      runs.setdefault(arm, {})[str(seed)] = r
      more = (f" (sub-models {r['original']:.4f}/{r['augmented']:.4f}, unified {r['unified']:.4f})"
              if arm == "dual" else "")
      common.say(env.c, f"shrink: lightweight {arm} seed {seed}: {r['accuracy']:.4f}{more} ({r['wall_seconds']:.0f} s)")
  structure = models.structure_of("cnn", t.net.params, input_shape=tuple(env.train.images.shape[1:]))
  return {"params": models.param_count(t.net.params), "macs": float(transforms.full_flops(structure)),
          "total_steps": lw.dual_steps + lw.finetune_steps, "groups": lw.unfreeze.split(","), "runs": runs}


# --- part fedtiny: federated pruning, clients as a vmapped axis --------------------------------------------

FED_ARMS = ("fedtiny", "server", "select")
DIGITS_TRAIN_ROWS = 1347   # len(load("digits", "train")): validate checks the client split before loading data
FED_LAYERS = ("conv1", "conv2", "dense", "head")   # the pruned kernels (biases stay dense); sorted = leaf order


def client_split(labels: np.ndarray, num_clients: int, shards: int, seed: int) -> np.ndarray:
  """``[N, n]`` row indices: a label-sorted split into ``N * shards`` equal shards, ``shards`` random ones per
  client (McMahan et al. 2017's pathological non-IID split); rows past ``N * shards * n`` are unused."""
  order = np.argsort(labels, kind="stable")
  size = len(labels) // (num_clients * shards)
  pieces = order[:num_clients * shards * size].reshape(num_clients * shards, size)
  perm = np.random.default_rng([int(seed), 7]).permutation(num_clients * shards)
  return pieces[perm].reshape(num_clients, shards * size)


class ClientSource:
  """One batch row-block per client: ``b = batch_size / N`` rows drawn without replacement from each client's
  own rows (``rows``, ``[N, n]``), client-major; the draw depends only on ``(seed, position)``."""

  def __init__(self, ds: data_lib.ArrayDataset, rows: np.ndarray, seed: int):
    self.ds, self.rows, self.seed, self.position = ds, rows, int(seed), 0

  def next(self, batch_size: int, context: Any = None) -> tasks.Batch:
    n, size = self.rows.shape
    b = batch_size // n
    rng = np.random.default_rng([self.seed, self.position])
    pick = np.stack([self.rows[i, rng.choice(size, b, replace=False)] for i in range(n)]).reshape(-1)
    self.position += 1
    return tasks.Batch({"image": self.ds.images[pick], "label": self.ds.labels[pick].astype(np.int32)})

  def get_state(self) -> dict:
    return {"seed": self.seed, "position": self.position}

  def set_state(self, state: dict) -> None:
    self.seed, self.position = int(state["seed"]), int(state["position"])


def _masked(params: Any, masks: dict) -> Any:
  """``params`` (any leading axes) with each pruned kernel's pruned entries set to 0."""
  return {k: ({**v, "kernel": jnp.where(masks[k], v["kernel"], 0.0)} if k in masks else v) for k, v in params.items()}


def fed_loss(num_clients: int) -> Callable:
  """``sum_i CE_i``: client ``i``'s parameters ``params[i]`` on its rows of the client-major batch (vmapped),
  so the gradient of client ``i``'s parameters is its own local gradient.

  The clients are spread over the mesh's data axis: the step splits the client-major batch over its ``D``
  devices, so device ``d`` holds the rows of clients ``[d L, (d + 1) L)``, ``L = N / D``, and computes only
  their losses, with their slice of the (replicated) stacked parameters; it returns ``D`` times their sum,
  because the step averages the devices' gradients and each client's gradient comes from one device."""

  def loss_fn(params, model_state, batch, ctx):
    devices = lax.axis_size(step_lib.DATA_AXIS)
    local = num_clients // devices
    mine = lambda p: lax.dynamic_slice_in_dim(p, lax.axis_index(step_lib.DATA_AXIS) * local, local)
    x = batch["image"].reshape(local, -1, *batch["image"].shape[1:])
    y = batch["label"].reshape(local, -1)
    logits = jax.vmap(lambda p, xi: cnn_forward(p, {}, xi))(jax.tree.map(mine, params), x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(axis=1)
    hit = (jnp.argmax(logits, -1) == y).astype(jnp.float32).mean()
    return devices * jnp.sum(ce), ({"loss": jnp.mean(ce), "accuracy": hit}, model_state)

  return loss_fn


def fed_transition(arm: str, *, local_steps: int, alpha: float, prune_rounds: int) -> step_lib.Transition:
  """After every local step: the weights re-masked (``extra["masks"]``) and, for FedTiny, each client's
  top-K buffer of every layer (``extra["topk"]``, ``[N, K]``) fed its own gradient
  (``prox.transforms.topk_accumulate`` vmapped over clients). After every ``local_steps``-th step (a round
  ``r``): FedAvg (the clients' mean, equal weights: equal shard sizes) sent back to every client, and for
  FedTiny in rounds ``r < prune_rounds``: layer ``r mod L`` grows the ``n_r`` pruned weights of largest
  summed buffered gradient and prunes as many of its smallest active ones (``grow_and_prune``,
  ``n_r = adjust_count(r)``); the buffers restart empty."""

  def transition(state: step_lib.TrainState, info: step_lib.StepInfo) -> step_lib.TrainState:
    extra = dict(state.extra)
    masks = extra["masks"]
    params = _masked(state.params, masks)
    if arm == "fedtiny":
      extra["topk"] = {k: jax.vmap(transforms.topk_accumulate, in_axes=(0, 0, None))(
          extra["topk"][k], info.grads[k]["kernel"], masks[k]) for k in FED_LAYERS}
    end = (info.step + 1) % local_steps == 0

    def server(params, extra):
      avg = jax.tree.map(lambda p: jnp.broadcast_to(jnp.mean(p, axis=0), p.shape), params)
      if arm != "fedtiny":
        return avg, extra
      r = (info.step + 1) // local_steps - 1
      new_masks = {}
      for i, k in enumerate(FED_LAYERS):
        n = transforms.adjust_count(r, alpha=alpha, end_round=prune_rounds,
                                    num_active=jnp.sum(masks[k]).astype(jnp.int32))
        grown = transforms.grow_and_prune(avg[k]["kernel"][0], masks[k], extra["topk"][k], n)
        new_masks[k] = jnp.where(r % len(FED_LAYERS) == i, grown, masks[k])
      changed = sum(jnp.sum(new_masks[k] & ~masks[k]) for k in FED_LAYERS).astype(jnp.int32)
      empty = jax.tree.map(lambda b: jnp.full_like(b, -1) if b.dtype == jnp.int32 else jnp.zeros_like(b),
                           extra["topk"])
      return _masked(avg, new_masks), {**extra, "masks": new_masks, "topk": empty,
                                       "grown": extra["grown"] + changed}

    params, extra = lax.cond(end, server, lambda p, e: (p, e), params, extra)
    return state._replace(params=params, extra=extra)

  return transition


def fed_candidates(f: ml_collections.ConfigDict, kernels: dict, seed: int) -> tuple[np.ndarray, dict]:
  """``[K, L]`` per-layer densities (row 0 uniform) and their ``[K]``-stacked magnitude masks."""
  sizes = [int(v.size) for v in jax.tree.leaves(kernels)]
  dens = transforms.random_layer_densities(jax.random.key(seed + 1000), sizes, f.density, f.candidates,
                                           spread=f.spread)
  masks = jax.vmap(lambda d: transforms.magnitude_masks(kernels, d))(jnp.asarray(dens, jnp.float32))
  return dens, masks


def select_candidate(f: ml_collections.ConfigDict, model: dict, candidate_masks: dict, x: np.ndarray, y: np.ndarray
                     ) -> tuple[int, np.ndarray]:
  """FedTiny's selection among the candidates on one batch per client (``x`` ``[N, b, ...]``). The zoo cnn
  has no batch norm, so there are no statistics to recalibrate (``stats_fn`` returns nothing): each client
  evaluates each candidate's loss on its batch and the server takes the clients' mean."""
  kernels = {k: model[k]["kernel"] for k in FED_LAYERS}

  def loss_fn(masked, stats, xi, yi):
    full = {k: {**model[k], "kernel": masked[k]} for k in FED_LAYERS}
    return optax.softmax_cross_entropy_with_integer_labels(cnn_forward(full, {}, xi), yi).mean()

  k, losses, _ = transforms.adaptive_bn_selection(kernels, candidate_masks, jnp.asarray(x), jnp.asarray(y),
                                                  stats_fn=lambda p, xi: jnp.zeros([]), loss_fn=loss_fn)
  return int(k), np.asarray(losses)


class FedTools(NamedTuple):
  tx: optax.GradientTransformation
  steps: dict
  apply: Callable


def fed_tools(env: Env) -> FedTools:
  def build():
    f = env.c.fedtiny
    tx = optax.sgd(f.learning_rate)
    steps = {arm: step_lib.make_train_step(fed_loss(f.num_clients), tx, mesh=env.mesh, transition=fed_transition(
        arm, local_steps=f.local_steps, alpha=f.alpha, prune_rounds=f.prune_rounds)) for arm in FED_ARMS}
    apply = lambda tree, ms, x, *, train=False: (cnn_forward(tree, {}, x), ms)
    return FedTools(tx, steps, apply)
  return env.get("fed_tools", build)


def fed_run(env: Env, arm: str, seed: int) -> dict:
  """Arm ``fedtiny``: the selected coarse candidate, then progressive layer-wise grow-and-prune during the
  first ``prune_rounds`` rounds; arm ``server``: the uniform magnitude masks of the same density (the
  candidates' row 0) fixed, FedAvg only. Same initialisation, split and local batches per seed."""
  f = env.c.fedtiny
  t = fed_tools(env)

  def fn() -> dict:
    model = models.functional(models.make_model("cnn", input_shape=env.train.images.shape[1:],
                                                num_classes=env.train.num_classes, seed=seed, width=f.width,
                                                hidden=f.hidden)).params
    kernels = {k: model[k]["kernel"] for k in FED_LAYERS}
    rows = client_split(np.asarray(env.train.labels), f.num_clients, f.shards_per_client, seed)
    dens, cands = fed_candidates(f, kernels, seed)
    out: dict[str, Any] = {}
    if arm in ("fedtiny", "select"):
      sel = rows[:, :f.select_batch]
      chosen, losses = select_candidate(f, model, cands, env.train.images[sel], env.train.labels[sel])
      out.update(selected=chosen, candidate_losses=losses.tolist())
    else:
      chosen = 0
    masks = {k: np.asarray(v[chosen]) for k, v in cands.items()}
    out["candidate_densities"] = dict(zip(FED_LAYERS, np.asarray(dens[chosen]).tolist()))
    stacked = jax.tree.map(lambda a: np.broadcast_to(a, (f.num_clients, *a.shape)).copy(), _masked(model, masks))
    extra = {"masks": masks, "grown": np.int32(0),
             "topk": {k: jax.tree.map(lambda a: np.broadcast_to(a, (f.num_clients, *a.shape)).copy(),
                                      transforms.topk_init(f.topk)) for k in FED_LAYERS}}
    state = _state(env, stacked, t.tx, seed, extra)
    server = lambda s: jax.tree.map(lambda a: a[0], s.params)

    def log(ctx: loop.Context) -> None:
      ctx.record.setdefault("curve", []).append(
          {"round": ctx.step // f.local_steps, "accuracy": accuracy(env, t.apply, server(ctx.state))})

    started = time.perf_counter()
    result = loop.run(t.steps[arm], state, ClientSource(env.train, rows, seed), mesh=env.mesh,
                      batch_size=f.num_clients * f.client_batch, num_steps=f.rounds * f.local_steps,
                      compile_cache=env.cache,
                      actions=((loop.Every(steps=f.eval_every * f.local_steps, end=True), log),))
    final = jax.device_get(result.state)
    m = {k: np.asarray(v) for k, v in final.extra["masks"].items()}
    total = sum(v.size for v in m.values())
    out.update(accuracy=result.record["curve"][-1]["accuracy"], curve=result.record["curve"],
               density=float(sum(v.sum() for v in m.values()) / total),
               layer_density={k: float(v.mean()) for k, v in m.items()},
               grown=int(final.extra["grown"]),
               clients_equal=bool(all(np.array_equal(a[0], a[-1]) for a in jax.tree.leaves(final.params))),
               steps=int(final.step), train_seconds=result.train_seconds,
               wall_seconds=time.perf_counter() - started, compile_seconds=result.compile_seconds)
    return out

  settings = {k: v for k, v in env.c.fedtiny.to_dict().items() if k != "arms"}   # (arms came later)
  return _once(env, "fedtiny", arm, seed, settings, fn)


def run_fedtiny(env: Env) -> dict:
  f = env.c.fedtiny
  runs: dict[str, dict] = {}
  arms = common.distinct_names(env.c, "fedtiny.arms", FED_ARMS)
  for seed in common.seeds(env.c):
    for arm in arms:
      r = fed_run(env, arm, seed)
      runs.setdefault(arm, {})[str(seed)] = r
      common.say(env.c, f"shrink: fedtiny {arm} seed {seed}: {r['accuracy']:.4f} density {r['density']:.4f}"
                 + (f" (candidate {r['selected']}, {r['grown']} grown)" if "selected" in r else "")
                 + f" ({r['wall_seconds']:.0f} s)")
  return {"layers": list(FED_LAYERS), "arms": arms, "runs": runs}


# --- entry point -----------------------------------------------------------------------------------------

RUNNERS = {"ofa": run_ofa, "lapp": run_lapp, "proard": run_proard, "lightweight": run_lightweight, "fedtiny": run_fedtiny}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the selected parts (finished runs are read back), then writes results.md/json and the plots."""
  validate(config, workdir)
  try:
    train, test = (data_lib.load(config.dataset, split, data_dir=config.get("data_dir") or None)
                   for split in ("train", "test"))
  except (ValueError, FileNotFoundError) as e:
    raise common.ConfigError(str(e)) from None
  env = Env(config, workdir, step_lib.data_mesh(), train, test, loop.CompileCache(), {})
  started = time.perf_counter()
  results, seconds, trained, read_back = common.run_parts(workdir, parts(config), lambda part: RUNNERS[part](env))
  total = time.perf_counter() - started
  effects = expected_effects(config, results)
  md = markdown(config, results, effects, seconds, trained, read_back)
  report.write_results(workdir, {"config": config, "seconds": total, "part_seconds": seconds,
                                 "runs_trained": trained, "runs_read_back": read_back,
                                 "expected_effects": effects, "results": results}, md, figures(results))
  common.say(config, f"shrink: {trained} runs trained, {read_back} read back ({total:.0f} s); results.md in {workdir}")
  headline: dict[str, Any] = {"seconds": total, "runs_trained": trained, "runs_read_back": read_back}
  for e in effects:
    headline[f"{e['name']}_diff"] = e["comparison"]["diff_mean"]
    headline[f"{e['name']}_held"] = e["held"]
  return headline


# --- report ------------------------------------------------------------------------------------------------

def _per_seed(by_seed: dict, get: Callable[[dict], float]) -> dict[str, float]:
  return {seed: float(get(r)) for seed, r in by_seed.items()}


def expected_effects(config: ml_collections.ConfigDict, results: dict) -> list[dict]:
  """``within 1 point``: held when ``|mean paired difference| <= 0.01``; ``above``: held when the paired
  95% interval lies above 0 (``paired_comparison``'s ``better``)."""
  out = []
  if "ofa" in results:
    runs = results["ofa"]["runs"]
    for name in results["ofa"]["macs"]:
      comp = report.paired_comparison(_per_seed(runs["ofa"], lambda r, n=name: r["accuracy"][n]),
                                      _per_seed(runs[f"alone_{name}"], lambda r: r["accuracy"]))
      out.append({"name": f"ofa_{name}", "effect": f"OFA sub-network {name} within 1 point of it trained alone",
                  "comparison": comp, "held": abs(comp["diff_mean"]) <= 0.01,
                  "ci_inside": -0.01 <= comp["ci95"][0] and comp["ci95"][1] <= 0.01})
  if "lapp" in results:
    runs = results["lapp"]["runs"]
    for removed in results["lapp"]["removed"]:
      r = round(100 * removed)
      if f"lapp{r}" not in runs or f"magnitude{r}" not in runs:
        continue
      comp = report.paired_comparison(_per_seed(runs[f"lapp{r}"], lambda x: x["accuracy"]),
                                      _per_seed(runs[f"magnitude{r}"], lambda x: x["accuracy"]))
      out.append({"name": f"lapp{r}", "effect": f"LAPP above magnitude (uniform) pruning at {r}% of the MACs removed",
                  "comparison": comp, "held": comp["verdict"] == "better"})
      if f"lapp_bypass{r}" in runs:
        comp = report.paired_comparison(_per_seed(runs[f"lapp_bypass{r}"], lambda x: x["accuracy"]),
                                        _per_seed(runs[f"lapp{r}"], lambda x: x["accuracy"]))
        out.append({"name": f"lapp_bypass{r}", "effect": f"LAPP with bypass above LAPP without at {r}% of the MACs "
                    "removed", "comparison": comp, "held": comp["verdict"] == "better"})
  if "proard" in results and set(PROARD_ARMS) <= set(results["proard"]["runs"]):
    runs = results["proard"]["runs"]
    mean_robust = lambda r: float(np.mean(list(r["robust"].values())))
    comp = report.paired_comparison(_per_seed(runs["gap"], mean_robust), _per_seed(runs["uniform"], mean_robust))
    out.append({"name": "proard", "effect": "robust-gap sampling above uniform sampling in robust accuracy (mean "
                "over the grid)", "comparison": comp, "held": comp["verdict"] == "better"})
  if "fedtiny" in results and {"fedtiny", "server"} <= set(results["fedtiny"]["runs"]):
    runs = results["fedtiny"]["runs"]
    comp = report.paired_comparison(_per_seed(runs["fedtiny"], lambda r: r["accuracy"]),
                                    _per_seed(runs["server"], lambda r: r["accuracy"]))
    out.append({"name": "fedtiny", "effect": "FedTiny above magnitude pruning once at the server (equal density "
                "and rounds)", "comparison": comp, "held": comp["verdict"] == "better"})
  if "lightweight" in results:
    runs = results["lightweight"]["runs"]
    comp = report.paired_comparison(_per_seed(runs["dual"], lambda r: r["accuracy"]),
                                    _per_seed(runs["single"], lambda r: r["accuracy"]))
    out.append({"name": "lightweight", "effect": "unified + fine-tuned dual-input/dual-output cnn at or above the "
                "single cnn (same steps)", "comparison": comp,
                "held": comp["diff_mean"] >= 0 and comp["verdict"] != "worse"})
  return out


def _pct(values) -> str:
  values = list(values.values()) if isinstance(values, dict) else list(values)
  return report.fmt_mean_std(values, percent=True, digits=1) if values else "n/a"


def _diff(comp: dict) -> tuple[str, str]:
  lo, hi = comp["ci95"]
  fmt = lambda v: f"{100 * v:+.2f}" if np.isfinite(v) else ("-inf" if v < 0 else "inf")
  return f"{100 * comp['diff_mean']:+.2f}", f"[{fmt(lo)}, {fmt(hi)}]"


def markdown(config: ml_collections.ConfigDict, results: dict, effects: list[dict], seconds: dict,
             trained: int, read_back: int) -> str:
  seeds = common.seeds(config)
  lines = ["# shrink: elastic networks (Once-for-All), budgeted structured pruning (LAPP), lightweight CNNs and "
           "federated pruning (FedTiny)", "",
           f"Digits (8x8), seeds {', '.join(map(str, seeds))}; every cell is the mean ± std over seeds of the test "
           "accuracy (%), every comparison is paired by seed (same initialisation and data order): mean "
           "difference in points, Student-t 95% interval. "
           f"This invocation: {trained} runs trained, {read_back} read back, wall seconds per part "
           + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
           + f"; the runs' own wall seconds, summed: {common.run_seconds(results):.0f}. Parts shown: "
           + ", ".join(results) + " (the default config runs ofa and lapp; proard, lightweight and fedtiny run "
           "with `--config.parts=<part>` in the same workdir, and a later invocation naming every part reads all "
           "finished runs back).", "",
           "## Expected effects (fixed before any run, except the lightweight one: chosen before its run, written down after it; see README.md)", "",
           "Criteria: *within 1 point*: |mean paired difference| <= 1 point (notes: whether the 95% interval also "
           "lies inside ±1); *above*: the paired 95% interval lies above 0; *at or above*: the mean paired difference "
           "is >= 0 and the interval does not lie below 0.", ""]
  rows = []
  for e in effects:
    comp = e["comparison"]
    diff, ci = _diff(comp)
    note = f"CI inside ±1: {'yes' if e['ci_inside'] else 'no'}" if "ci_inside" in e else ""
    rows.append([e["effect"], diff, ci, f"{comp['wins']}/{comp['num_pairs']}", comp["verdict"],
                 "**met**" if e["held"] else "**not met**", note])
  lines += [report.markdown_table(["expected effect", "diff (points)", "95% CI", "wins", "verdict", "result", "notes"],
                                  rows) if rows else "(no part ran)", ""]
  if "ofa" in results:
    lines += _ofa_md(config, results["ofa"], effects)
  if "lapp" in results:
    lines += _lapp_md(config, results["lapp"], effects)
  if "proard" in results:
    lines += _proard_md(config, results["proard"])
  if "lightweight" in results:
    lines += _light_md(config, results["lightweight"], effects)
  if "fedtiny" in results:
    lines += _fed_md(config, results["fedtiny"], effects)
  return "\n".join(lines) + "\n"


def _fed_md(config: ml_collections.ConfigDict, part: dict, effects: list[dict]) -> list[str]:
  f = config.fedtiny
  runs = part["runs"]
  lines = ["## FedTiny vs magnitude pruning once at the server", "",
           f"{f.num_clients} clients, {f.shards_per_client} label-sorted shards each; zoo cnn (widths {f.width}, "
           f"{2 * f.width}, dense {f.hidden}), kernels at density {f.density:g} (biases dense); {f.rounds} FedAvg "
           f"rounds of {f.local_steps} local SGD steps (batch {f.client_batch} per client, learning rate "
           f"{f.learning_rate:g}). FedTiny: {f.candidates} candidates (spread {f.spread:g}) scored on "
           f"{f.select_batch} rows per client; grow-and-prune in the first {f.prune_rounds} rounds, one layer per "
           f"round, alpha {f.alpha:g}, top-{f.topk} buffers per client and layer. Test accuracy (%) of the server "
           "model; layer densities (conv1, conv2, dense, head) mean over seeds: the candidate's are the ones asked for "
           "(`random_layer_densities`), the masks' the kept fraction (`round(d n)` weights per layer at the start; "
           "grow-and-prune keeps each layer's count).", ""]
  rows = []
  for arm in part["arms"]:
    by = runs[arm]
    d, ci = "-", "-"
    if arm != "server" and "server" in runs:
      d, ci = _diff(report.paired_comparison(_per_seed(by, lambda r: r["accuracy"]),
                                             _per_seed(runs["server"], lambda r: r["accuracy"])))
    dens = ", ".join(f"{np.mean([r['layer_density'][k] for r in by.values()]):.3f}" for k in part["layers"])
    start = ", ".join(f"{np.mean([r['candidate_densities'][k] for r in by.values()]):.3f}" for k in part["layers"])
    rows.append([arm, _pct(_per_seed(by, lambda r: r["accuracy"])),
                 f"{np.mean([r['density'] for r in by.values()]):.4f}", start, dens,
                 f"{np.mean([r['grown'] for r in by.values()]):.0f}",
                 ", ".join(str(r["selected"]) for r in by.values()) if arm != "server" else "0 (uniform)",
                 d, ci])
  lines += [report.markdown_table(["arm", "accuracy", "density", "candidate's layer densities", "final masks' layer densities",
                                   "weights grown", "candidate (per seed)", "arm - server (points)", "95% CI"],
                                  rows), "",
            "`select`: FedTiny's selected coarse candidate with the masks fixed (no grow-and-prune), FedAvg only: "
            "a diagnostic that separates the selection from the progressive pruning (no expected effect)."]
  if {"fedtiny", "select"} <= set(runs):
    d, ci = _diff(report.paired_comparison(_per_seed(runs["fedtiny"], lambda r: r["accuracy"]),
                                           _per_seed(runs["select"], lambda r: r["accuracy"])))
    lines += ["", f"FedTiny - select (the progressive pruning on top of the same candidate): {d} points, 95% CI {ci}."]
  return lines + [""]


def _light_md(config: ml_collections.ConfigDict, part: dict, effects: list[dict]) -> list[str]:
  lw = config.lightweight
  runs = part["runs"]
  comp = {e["name"]: e["comparison"] for e in effects}["lightweight"]
  lines = ["## Lightweight CNN: dual-input/dual-output sub-models, unified, progressive unfreezing", "",
           f"Zoo cnn (widths {lw.width}, {2 * lw.width}, dense {lw.hidden}; {part['params']:,} parameters, "
           f"{part['macs'] / 1e3:.1f}k MACs). Dual: two copies from the seed's initialisation, {lw.dual_steps} steps "
           f"on original + augmented digits (batch {config.batch_size} of each), Adam {lw.learning_rate:g}; unified "
           f"with weight {lw.weight:g}; fine-tuned {lw.finetune_steps} steps on the augmented stream, Adam "
           f"{lw.finetune_learning_rate:g}, groups unfrozen in order {', '.join(part['groups'])} every "
           f"{lw.finetune_steps // len(part['groups'])} steps. Single: the same cnn, initialisation and augmented "
           f"data, {part['total_steps']} steps, Adam {lw.learning_rate:g}. Test accuracy (%).", ""]
  dual = runs["dual"]
  d, ci = _diff(comp)
  rows = [["sub-model on original digits (after the dual phase)", _pct(_per_seed(dual, lambda r: r["original"])), "", ""],
          ["sub-model on augmented digits (after the dual phase)", _pct(_per_seed(dual, lambda r: r["augmented"])), "", ""],
          ["unified (average, before fine-tuning)", _pct(_per_seed(dual, lambda r: r["unified"])), "", ""],
          ["unified + fine-tuned (progressive unfreezing)", _pct(_per_seed(dual, lambda r: r["accuracy"])), d, ci],
          ["single cnn, augmented data", _pct(_per_seed(runs["single"], lambda r: r["accuracy"])), "-", "-"]]
  lines += [report.markdown_table(["model", "accuracy", "vs single (points)", "95% CI"], rows), ""]
  return lines


def _proard_md(config: ml_collections.ConfigDict, part: dict) -> list[str]:
  c = config.proard
  runs = part["runs"]
  lines = ["## ProARD: adversarial elastic training, robust-gap vs uniform student sampling", "",
           f"The `ofa` elastic network, {c.num_steps} steps, batch {config.batch_size}, Adam {c.learning_rate:g} "
           f"(cosine); FGSM training at eps {c.eps:g} (standardised pixel units); KD weight {c.kd_weight:g}, "
           f"T {c.kd_temperature:g}; gap sampler tau {c.temperature:g}, momentum {c.momentum:g}; "
           f"{len(part['candidates'])} candidate students. Test: clean and PGD-{c.eval_pgd_steps} "
           f"(eps {c.eps:g}, step eps/4) accuracy (%).", ""]
  rows = []
  for name, macs in part["macs"].items():
    row = [name, f"{macs / 1e3:.1f}k"]
    for arm in part["arms"]:
      row += [_pct(_per_seed(runs[arm], lambda r, n=name: r["clean"][n])),
              _pct(_per_seed(runs[arm], lambda r, n=name: r["robust"][n]))]
    if set(PROARD_ARMS) <= set(part["arms"]):
      row.append(_diff(report.paired_comparison(_per_seed(runs["gap"], lambda r, n=name: r["robust"][n]),
                                                _per_seed(runs["uniform"], lambda r, n=name: r["robust"][n])))[0])
    rows.append(row)
  headers = ["sub-network", "MACs"] + [f"{a} {k}" for a in part["arms"] for k in ("clean", "robust")]
  if set(PROARD_ARMS) <= set(part["arms"]):
    headers.append("robust: gap - uniform (points)")
  lines += [report.markdown_table(headers, rows), ""]
  draws = []
  for arm in part["arms"]:
    mean = {n: np.mean([r["draws"][n] for r in runs[arm].values()]) for n in part["candidates"]}
    gap = {n: np.mean([r["gaps"][n] for r in runs[arm].values()]) for n in part["candidates"]}
    draws.append([arm] + [f"{mean[n]:.0f} ({gap[n]:+.2f})" for n in part["candidates"]])
  lines += ["Students drawn per candidate over the run (final running robust gap to the teacher), mean over seeds:",
            "", report.markdown_table(["arm"] + part["candidates"], draws), ""]
  return lines


def _ofa_md(config: ml_collections.ConfigDict, part: dict, effects: list[dict]) -> list[str]:
  o = config.ofa
  runs = part["runs"]
  comps = {e["name"]: e["comparison"] for e in effects}
  phases = ", ".join(f"{n} {s}" for n, s in zip(part["phases"], o.phase_steps))
  lines = ["## Once-for-All progressive shrinking", "",
           f"Elastic CNN: stem {o.stem_channels}, stages (channels, depth, stride) {tuple(map(tuple, o.stages))}, "
           f"kernels {tuple(o.kernel_sizes)}, widths {tuple(o.width_fractions)}, expand {o.expand_ratio}; "
           f"{part['params']:,} parameters, {part['full_macs'] / 1e3:.1f}k MACs per example in full. Phases (steps): "
           f"{phases}; batch {config.batch_size}, Adam {o.learning_rate:g} (cosine restarted per phase), "
           f"KD weight {o.kd_weight:g}, T {o.temperature:g}. Alone: the same sub-network, initialisation and data "
           f"order, {part['total_steps']} steps (cosine over the run).", ""]
  rows = []
  for name, macs in part["macs"].items():
    d, ci = _diff(comps[f"ofa_{name}"])
    rows.append([name, f"{macs / 1e3:.1f}k ({macs / part['full_macs']:.2f})",
                 _pct(_per_seed(runs["ofa"], lambda r, n=name: r["accuracy"][n])),
                 _pct(_per_seed(runs[f"alone_{name}"], lambda r: r["accuracy"])), d, ci])
  lines += [report.markdown_table(["sub-network (kernel-depth-width)", "MACs (of full)", "OFA acc", "alone acc",
                                   "OFA - alone (points)", "95% CI"], rows), ""]
  # phase ends: the largest and the smallest allowed sub-network
  rows = []
  first = next(iter(runs["ofa"].values()))
  for i, ph in enumerate(first.get("phases", [])):
    per = [r["phases"][i] for r in runs["ofa"].values() if len(r.get("phases", [])) > i]
    rows.append([part["phases"][i] if i < len(part["phases"]) else "?", ph["step"],
                 _pct([q["largest"] for q in per]), _pct([q["smallest_allowed"] for q in per]),
                 f"{np.mean([q['metrics'].get('macs_smallest', np.nan) for q in per]):.2f}"])
  if rows:
    lines += ["At the end of each phase (the last step's sampled smallest sub-network's MACs as a fraction of "
              "full):", "", report.markdown_table(["phase", "step", "largest", "smallest allowed",
                                                   "MACs smallest sampled"], rows), ""]
  return lines


def _lapp_md(config: ml_collections.ConfigDict, part: dict, effects: list[dict]) -> list[str]:
  p = config.lapp
  runs = part["runs"]
  comps = {e["name"]: e["comparison"] for e in effects}
  lines = ["## LAPP vs magnitude channel pruning at equal FLOPs", "",
           f"Zoo cnn (widths {p.width}, {2 * p.width}, dense {p.hidden}; {part['full_macs'] / 1e3:.1f}k MACs), "
           f"{p.num_steps} steps, batch {config.batch_size}, Adam {p.learning_rate:g}; the budget tightens over the "
           f"first {p.prune_steps} steps, then fine-tuning with fixed masks. Magnitude: masks every {p.frequency} "
           f"steps. LAPP: temperature {tuple(p.temperature)}, penalty weight {p.penalty_weight:g}, thresholds' Adam "
           f"learning rate {p.threshold_learning_rate:g}. Channels kept "
           f"per group ({', '.join(f'{k} of {v}' for k, v in part['groups'].items())}), mean over seeds.", ""]
  dense = _per_seed(runs["dense"], lambda r: r["accuracy"])
  rows = [["dense", "-", "1.000", _pct(dense), "-", "-", "-", "-", "-", ", ".join(str(v) for v in part["groups"].values())]]
  for removed in part["removed"]:
    r = round(100 * removed)
    for arm in [a for a in ("magnitude", "lapp", "lapp_bypass") if f"{a}{r}" in runs]:
      by = runs[f"{arm}{r}"]
      acc = _per_seed(by, lambda x: x["accuracy"])
      flops = np.mean([x["flops_fraction"] for x in by.values()])
      own = (f"{np.mean([x['lapp_flops_fraction'] for x in by.values()]):.3f}" if arm != "magnitude" else "-")
      kept = ", ".join(f"{np.mean([x['kept'][g] for x in by.values()]):.1f}" for g in part["groups"])
      d, ci = _diff(comps[f"lapp{r}"]) if arm == "lapp" and f"lapp{r}" in comps else ("-", "-")
      vs_lapp = _diff(comps[f"lapp_bypass{r}"]) if arm == "lapp_bypass" else ("-", "-")
      vs_dense = _diff(report.paired_comparison(acc, dense))[0]
      label = f"lapp + bypass ({config.lapp.bypass})" if arm == "lapp_bypass" else arm
      rows.append([label, f"{r}%", f"{flops:.3f} (own {own})" if arm != "magnitude" else f"{flops:.3f}", _pct(acc),
                   vs_dense, d, ci, *vs_lapp, kept])
  lines += [report.markdown_table(["method", "MACs removed (target)", "MACs kept (achieved)", "accuracy",
                                   "vs dense (points)", "LAPP - magnitude (points)", "95% CI",
                                   "bypass - LAPP (points)", "95% CI", "channels kept"], rows), "",
            "`own`: the FLOPs fraction of LAPP's own hard masks (`s_c > t_l`) before the budget trim (with the "
            "bypass: plus the bypass's MACs)."]
  bypass = [x for name, by in runs.items() if name.startswith("lapp_bypass") for x in by.values()]
  if bypass:
    share = bypass[0]["bypass_flops_fraction"]
    lines += ["", f"The bypass ({config.lapp.bypass}) takes {share:.4f} of the dense MACs "
              f"({share * part['full_macs']:.0f} MACs), counted in its achieved MACs and taken out of its channels' "
              "budget; the L1 norm of its trained kernel, mean over its runs: "
              + ", ".join(f"{g} {np.mean([x['bypass_norm'][g] for x in bypass]):.2f}" for g in bypass[0]["bypass_norm"])
              + "."]
  return lines + [""]


def figures(results: dict) -> dict[str, Callable[[str], None]]:
  out = {}
  if "ofa" in results:
    out["ofa.png"] = lambda path: _plot_ofa(results["ofa"], path)
  if "lapp" in results:
    out["lapp.png"] = lambda path: _plot_lapp(results["lapp"], path)
  if "proard" in results:
    out["proard.png"] = lambda path: _plot_proard(results["proard"], path)
  if "lightweight" in results:
    out["lightweight.png"] = lambda path: _plot_light(results["lightweight"], path)
  if "fedtiny" in results:
    out["fedtiny.png"] = lambda path: _plot_fed(results["fedtiny"], path)
  return out


def _plot_fed(part: dict, path: str) -> None:
  fig, ax = report.figure(5.5, 4)
  for arm, marker in zip(part["arms"], ("o-", "s--", "^:")):
    curves = [r["curve"] for r in part["runs"][arm].values()]
    rounds = [q["round"] for q in curves[0]]
    acc = 100 * np.asarray([[q["accuracy"] for q in c] for c in curves])
    ax.errorbar(rounds, acc.mean(0), yerr=acc.std(0, ddof=1) if len(acc) > 1 else None, fmt=marker, capsize=3,
                label=arm)
  ax.set_xlabel("FedAvg round")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("FedTiny vs magnitude pruning once at the server")
  ax.legend()
  report.save_figure(fig, path)


def _plot_light(part: dict, path: str) -> None:
  fig, ax = report.figure(6, 4)
  dual, single = part["runs"]["dual"], part["runs"]["single"]
  bars = [("original", [r["original"] for r in dual.values()]), ("augmented", [r["augmented"] for r in dual.values()]),
          ("unified", [r["unified"] for r in dual.values()]), ("unified +\nfine-tuned", [r["accuracy"] for r in dual.values()]),
          ("single", [r["accuracy"] for r in single.values()])]
  for i, (label, values) in enumerate(bars):
    v = 100 * np.asarray(values)
    ax.bar(i, v.mean(), yerr=v.std(ddof=1) if len(v) > 1 else 0.0, capsize=3, color="C1" if label == "single" else "C0")
    ax.plot(np.full(len(v), i), v, "k.", ms=4)
  ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
  low = min(100 * min(v) for _, v in bars)
  ax.set_ylim(max(0.0, low - 5), 100)
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("Lightweight cnn: dual-input/output, unified, fine-tuned vs single")
  report.save_figure(fig, path)


def _plot_proard(part: dict, path: str) -> None:
  fig, ax = report.figure(5.5, 4)
  names = list(part["macs"])
  x = [part["macs"][n] / 1e3 for n in names]
  for arm, marker in zip(part["arms"], ("o", "s")):
    for key, ls in (("robust", "-"), ("clean", ":")):
      m = [100 * np.mean([r[key][n] for r in part["runs"][arm].values()]) for n in names]
      ax.plot(x, m, marker + ls, label=f"{arm} {key}")
  ax.set_xlabel("MACs per example (k)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("ProARD: robust-gap vs uniform student sampling")
  ax.legend(fontsize=8)
  report.save_figure(fig, path)


def _plot_ofa(part: dict, path: str) -> None:
  fig, ax = report.figure(5.5, 4)
  names = list(part["macs"])
  x = [part["macs"][n] / 1e3 for n in names]
  runs = part["runs"]
  for label, get, marker in (("OFA", lambda n: [r["accuracy"][n] for r in runs["ofa"].values()], "o-"),
                             ("alone", lambda n: [r["accuracy"] for r in runs[f"alone_{n}"].values()], "s--")):
    m = [100 * np.mean(get(n)) for n in names]
    s = [100 * np.std(get(n), ddof=1) if len(get(n)) > 1 else 0.0 for n in names]
    ax.errorbar(x, m, yerr=s, fmt=marker, capsize=3, label=label)
  for xi, n in zip(x, names):
    ax.annotate(n, (xi, 100 * np.mean([r["accuracy"][n] for r in runs["ofa"].values()])), fontsize=7,
                textcoords="offset points", xytext=(3, -10))
  ax.set_xlabel("MACs per example (k)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("Once-for-All sub-networks vs trained alone")
  ax.legend()
  report.save_figure(fig, path)


def _plot_lapp(part: dict, path: str) -> None:
  fig, ax = report.figure(5.5, 4)
  runs = part["runs"]
  dense = 100 * np.mean([r["accuracy"] for r in runs["dense"].values()])
  ax.axhline(dense, color="gray", ls=":", label="dense")
  for arm, marker in (("magnitude", "s--"), ("lapp", "o-"), ("lapp_bypass", "^-.")):
    if not all(f"{arm}{round(100 * r)}" in runs for r in part["removed"]):
      continue
    xs, ms, ss = [], [], []
    for removed in part["removed"]:
      by = runs[f"{arm}{round(100 * removed)}"]
      acc = [100 * r["accuracy"] for r in by.values()]
      xs.append(np.mean([r["flops_fraction"] for r in by.values()]))
      ms.append(np.mean(acc))
      ss.append(np.std(acc, ddof=1) if len(acc) > 1 else 0.0)
    ax.errorbar(xs, ms, yerr=ss, fmt=marker, capsize=3, label=arm)
  ax.set_xlabel("MACs kept (fraction of dense)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("Channel pruning at equal FLOPs")
  ax.legend()
  report.save_figure(fig, path)
