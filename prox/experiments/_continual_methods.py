"""The continual-learning methods of the ``continual`` experiment, one ``Learner`` each.

A learner is built once per (stream, method) and reused for every seed: it owns the optax transform, the
compiled ``prox.step`` train step (``make_train_step``) and the host-side hooks the per-task loop calls:

* ``init_state(seed)``: the ``TrainState`` (model parameters, optimizer state with the EWC/GPM state, and
  ``extra``: the replay memory, the SLCA class statistics or the shift detector with its recent batches);
* ``prepare(state, batch, key)``: the batch the step sees (replay mixes memory examples into it);
* ``after_step(state, batch, log)``: per-step host work (the detector-triggered EWC consolidation);
* ``end_task(state, task, t, seed, log)``: the state transition at a known task boundary (EWC
  ``consolidate``, GPM basis update, SLCA statistics + classifier alignment, reservoir update).

Everything a run carries lives in ``TrainState`` (checkpointed by orbax) or in the JSON ``log`` (written into
the checkpoint's meta), so a run resumes at task granularity.

Every batch is ``{"image", "label", "logit_mask" [B, C] bool, "weight" [B] float32}``: the loss is the
weighted mean cross-entropy of the logits with absent classes masked per example (task-incremental
multi-head for split, all classes live for permuted), so replayed examples keep the mask of their own task.
"""
from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prox import step as step_lib
from prox.optim import slow_learner
from prox.tasks import replay as replay_lib
from prox.tasks import shift_detector as detector_lib
from prox.tasks import slca as slca_lib
from prox.tasks import streams as streams_lib

# ``prox.transforms`` exports the functions ``ewc`` and ``gpm``, which shadow the module attributes of the
# same names: take the modules themselves.
ewc_lib = importlib.import_module("prox.transforms.ewc")
gpm_lib = importlib.import_module("prox.transforms.gpm")


PyTree = Any

KINDS = ("naive", "replay", "ewc", "ewc_online", "gpm", "slca", "ewc_detect")


# --- shared pieces: loss, layer inputs, evaluation --------------------------------------------------

