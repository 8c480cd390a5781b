"""The adaptive batch-size controller of AdAdaGrad as one state machine (Lau, Liu, Kolar 2024).

``adaptive_batch_size(test, b0=..., b_max=..., multiple_of=...)`` returns a
:class:`BatchSizeController`, a NamedTuple of pure functions like an optax ``GradientTransformation``:

* ``init() -> ControllerState``: batch size ``b0`` and the test's constants (traced, so runs that
  differ only in ``eta``/``theta``/``nu`` share compiled steps);
* ``requested(state, info) -> b'``: the batch size the test asks for, from the step's statistics;
* ``update(state, info) -> state``: ``b <- min(max(b, round_up(ceil(b'), r)), b_max)``
  (``batch_size_update``); the batch size never decreases;
* ``step_options``: the ``prox.step.make_train_step`` options the test needs.

``info`` is anything with the fields of ``prox.step.StepInfo`` the test reads (``grads``,
``grad_stats``, ``group_stats``, ``example_stats``, ``opt_state``). In a step::

    ctrl = adaptive_batch_size("norm", b0=32, b_max=4096, multiple_of=4)
    step = make_train_step(loss, tx, **ctrl.step_options,
                           transition=in_extra("batch_size", ctrl.update))
    loop.run(step, state, source, batch_size=lambda s: int(s.extra["batch_size"].size.batch_size), ...)

Estimators. ``estimator="examples"`` (default) computes each test exactly, from per-example gradient
moments taken from layer taps in the same backward pass (``prox.taps``; no micro-batches of a few
examples needed). ``estimator="groups"`` is the older
estimate from the gradients of groups of ``group_size`` examples (micro-batches x devices),
``Var_i(G_i) ~= n Var_k(g_k)``, which works for any model (batch norm, untapped layers) but needs the
micro-batch loop (see ``prox.optim.batch_tests``).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from prox.optim import adagrad as adagrad_lib
from prox.optim import batch_size as batch_size_lib
from prox.optim import batch_tests as tests_lib

TESTS = ("norm", "inner_product", "orthogonality", "augmented", "coordinate")
_GROUP_TESTS = ("inner_product", "orthogonality", "augmented")


class ControllerState(NamedTuple):
  """``size``: the ``BatchSizeState``; ``constants``: the test's ``eta``, ``theta``, ``nu`` (float32)."""
  size: batch_size_lib.BatchSizeState
  constants: dict[str, jax.Array]


class BatchSizeController(NamedTuple):
  init: Callable[[], ControllerState]
  requested: Callable[[ControllerState, Any], jax.Array]
  update: Callable[[ControllerState, Any], ControllerState]
  step_options: dict[str, Any]


