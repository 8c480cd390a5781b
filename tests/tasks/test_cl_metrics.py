"""Tests for prox.tasks.cl_metrics against hand-computed values."""
import jax
import numpy as np
import pytest

from prox.tasks import cl_metrics as M

R = np.array([[0.90, 0.10, 0.20],
              [0.95, 0.80, 0.30],
              [0.50, 0.70, 0.95]])


def test_hand_computed_values():
  np.testing.assert_allclose(M.average_accuracy(R), (0.5 + 0.7 + 0.95) / 3, rtol=1e-6)
  np.testing.assert_allclose(M.average_accuracy(R, after_task=1), (0.95 + 0.8) / 2, rtol=1e-6)
  np.testing.assert_allclose(M.average_accuracy_curve(R), [0.9, 0.875, 2.15 / 3], rtol=1e-6)
  # max-based (Chaudhry et al. 2018): task 0 peaked at 0.95 after task 1, is 0.5 now; task 1: 0.8 -> 0.7
  np.testing.assert_allclose(M.forgetting_per_task(R), [0.45, 0.1], rtol=1e-6)
  np.testing.assert_allclose(M.forgetting(R), 0.275, rtol=1e-6)
  # Avalanche (initial = accuracy right after learning the task): 0.9 -> 0.5, 0.8 -> 0.7
  np.testing.assert_allclose(M.forgetting_per_task(R, "initial"), [0.4, 0.1], rtol=1e-6)
  np.testing.assert_allclose(M.backward_transfer(R), ((0.5 - 0.9) + (0.7 - 0.8)) / 2, rtol=1e-6)
  b = np.array([0.1, 0.1, 0.1])
  np.testing.assert_allclose(M.forward_transfer(R, b), ((0.1 - 0.1) + (0.3 - 0.1)) / 2, rtol=1e-6)


def test_relations_on_random_matrices():
  rng = np.random.default_rng(0)
  for t in (1, 2, 5):
    r = rng.uniform(size=(t, t))
    np.testing.assert_allclose(M.backward_transfer(r), -M.forgetting(r, "initial"), atol=1e-6)
    assert float(M.forgetting(r)) >= float(M.forgetting(r, "initial")) - 1e-6
    np.testing.assert_allclose(M.average_accuracy_curve(r)[-1], M.average_accuracy(r), rtol=1e-6)
  one = np.array([[0.7]])
  assert float(M.forgetting(one)) == 0.0 and float(M.backward_transfer(one)) == 0.0
  assert float(M.forward_transfer(one, [0.1])) == 0.0


def test_jit():
  f = jax.jit(lambda r, b: (M.average_accuracy(r), M.forgetting(r), M.backward_transfer(r),
                            M.forward_transfer(r, b)))
  out = f(R, np.zeros(3))
  np.testing.assert_allclose(out[1], 0.275, rtol=1e-6)
  f(R + 0.01, np.zeros(3))
  assert f._cache_size() == 1


def test_bad_input():
  with pytest.raises(ValueError, match=r"must be square \[T, T\], got shape \(2, 3\)"):
    M.average_accuracy(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="after_task must be in"):
    M.average_accuracy(R, after_task=3)
  with pytest.raises(ValueError, match=r"initial_accuracy must have shape \(3,\)"):
    M.forward_transfer(R, [0.1, 0.1])
  with pytest.raises(ValueError, match="reference must be"):
    M.forgetting(R, "first")