def masked_loss(apply: Callable) -> step_lib.LossFn:
  """Weighted mean cross-entropy of ``mask_logits(apply(x), logit_mask)``:
  ``L = sum_n w_n CE(z_n, y_n) / max(sum_n w_n, 1)``; accuracy weighted the same way."""

  def loss_fn(params, model_state, batch, rng):
    del rng
    logits, model_state = apply(params, model_state, batch["image"], train=True)
    logits = streams_lib.mask_logits(logits, batch["logit_mask"])
    w = batch["weight"]
    total = jnp.maximum(jnp.sum(w), 1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return jnp.sum(w * ce) / total, ({"accuracy": jnp.sum(w * correct) / total}, model_state)

  return loss_fn


def masked_eval(apply: Callable) -> Callable:
  """Per-device sums for ``make_eval_step``: correct predictions with the task's logit mask (task-/domain-
  incremental), without it (class-incremental), per-class counts, and the number of real examples."""

  def eval_fn(params, model_state, batch):
    logits, _ = apply(params, model_state, batch["image"], train=False)
    real = batch["mask"].astype(jnp.float32)
    label = batch["label"]
    hit_task = jnp.argmax(streams_lib.mask_logits(logits, batch["logit_mask"]), -1) == label
    hit_all = jnp.argmax(logits, -1) == label
    onehot = jax.nn.one_hot(label, logits.shape[-1]) * real[:, None]
    return {"correct_task": jnp.sum(hit_task * real), "correct_all": jnp.sum(hit_all * real),
            "count": jnp.sum(real), "class_correct": jnp.sum(onehot * hit_all[:, None], 0),
            "class_count": jnp.sum(onehot, 0)}

  return eval_fn


def mlp_layer_inputs(params: PyTree, images: jax.Array) -> dict[str, jax.Array]:
  """The input of every dense kernel of ``prox.models.MLP`` (``{"dense0": x, "dense1": h1, ...,
  "head": h_L}``), from its parameter dict: ``h_{i+1} = relu(h_i W_i + b_i)``, ``h_0 = flatten(x)``.

  GPM needs each kernel's inputs and SLCA the head's input (the features); the model's own ``__call__``
  returns only the logits (a test checks this forward pass against it).
  """
  x = images.reshape(images.shape[0], -1)
  out = {}
  hidden = params["hidden"]
  for i in range(len(hidden)):
    layer = hidden[f"dense{i}"]
    out[f"dense{i}"] = x
    x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
  out["head"] = x
  return out


_layer_inputs = jax.jit(mlp_layer_inputs)


@dataclasses.dataclass
class Common:
  """What every learner of one experiment run shares (so it compiles once)."""
  apply: Callable
  init_params: Callable[[int], tuple[PyTree, PyTree]]   # seed -> (params, model_state)
  mesh: Any
  num_classes: int
  learning_rate: float
  momentum: float
  batch_size: int
  image_shape: tuple[int, ...]
  # log p(y | x) of one example (image, label, logit_mask), for the Fisher: one function object for every
  # learner, so ``diagonal_fisher`` compiles once per batch shape.
  logprob: Callable = dataclasses.field(init=False)

  def __post_init__(self):
    apply = self.apply

    def logprob(params, example):
      image, label, logit_mask = example
      logits, _ = apply(params, {}, image[None], train=False)
      return jax.nn.log_softmax(streams_lib.mask_logits(logits[0], logit_mask))[label]

    self.logprob = logprob

  def sgd(self) -> optax.GradientTransformation:
    return optax.sgd(self.learning_rate, momentum=self.momentum or None)

  @property
  def stability_limit(self) -> float:
    """Largest stable ``lr * curvature`` of the inner optimizer: 2 (SGD), 2 (1 + beta) (heavy ball)."""
    return 2.0 * (1.0 + self.momentum)


def task_batch(images: np.ndarray, labels: np.ndarray, logit_mask: np.ndarray) -> dict[str, np.ndarray]:
  """A training batch in the experiment's layout (every row weighted 1, the task's logit mask)."""
  n = labels.shape[0]
  return {"image": images, "label": labels,
          "logit_mask": np.broadcast_to(np.asarray(logit_mask, bool), (n, logit_mask.shape[0])),
          "weight": np.ones((n,), np.float32)}


def _subset(n: int, size: int, seed: int, t: int, salt: int) -> np.ndarray:
  """``min(size, n)`` distinct positions out of ``n``, seeded by (seed, task, salt)."""
  rng = np.random.default_rng((seed, t, salt))
  return np.sort(rng.permutation(n)[:min(size, n)])


# --- learners --------------------------------------------------------------------------------------

class Learner:
  """Naive fine-tuning: SGD on each new task, nothing else. Base class of the other methods."""

  kind = "naive"
  needs_key = False   # whether ``prepare`` takes a per-step random key

  def __init__(self, common: Common, label: str):
    self.common = common
    self.label = label
    self.tx = self.make_tx()
    self.step = step_lib.make_train_step(masked_loss(common.apply), self.tx, mesh=common.mesh,
                                         extra_update=self.extra_update())

  def make_tx(self) -> optax.GradientTransformation:
    return self.common.sgd()

  def extra_update(self) -> Callable | None:
    return None

  def init_extra(self, params: PyTree) -> PyTree:
    del params
    return ()

  def init_state(self, seed: int) -> step_lib.TrainState:
    params, model_state = self.common.init_params(seed)
    state = step_lib.TrainState(
        step=np.int32(0), params=params, opt_state=jax.device_get(self.tx.init(params)),
        model_state=model_state, extra=jax.device_get(self.init_extra(params)),
        rng=np.asarray(jax.random.key_data(jax.random.key(seed))))
    return step_lib.replicate(state, self.common.mesh)

  def prepare(self, state: step_lib.TrainState, batch: dict, key: jax.Array) -> dict:
    del state, key
    return batch

  def after_step(self, state: step_lib.TrainState, batch: dict, log: dict) -> step_lib.TrainState:
    del batch, log
    return state

  def end_task(self, state: step_lib.TrainState, task: streams_lib.Task, t: int, seed: int,
               log: dict) -> step_lib.TrainState:
    del task, t, seed, log
    return state


class ReplayLearner(Learner):
  """Experience replay: a reservoir memory (``prox.tasks.replay``, in ``TrainState.extra``) of
  ``capacity`` examples; each step trains on the current batch plus ``replay_batch`` memory examples
  (weight 0 while the memory holds fewer). A task's training examples are offered to the reservoir once,
  at the end of the task (Algorithm R: the memory is a uniform sample of every example seen so far)."""

  kind = "replay"
  needs_key = True
  _CHUNK = 256

  def __init__(self, common: Common, label: str, *, capacity: int, replay_batch: int):
    self.capacity, self.replay_batch = capacity, replay_batch
    super().__init__(common, label)

  def init_extra(self, params):
    c = self.common.num_classes
    example = {"image": jax.ShapeDtypeStruct(self.common.image_shape, jnp.float32),
               "label": jax.ShapeDtypeStruct((), jnp.int32),
               "logit_mask": jax.ShapeDtypeStruct((c,), jnp.bool_)}
    return replay_lib.reservoir_init(example, self.capacity)

  def prepare(self, state, batch, key):
    mem, valid = replay_lib.reservoir_sample(state.extra, key, self.replay_batch)
    mem = jax.device_get(mem)
    mixed = {k: np.concatenate([batch[k], np.asarray(mem[k], batch[k].dtype)]) for k in mem}
    mixed["weight"] = np.concatenate([batch["weight"], np.asarray(valid, np.float32)])
    return mixed

  def end_task(self, state, task, t, seed, log):
    images, labels = task.train.take(slice(None))
    data = task_batch(images, labels, task.logit_mask)
    data.pop("weight")
    memory = state.extra
    key = jax.random.fold_in(jax.random.key(seed), 1_000_003 + t)
    for i, start in enumerate(range(0, labels.shape[0], self._CHUNK)):
      rows = np.arange(start, start + self._CHUNK)
      valid = rows < labels.shape[0]
      safe = np.where(valid, rows, 0)
      chunk = {k: v[safe] for k, v in data.items()}
      memory = replay_lib.reservoir_add(memory, chunk, jax.random.fold_in(key, i), valid)
    log.setdefault("memory_classes", []).append(
        np.bincount(np.asarray(jax.device_get(memory.data["label"]))[:int(replay_lib.reservoir_size(memory))],
                    minlength=self.common.num_classes).tolist())
    return state._replace(extra=memory)


class EWCLearner(Learner):
  """EWC (``prox.transforms.ewc``): ``apply_if_finite(chain(ewc(lambda, mode, gamma), sgd))``. At the end
  of each task the per-example diagonal Fisher of ``fisher_examples`` training examples is consolidated
  with the current weights as anchor; the stability product ``lambda max(F) lr`` is logged and a
  ``RuntimeWarning`` above the SGD limit is counted."""

  kind = "ewc"

  def __init__(self, common: Common, label: str, *, ewc_lambda: float, mode: str, gamma: float,
               fisher_examples: int):
    self.ewc_lambda, self.mode, self.gamma = float(ewc_lambda), mode, float(gamma)
    self.fisher_examples = fisher_examples
    super().__init__(common, label)

  def make_tx(self):
    inner = optax.chain(ewc_lib.ewc(self.ewc_lambda, mode=self.mode,
                                    gamma=self.gamma if self.mode == "online" else 1.0),
                        self.common.sgd())
    return optax.apply_if_finite(inner, max_consecutive_errors=2**30)

  def consolidate(self, state, images, labels, masks, log) -> step_lib.TrainState:
    """Fisher on ``(images, labels, masks)`` at the current weights, then ``consolidate``."""
    params = state.params
    fisher = ewc_lib.diagonal_fisher(self.common.logprob, params, (images, labels, masks), chunk_size=128)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      opt_state = ewc_lib.consolidate_opt_state(
          state.opt_state, params, fisher, learning_rate=self.common.learning_rate,
          stability_limit=self.common.stability_limit)
    ewc_state = ewc_lib.find_ewc_state(opt_state)
    log.setdefault("stability", []).append(
        float(ewc_lib.ewc_stability(ewc_state, self.common.learning_rate)))
    unstable = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    log["stability_warnings"] = log.get("stability_warnings", 0) + len(unstable)
    if unstable and "stability_warning" not in log:
      log["stability_warning"] = unstable[0]
    return state._replace(opt_state=opt_state)

  def end_task(self, state, task, t, seed, log):
    ewc_state = ewc_lib.find_ewc_state(state.opt_state)
    log.setdefault("penalty", []).append(float(ewc_lib.ewc_penalty(ewc_state, state.params)))
    idx = _subset(len(task.train), self.fisher_examples, seed, t, 1)
    images, labels = task.train.take(idx)
    masks = np.broadcast_to(task.logit_mask, (labels.shape[0], task.logit_mask.shape[0]))
    state = self.consolidate(state, images, labels, masks, log)
    log["skipped_steps"] = int(jax.device_get(state.opt_state.total_notfinite))
    return state


class DetectExtra(NamedTuple):
  """``TrainState.extra`` of the detector-triggered EWC: the shift detector, its last flag, and a ring
  buffer of the last ``W + k`` training batches (the oldest ``k`` feed the Fisher at a detected switch)."""
  detector: detector_lib.ShiftDetectorState
  switched: jax.Array
  recent: PyTree          # {"image", "label", "logit_mask"} with leading axes [W + k, B]
  pushes: jax.Array       # int32, number of batches pushed so far


@jax.jit
def _ring_push(extra: DetectExtra, batch: PyTree) -> DetectExtra:
  slots = jax.tree.leaves(extra.recent)[0].shape[0]
  slot = extra.pushes % slots
  recent = jax.tree.map(lambda r, b: jax.lax.dynamic_update_index_in_dim(r, b.astype(r.dtype), slot, 0),
                        extra.recent, batch)
  return extra._replace(recent=recent, pushes=extra.pushes + 1)


class EWCDetectLearner(EWCLearner):
  """EWC whose consolidations are triggered by the shift detector (``prox.tasks.shift_detector``, a
  windowed z-test on the training loss, run inside the step through ``extra_update``) instead of the
  known task boundaries. At a flag the Fisher is computed on the ``k`` oldest of the last ``W + k``
  batches (the newest ``W``, the detector's test window, may already belong to the new task) and the
  anchor is the current weights (at most a few steps into the new task)."""

  kind = "ewc_detect"

  def __init__(self, common: Common, label: str, *, ewc_lambda: float, fisher_examples: int,
               reference_window: int, test_window: int, threshold: float, fisher_batches: int):
    self.detector = detector_lib.shift_detector(reference_window, test_window, threshold)
    self.test_window, self.fisher_batches = test_window, fisher_batches
    super().__init__(common, label, ewc_lambda=ewc_lambda, mode="separate", gamma=1.0,
                     fisher_examples=fisher_examples)

  def extra_update(self):
    update = self.detector.update

    def hook(extra: DetectExtra, info: step_lib.StepInfo) -> DetectExtra:
      det, switched = update(extra.detector, info.loss)
      return extra._replace(detector=det, switched=switched)

    return hook

  def init_extra(self, params):
    c, b = self.common.num_classes, self.common.batch_size
    slots = self.test_window + self.fisher_batches
    recent = {"image": jnp.zeros((slots, b) + self.common.image_shape, jnp.float32),
              "label": jnp.zeros((slots, b), jnp.int32),
              "logit_mask": jnp.zeros((slots, b, c), jnp.bool_)}
    return DetectExtra(detector=self.detector.init(), switched=jnp.zeros((), jnp.bool_), recent=recent,
                       pushes=jnp.zeros((), jnp.int32))

  def after_step(self, state, batch, log):
    extra = _ring_push(state.extra, {k: batch[k] for k in ("image", "label", "logit_mask")})
    state = state._replace(extra=extra)
    log["steps"] = log.get("steps", 0) + 1
    if not bool(extra.switched):
      return state
    log.setdefault("switch_steps", []).append(log["steps"])   # 1-based step count of the run
    pushes = int(extra.pushes)
    slots = self.test_window + self.fisher_batches
    if pushes < slots:
      log["switches_without_data"] = log.get("switches_without_data", 0) + 1
      return state
    oldest = [(pushes + i) % slots for i in range(self.fisher_batches)]
    state = jax.device_get(state)   # consolidate on a host copy, then replicate (as at task boundaries)
    recent = state.extra.recent
    take = lambda x: np.asarray(x)[oldest].reshape((-1,) + x.shape[2:])
    state = self.consolidate(state, take(recent["image"]), take(recent["label"]),
                             take(recent["logit_mask"]), log)
    return step_lib.replicate(jax.device_get(state), self.common.mesh)

  def end_task(self, state, task, t, seed, log):
    ewc_state = ewc_lib.find_ewc_state(state.opt_state)
    log.setdefault("penalty", []).append(float(ewc_lib.ewc_penalty(ewc_state, state.params)))
    log.setdefault("task_end_steps", []).append(log.get("steps", 0))
    log["skipped_steps"] = int(jax.device_get(state.opt_state.total_notfinite))
    log["detected_switches"] = int(jax.device_get(state.extra.detector.num_switches))
    return state


def _is_bias(path) -> bool:
  return jax.tree_util.keystr(path).endswith("['bias']")


class GPMLearner(Learner):
  """GPM (``prox.transforms.gpm``): ``chain(sgd, gpm(kernels), zero(biases))``. The biases are frozen at
  their zero initialisation, i.e. a bias-free network as in the reference code. The head's kernel is
  projected only for a single-head stream (``project_head``, permuted); a task-incremental stream's head
  columns are already private per task through the logit masks. After task ``t`` the bases grow with the
  inputs of ``examples`` training examples at threshold ``gpm_threshold(t, base, increment)``."""

  kind = "gpm"

  def __init__(self, common: Common, label: str, *, project_head: bool, examples: int,
               threshold_base: float, threshold_increment: float):
    self.project_head, self.examples = project_head, examples
    self.threshold_base, self.threshold_increment = threshold_base, threshold_increment
    super().__init__(common, label)

  def kernel_mask(self, params):
    return jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.ndim(p) == 2 and (self.project_head or not jax.tree_util.keystr(path)
                                               .startswith("['head']")), params)

  def make_tx(self):
    bias_mask = lambda params: jax.tree_util.tree_map_with_path(lambda path, _: _is_bias(path), params)
    return optax.chain(self.common.sgd(), gpm_lib.gpm(self.kernel_mask),
                       optax.masked(optax.set_to_zero(), bias_mask))

  def end_task(self, state, task, t, seed, log):
    idx = _subset(len(task.train), self.examples, seed, t, 2)
    images, _ = task.train.take(idx)
    inputs = _layer_inputs(state.params, images)
    activations = {"head": {"kernel": inputs["head"], "bias": None},
                   "hidden": {name: {"kernel": inputs[name], "bias": None} for name in state.params["hidden"]}}
    threshold = gpm_lib.gpm_threshold(t, self.threshold_base, self.threshold_increment)
    opt_state = gpm_lib.gpm_update_opt_state(state.opt_state, activations, threshold)
    ranks = gpm_lib.find_gpm_state(opt_state).ranks
    log.setdefault("ranks", []).append(
        {jax.tree_util.keystr(path): int(r) for path, r in jax.tree_util.tree_flatten_with_path(ranks)[0]})
    return state._replace(opt_state=opt_state)