def adaptive_batch_size(
    test: str,
    *,
    b0: int,
    b_max: int,
    multiple_of: int = 1,
    eta: float = 0.1,
    theta: float = 0.1,
    nu: float = 0.1,
    estimator: str = "examples",
    example_groups: int | None = None,
    per_tensor: bool = False,
    adagrad_eps: float = 1e-7,
) -> BatchSizeController:
  """The controller of one test of AdAdaGrad.

  Args:
    test: ``"norm"`` (``b' = sum_j Var_i(G_ij) / (eta^2 S)``), ``"inner_product"`` (``Var_i(<G_i, gbar>) /
      (theta^2 S^2)``), ``"orthogonality"``, ``"augmented"`` (the max of the two) or ``"coordinate"``
      (the norm test weighted by AdaGrad's per-coordinate steps ``1/sqrt(a_j + eps)``, read from the
      optimizer state the step started from); ``S = ||gbar||^2``. See ``prox.optim.batch_tests``.
    b0, b_max, multiple_of: initial and largest batch size, and the granularity (micro-batch x devices).
    eta, theta, nu: the tests' constants (> 0).
    estimator: ``"examples"`` (exact, from layer taps) or ``"groups"`` (micro-batch groups).
    example_groups: with ``estimator="examples"``, convolutions' moments from this many groups of
      examples per micro-batch (``prox.step.make_train_step(example_groups=...)``: their kernel gradients
      cost what the plain gradient costs); dense layers stay exact. ``None``: exact everywhere.
    per_tensor: the reference code's per-tensor inner products (``"groups"`` estimator only).
    adagrad_eps: AdaGrad's epsilon for the coordinate-wise weights.
  """
  if test not in TESTS:
    raise ValueError(f"unknown test {test!r}; known: {', '.join(TESTS)}")
  if estimator not in ("examples", "groups"):
    raise ValueError(f"estimator must be 'examples' or 'groups', got {estimator!r}")
  if per_tensor and estimator == "examples":
    raise ValueError("per_tensor inner products need estimator='groups'")
  if example_groups is not None and (estimator != "examples" or not isinstance(example_groups, int)
                                     or example_groups < 2):
    raise ValueError(f"example_groups must be an integer >= 2 with estimator='examples', got "
                     f"{example_groups!r} (estimator={estimator!r})")
  for name, value in (("eta", eta), ("theta", theta), ("nu", nu)):
    tests_lib._check_constant(name, value)  # pylint: disable=protected-access
  batch_size_lib.batch_size_init(b0, b_max, multiple_of=multiple_of)   # checks the sizes now

  if estimator == "examples":
    needs = {"norm": ("norm",), "coordinate": ("diag",)}.get(test, ("norm", "inner"))
    step_options = {"example_stats": needs}
    if example_groups is not None:
      step_options["example_groups"] = example_groups
  else:
    step_options = {"grad_stats": True}
    if test in _GROUP_TESTS:
      step_options["group_stats_fn"] = lambda g, v, m: tests_lib.group_inner_stats(
          g, m, valid=v, per_tensor=per_tensor)

  def init() -> ControllerState:
    return ControllerState(
        size=batch_size_lib.batch_size_init(b0, b_max, multiple_of=multiple_of),
        constants={k: jnp.asarray(v, jnp.float32) for k, v in (("eta", eta), ("theta", theta), ("nu", nu))})

  def requested(state: ControllerState, info: Any) -> jax.Array:
    c = state.constants
    if estimator == "examples":
      ex, mean = info.example_stats, info.grads
      if test == "norm":
        return tests_lib.norm_test_from_examples(ex, mean, c["eta"])
      if test == "inner_product":
        return tests_lib.inner_product_test_from_examples(ex, mean, c["theta"])
      if test == "orthogonality":
        return tests_lib.orthogonality_test_from_examples(ex, mean, c["nu"])
      if test == "augmented":
        return tests_lib.augmented_inner_product_test_from_examples(ex, mean, c["theta"], c["nu"])
      step = adagrad_lib.adagrad_step_size(info.opt_state, eps=adagrad_eps)
      return tests_lib.coordinate_wise_test_from_examples(ex, mean, step, c["eta"])
    stats, inner = info.grad_stats, info.group_stats
    if test == "norm":
      return tests_lib.norm_test_from_stats(stats, c["eta"])
    if test == "inner_product":
      return tests_lib.inner_product_test_from_stats(stats, inner, c["theta"], per_tensor=per_tensor)
    if test == "orthogonality":
      return tests_lib.orthogonality_test_from_stats(stats, inner, c["nu"], per_tensor=per_tensor)
    if test == "augmented":
      return tests_lib.augmented_inner_product_test_from_stats(stats, inner, c["theta"], c["nu"],
                                                               per_tensor=per_tensor)
    step = adagrad_lib.adagrad_step_size(info.opt_state, eps=adagrad_eps)
    return tests_lib.coordinate_wise_test_from_stats(stats, step, c["eta"])

  def update(state: ControllerState, info: Any) -> ControllerState:
    return state._replace(size=batch_size_lib.batch_size_update(state.size, requested(state, info)))

  return BatchSizeController(init, requested, update, step_options)
