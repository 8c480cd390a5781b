"""Progressive self-knowledge distillation (PS-KD; Kim, Ji, Yoon, Hwang 2021, "Self-Knowledge Distillation
with Progressive Refinement of Targets", ICCV) as a per-sample prediction store and a pure target
transition, usable with any classifier, plus the expected calibration error.

Rule, epoch t = 0..T-1 of T:

    alpha_t  = alpha_T (t + 1) / T,                                   alpha_T = 0.8
    target_i = (1 - alpha_t) onehot(y_i) + alpha_t P[i]
    P[i]    <- softmax(f(x_i))   after the example's forward pass (so the next epoch sees it)

where P[i] is the model's prediction for example i from the previous epoch; before example i has been
seen P[i] = onehot(y_i) (the authors' code fills P with one-hot labels during epoch 0).

With any optax/Flax code::

    store = pskd.init(num_examples, num_classes)
    targets = pskd.targets(store, idx, labels, epoch=t, num_epochs=T)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    store = pskd.store(store, idx, logits)          # after the step, with the logits it computed

With ``prox.step`` the store lives in ``TrainState.extra[name]``: the loss reads it through its context
(:func:`targets_fn`) and a step transition writes the batch's predictions into it inside the compiled
step (:func:`transition`), so the result does not depend on how the batch is split over devices::

    loss = prox.losses.classification_loss(apply, targets_fn=pskd.targets_fn(num_epochs=T))
    step = prox.step.make_train_step(loss, tx, transition=pskd.transition(apply))
    state = prox.step.init_state(params, tx, extra={"pskd": pskd.init(N, C)})

The batches carry each example's ``index`` into the store and the step's metadata its ``epoch`` (e.g.
``prox.tasks.irt.SubsetSource``).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class PSKDState(NamedTuple):
  """Per-sample prediction store.

  Attributes:
    predictions: [N, C] last stored softmax prediction of each training example.
    seen: bool [N], whether a prediction was stored for the example (else one-hot targets are used).
  """
  predictions: jax.Array
  seen: jax.Array


def init(num_examples: int, num_classes: int, dtype=jnp.float32) -> PSKDState:
  """An empty store for ``num_examples`` examples and ``num_classes`` classes."""
  if int(num_examples) < 1 or int(num_classes) < 2:
    raise ValueError(f"need num_examples >= 1 and num_classes >= 2, got {num_examples}, {num_classes}")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype must be floating, got {dtype}")
  return PSKDState(jnp.zeros((int(num_examples), int(num_classes)), dtype),
                   jnp.zeros((int(num_examples),), bool))


def alpha(epoch, *, num_epochs: int, alpha_T: float = 0.8) -> jax.Array:
  """alpha_t = alpha_T (t + 1) / T (clipped at 0 below, as in the reference)."""
  if int(num_epochs) < 1:
    raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
  if not 0.0 <= alpha_T <= 1.0:
    raise ValueError(f"alpha_T must be in [0, 1], got {alpha_T}")
  return jnp.maximum(alpha_T * (jnp.asarray(epoch, jnp.float32) + 1.0) / num_epochs, 0.0)


def targets(state: PSKDState, indices, labels, *, epoch, num_epochs: int,
            alpha_T: float = 0.8) -> jax.Array:
  """Soft targets [B, C]: (1 - alpha_t) onehot(y) + alpha_t P[idx], P[idx] = onehot(y) if unseen."""
  indices = jnp.asarray(indices)
  labels = jnp.asarray(labels)
  if indices.shape != labels.shape or indices.ndim != 1:
    raise ValueError(f"indices {indices.shape} and labels {labels.shape} must be equal-length vectors")
  a = alpha(epoch, num_epochs=num_epochs, alpha_T=alpha_T).astype(state.predictions.dtype)
  onehot = jax.nn.one_hot(labels, state.predictions.shape[-1], dtype=state.predictions.dtype)
  past = jnp.where(state.seen[indices][:, None], state.predictions[indices], onehot)
  return (1.0 - a) * onehot + a * past


def store(state: PSKDState, indices, logits, valid=None) -> PSKDState:
  """P[idx] <- softmax(logits) (gradient stopped). ``valid`` (bool [B]) drops padded rows."""
  indices = jnp.asarray(indices)
  logits = jnp.asarray(logits)
  if logits.shape != (indices.shape[0], state.predictions.shape[-1]):
    raise ValueError(f"logits must have shape [{indices.shape[0]}, {state.predictions.shape[-1]}], "
                     f"got {logits.shape}")
  probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
  if valid is not None:   # out-of-range index -> the scatter drops the row
    indices = jnp.where(jnp.asarray(valid), indices, state.predictions.shape[0])
  return PSKDState(state.predictions.at[indices].set(probs.astype(state.predictions.dtype), mode="drop"),
                   state.seen.at[indices].set(True, mode="drop"))


def targets_fn(*, num_epochs: int, alpha_T: float = 0.8, name: str = "pskd",
               ) -> Callable[[jax.Array, Any, Any], jax.Array]:
  """PS-KD soft targets for ``prox.losses.classification_loss(apply, targets_fn=...)``.

  Returns ``fn(logits, batch, ctx) -> [B, C]``: :func:`targets` of the store ``ctx.extra[name]`` (the
  predictions written in earlier steps, i.e. the previous epoch's for an example seen once per epoch)
  for the rows ``batch["index"]`` with labels ``batch["label"]`` at epoch ``ctx.meta["epoch"]``, in the
  dtype of ``logits``. The loss stops their gradient.
  """
  alpha(0, num_epochs=num_epochs, alpha_T=alpha_T)   # argument checks, at build time

  def fn(logits: jax.Array, batch: Any, ctx: Any) -> jax.Array:
    t = targets(ctx.extra[name], batch["index"], batch["label"], epoch=ctx.meta["epoch"],
                num_epochs=num_epochs, alpha_T=alpha_T)
    return t.astype(logits.dtype)

  return fn


def transition(apply: Callable[..., tuple[jax.Array, Any]], *, name: str = "pskd") -> Callable[[Any, Any], Any]:
  """A ``prox.step`` transition writing the step's predictions into the store ``state.extra[name]``.

  ``P[index_i] <- softmax(apply(w, s, x_i, train=True))`` for the real rows of the step's global batch
  (``info.valid``), with ``w = info.params``, the parameters the step's loss was evaluated at: the
  prediction PS-KD stores is the one of the example's training forward pass. The forward pass is
  recomputed on the whole global batch at the level of the jitted step, so the stored values do not
  depend on how the batch is split over devices and micro-batches (batch norm in training mode
  normalises with the statistics of the whole batch here, not of each micro-batch; its running
  statistics ``s = state.model_state`` are neither used nor changed).

  Args:
    apply: ``apply(params, model_state, images, train=True) -> (logits, model_state)``
      (``prox.models.functional(model).apply``); the batch has ``image`` and ``index``.
    name: the store's key in ``TrainState.extra``.

  Returns:
    ``(state, info) -> state`` (for ``make_train_step(transition=...)``; combine with others with
    ``prox.step.chain_transitions``).
  """

  def fn(state: Any, info: Any) -> Any:
    logits, _ = apply(info.params, state.model_state, info.batch["image"], train=True)
    written = store(state.extra[name], info.batch["index"], logits, info.valid)
    return state._replace(extra={**state.extra, name: written})

  return fn


def ece(probs, labels, num_bins: int = 15) -> jax.Array:
  """Expected calibration error (Guo et al. 2017): with confidence c_n = max_k p_nk, prediction
  argmax_k p_nk and equal-width bins B_m = ((m-1)/M, m/M],
      ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|."""
  probs = jnp.asarray(probs)
  labels = jnp.asarray(labels)
  if probs.ndim != 2 or labels.shape != probs.shape[:1]:
    raise ValueError(f"probs must be [N, C] and labels [N], got {probs.shape} and {labels.shape}")
  if int(num_bins) < 1:
    raise ValueError(f"num_bins must be >= 1, got {num_bins}")
  conf = jnp.max(probs, axis=-1).astype(jnp.float32)
  correct = (jnp.argmax(probs, axis=-1) == labels).astype(jnp.float32)
  bins = jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  count = jnp.zeros((num_bins,)).at[bins].add(1.0)
  conf_sum = jnp.zeros((num_bins,)).at[bins].add(conf)
  acc_sum = jnp.zeros((num_bins,)).at[bins].add(correct)
  return jnp.sum(jnp.abs(acc_sum - conf_sum)) / probs.shape[0]


class PSKDStore(NamedTuple):
  """The PS-KD store in prox's state-machine convention: ``init()``, ``targets(state, indices, labels,
  epoch)``, ``write(state, indices, logits, valid=None)``, and the pieces for ``prox.step``:
  ``targets_fn`` (for ``classification_loss(apply, targets_fn=...)``) and ``transition(apply)``."""
  init: Callable[[], PSKDState]
  targets: Callable[..., jax.Array]
  write: Callable[..., PSKDState]
  targets_fn: Callable[[jax.Array, Any, Any], jax.Array]
  transition: Callable[[Callable], Callable[[Any, Any], Any]]


def pskd_store(num_examples: int, num_classes: int, *, num_epochs: int, alpha_T: float = 0.8,
               name: str = "pskd", dtype=jnp.float32) -> PSKDStore:
  """PS-KD (Kim et al. 2021) for ``num_examples`` examples over ``num_epochs``, the store kept in
  ``TrainState.extra[name]``; options checked now."""
  fn = targets_fn(num_epochs=num_epochs, alpha_T=alpha_T, name=name)
  return PSKDStore(
      init=lambda: init(num_examples, num_classes, dtype),
      targets=lambda state, indices, labels, epoch: targets(state, indices, labels, epoch=epoch,
                                                            num_epochs=num_epochs, alpha_T=alpha_T),
      write=store, targets_fn=fn, transition=lambda apply: transition(apply, name=name))