class SLCALearner(Learner):
  """SLCA (``prox.tasks.slca``): slow learner (backbone updates x ``backbone_scale``) and, after each task,
  class-wise feature Gaussians of the task's training examples and a head retrained for ``align_epochs``
  epochs on ``samples_per_class`` sampled features per seen class with the logit-normalised loss.

  For a stream whose classes reoccur in every task (permuted, domain-incremental) the statistics are kept
  per (task, class) pair, ``T * C`` Gaussians labelled with their class, instead of being overwritten by
  the last task; the alignment then sees every task's feature distribution.
  """

  kind = "slca"

  def __init__(self, common: Common, label: str, *, num_tasks: int, per_task_stats: bool,
               logit_groups: np.ndarray | None, backbone_scale: float, samples_per_class: int,
               align_epochs: int, align_learning_rate: float, align_momentum: float, align_batch_size: int,
               tau: float):
    self.num_tasks, self.per_task_stats, self.logit_groups = num_tasks, per_task_stats, logit_groups
    self.backbone_scale, self.samples_per_class = backbone_scale, samples_per_class
    self.align_epochs, self.align_batch_size, self.tau = align_epochs, align_batch_size, tau
    self.align_tx = optax.sgd(align_learning_rate, momentum=align_momentum or None)
    super().__init__(common, label)
    self.align_step = step_lib.make_train_step(self._align_loss, self.align_tx, mesh=common.mesh)

  def make_tx(self):
    return slow_learner(self.common.sgd(), self.backbone_scale, {"head": False, "hidden": True})

  def _align_loss(self, head, model_state, batch, rng):
    del rng
    logits = batch["feature"] @ head["kernel"] + head["bias"]
    loss = slca_lib.alignment_loss(logits, batch["label"], tau=self.tau, logit_groups=self.logit_groups,
                                   logit_mask=batch["live"][0], weights=batch["weight"])
    return loss, ({}, model_state)

  def init_extra(self, params):
    c = self.common.num_classes
    entries = self.num_tasks * c if self.per_task_stats else c
    return slca_lib.class_stats_init(entries, params["head"]["kernel"].shape[0])

  def end_task(self, state, task, t, seed, log):
    c = self.common.num_classes
    images, labels = task.train.take(slice(None))
    features = _layer_inputs(state.params, images)["head"]
    offset = t * c if self.per_task_stats else 0
    stats = slca_lib.class_stats_update(state.extra, features, labels + offset,
                                        np.asarray(task.classes) + offset, t)
    feats, entries, weights = jax.device_get(
        slca_lib.sample_class_features(stats, jax.random.fold_in(jax.random.key(seed), 2_000_003 + t), t,
                                       self.samples_per_class))
    keep = np.flatnonzero(np.asarray(weights) > 0)
    feats, classes = np.asarray(feats)[keep], (np.asarray(entries)[keep] % c).astype(np.int32)
    live = np.zeros((c,), bool)
    live[np.unique(classes)] = True
    head = jax.device_get(state.params["head"])
    align = step_lib.replicate(step_lib.TrainState(
        step=np.int32(0), params=head, opt_state=jax.device_get(self.align_tx.init(head)), model_state={},
        extra=(), rng=np.asarray(jax.random.key_data(jax.random.key(seed)))), self.common.mesh)
    rng = np.random.default_rng((seed, t, 3))
    b = self.align_batch_size
    losses = []
    for _ in range(self.align_epochs):
      order = rng.permutation(len(classes))
      for start in range(0, len(order), b):
        rows = order[start:start + b]
        pad = b - len(rows)
        batch = {"feature": np.concatenate([feats[rows], np.zeros((pad, feats.shape[1]), np.float32)]),
                 "label": np.concatenate([classes[rows], np.zeros((pad,), np.int32)]),
                 "weight": np.concatenate([np.ones((len(rows),), np.float32), np.zeros((pad,), np.float32)]),
                 "live": np.broadcast_to(live, (b, c))}
        align, out = self.align_step(align, step_lib.shard_batch(batch, self.common.mesh))
      losses.append(float(out.metrics["loss"]))
    log.setdefault("align_loss", []).append(losses[-1])
    params = dict(jax.device_get(state.params))
    params["head"] = jax.device_get(align.params)
    return state._replace(params=params, extra=stats)
