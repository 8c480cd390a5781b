"""Task streams for continual learning: split, permuted and SCoLe, over any ``ArrayDataset``.

A stream is a deterministic function of ``(dataset, arguments, seed)``: task ``t`` is built from its own
generator ``np.random.default_rng((seed, t))``, so any task can be rebuilt on its own and the *stream
position* that goes into a checkpoint is the plain ``int`` task index ``t`` (resume with ``tasks[t:]`` or
``scole_task(..., index=t)``).

Tasks do not copy the dataset: a ``TaskData`` holds the base ``ArrayDataset`` (shared by every task), an
index array into it and, for permuted tasks, the pixel permutation. ``TaskData.take(idx)`` gathers one
batch; ``TaskData.materialize()`` builds the task's own ``ArrayDataset`` (one task at a time), which the data
layer's loaders (``prox.tasks.data.next_batch``, ``epoch_batches``) take as they are.

* Split (van de Ven & Tolias 2019, "split MNIST"): the classes are cut into consecutive groups of
  ``classes_per_task``; task ``t`` holds the examples of group ``t``; its logit mask marks the group
  (use it for task-incremental evaluation, ignore it for class-incremental).
* Permuted (Goodfellow et al. 2013; Kirkpatrick et al. 2017): every task uses all examples with one fixed
  random permutation of the ``H*W`` pixel positions (the same for every channel); all logits are live.
* SCoLe (Lesort et al. 2022, "Scaling the number of tasks in continual learning"): a long sequence of
  tasks, each of ``classes_per_task`` classes drawn at random without replacement within the task (so
  classes reoccur across tasks), optionally with skewed class frequencies; the logits of the classes absent
  from the task are masked during training (``mask_logits``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The data layer's ``prox.tasks.data.ArrayDataset``: a NamedTuple (images [N, H, W, C] float32, labels [N]
# int32, num_classes, name). Only its fields and ``_replace`` are used here, so any NamedTuple with those
# fields works.
ArrayDataset = Any


@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
  """A view of one task's examples: ``base`` is shared, ``indices`` select examples, ``permutation`` (or
  ``None``) reorders the ``H*W`` pixel positions of every image.

  Attributes:
    base: the full ``ArrayDataset`` (never copied).
    indices: int32 ``[n]`` indices into ``base``.
    permutation: int32 ``[H*W]`` pixel permutation, or ``None``.
    name: a readable name, e.g. ``"digits/split3"``.
  """
  base: ArrayDataset
  indices: np.ndarray
  permutation: np.ndarray | None = None
  name: str = ""

  def __len__(self) -> int:
    return int(self.indices.shape[0])

  @property
  def labels(self) -> np.ndarray:
    """int32 ``[n]`` labels of the task's examples (a small gather; images are not touched)."""
    return np.asarray(self.base.labels)[self.indices]

  @property
  def num_classes(self) -> int:
    return int(self.base.num_classes)

  def take(self, idx: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of the task's examples ``idx`` (positions within the task), permuted if needed."""
    rows = self.indices[idx]
    images = np.asarray(self.base.images)[rows]
    if self.permutation is not None:
      images = permute_pixels(images, self.permutation)
    return images, np.asarray(self.base.labels)[rows]

  def materialize(self) -> ArrayDataset:
    """The task as its own ``ArrayDataset`` (same type as ``base``); copies only this task's examples."""
    images, labels = self.take(slice(None))
    return self.base._replace(images=images, labels=labels, name=self.name or self.base.name)


class Task(NamedTuple):
  """One task of a stream.

  Attributes:
    train: the task's training examples.
    test: the task's test examples.
    classes: the classes present in the task, sorted.
    logit_mask: bool ``[num_classes]``, True for the classes present in the task.
    index: the task's position in its stream (the int that goes into a checkpoint).
  """
  train: TaskData
  test: TaskData
  classes: tuple[int, ...]
  logit_mask: np.ndarray
  index: int


def permute_pixels(images: np.ndarray, permutation: np.ndarray) -> np.ndarray:
  """Reorder the pixel positions of ``images`` ``[N, H, W, C]``: ``out[n].flat_hw[k] = images[n].flat_hw[perm[k]]``."""
  n, h, w, c = images.shape
  if permutation.shape != (h * w,):
    raise ValueError(f"permutation must have shape ({h * w},) for {h}x{w} images, got {permutation.shape}")
  return images.reshape(n, h * w, c)[:, permutation].reshape(n, h, w, c)


@jax.jit
def mask_logits(logits: jnp.ndarray, logit_mask: jnp.ndarray | np.ndarray) -> jnp.ndarray:
  """Absent-class masking: ``logits`` where ``logit_mask`` else the most negative finite value of the dtype.

  A finite fill (not ``-inf``) keeps ``softmax``/``log_softmax`` and their gradients NaN-free; the masked
  classes get probability exactly 0 after ``softmax`` in float32 and bfloat16.
  """
  logits = jnp.asarray(logits)
  fill = jnp.finfo(logits.dtype).min
  return jnp.where(jnp.asarray(logit_mask, bool), logits, fill)


def _check_dataset(name: str, ds: ArrayDataset) -> None:
  for field in ("images", "labels", "num_classes", "name"):
    if not hasattr(ds, field):
      raise TypeError(f"{name} must be an ArrayDataset (images, labels, num_classes, name); missing {field!r}")
  if np.ndim(ds.images) != 4:
    raise ValueError(f"{name}.images must be [N, H, W, C], got shape {np.shape(ds.images)}")
  if np.shape(ds.labels) != (np.shape(ds.images)[0],):
    raise ValueError(f"{name}.labels must be [N] matching images, got shape {np.shape(ds.labels)}")


def _check_pair(train: ArrayDataset, test: ArrayDataset) -> int:
  _check_dataset("train", train)
  _check_dataset("test", test)
  if int(train.num_classes) != int(test.num_classes):
    raise ValueError(f"train and test num_classes differ: {train.num_classes} vs {test.num_classes}")
  if np.shape(train.images)[1:] != np.shape(test.images)[1:]:
    raise ValueError(f"train and test image shapes differ: {np.shape(train.images)[1:]} vs "
                     f"{np.shape(test.images)[1:]}")
  return int(train.num_classes)


def _class_indices(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
  return np.flatnonzero(np.isin(np.asarray(labels), np.asarray(classes))).astype(np.int32)


def _mask(classes: Sequence[int], num_classes: int) -> np.ndarray:
  m = np.zeros((num_classes,), bool)
  m[list(classes)] = True
  return m


def split_tasks(
    train: ArrayDataset,
    test: ArrayDataset,
    classes_per_task: int,
    *,
    class_order: Sequence[int] | None = None,
) -> list[Task]:
  """Split a dataset into ``num_classes // classes_per_task`` tasks of disjoint classes.

  Task ``t`` holds classes ``order[t*k:(t+1)*k]`` (``k = classes_per_task``, ``order = class_order`` or
  ``0..C-1``), e.g. split digits with ``k = 2``: ``{0,1}, {2,3}, ..., {8,9}``. ``C`` must be divisible by ``k``.
  """
  c = _check_pair(train, test)
  if not isinstance(classes_per_task, (int, np.integer)) or not 1 <= classes_per_task <= c:
    raise ValueError(f"classes_per_task must be an int in [1, {c}], got {classes_per_task!r}")
  if c % classes_per_task:
    raise ValueError(f"num_classes={c} is not divisible by classes_per_task={classes_per_task}")
  order = np.arange(c) if class_order is None else np.asarray(class_order)
  if sorted(order.tolist()) != list(range(c)):
    raise ValueError(f"class_order must be a permutation of 0..{c - 1}, got {list(order)}")
  tasks = []
  for t in range(c // classes_per_task):
    classes = tuple(sorted(int(x) for x in order[t * classes_per_task:(t + 1) * classes_per_task]))
    tasks.append(Task(
        train=TaskData(train, _class_indices(train.labels, classes), None, f"{train.name}/split{t}"),
        test=TaskData(test, _class_indices(test.labels, classes), None, f"{test.name}/split{t}"),
        classes=classes, logit_mask=_mask(classes, c), index=t))
  return tasks


def pixel_permutation(num_pixels: int, seed: int, index: int) -> np.ndarray:
  """The pixel permutation of permuted task ``index``: ``default_rng((seed, index)).permutation(num_pixels)``."""
  return np.random.default_rng((seed, index)).permutation(num_pixels).astype(np.int32)


def permuted_tasks(
    train: ArrayDataset,
    test: ArrayDataset,
    num_tasks: int,
    seed: int,
    *,
    first_identity: bool = False,
) -> list[Task]:
  """``num_tasks`` tasks over all examples, task ``t`` with its own seeded pixel permutation.

  ``first_identity=True`` makes task 0 the unpermuted dataset (a common variant); otherwise every task's
  permutation is drawn from ``default_rng((seed, t))``. All classes are present in every task.
  """
  c = _check_pair(train, test)
  if not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
    raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
  _, h, w, _ = np.shape(train.images)
  all_train = np.arange(np.shape(train.images)[0], dtype=np.int32)
  all_test = np.arange(np.shape(test.images)[0], dtype=np.int32)
  classes = tuple(range(c))
  tasks = []
  for t in range(num_tasks):
    perm = None if (first_identity and t == 0) else pixel_permutation(h * w, seed, t)
    tasks.append(Task(
        train=TaskData(train, all_train, perm, f"{train.name}/perm{t}"),
        test=TaskData(test, all_test, perm, f"{test.name}/perm{t}"),
        classes=classes, logit_mask=np.ones((c,), bool), index=t))
  return tasks


def scole_class_probs(num_classes: int, skew: float = 0.0) -> np.ndarray:
  """Class-drawing probabilities ``p_c ∝ (c + 1) ** -skew``: uniform for ``skew = 0``, class 0 most frequent
  for ``skew > 0`` (a Zipf-like long tail, the "unbalanced" SCoLe setting)."""
  if not np.isfinite(skew) or skew < 0:
    raise ValueError(f"skew must be a finite number >= 0, got {skew!r}")
  p = (np.arange(num_classes) + 1.0) ** -float(skew)
  return p / p.sum()


def scole_task(
    train: ArrayDataset,
    test: ArrayDataset,
    index: int,
    *,
    classes_per_task: int = 2,
    seed: int = 0,
    skew: float = 0.0,
    class_probs: np.ndarray | None = None,
    examples_per_class: int | None = None,
) -> Task:
  """Task ``index`` of a SCoLe stream, built on its own from ``default_rng((seed, index))``.

  The task's classes are ``classes_per_task`` distinct classes drawn with probabilities ``class_probs``
  (default ``scole_class_probs(C, skew)``); its training set holds all training examples of those classes,
  or ``examples_per_class`` of each drawn without replacement (a fresh draw per task, so a reoccurring class
  brings different examples); its test set holds all test examples of those classes.
  """
  c = _check_pair(train, test)
  if not isinstance(classes_per_task, (int, np.integer)) or not 1 <= classes_per_task <= c:
    raise ValueError(f"classes_per_task must be an int in [1, {c}], got {classes_per_task!r}")
  if not isinstance(index, (int, np.integer)) or index < 0:
    raise ValueError(f"index must be an int >= 0, got {index!r}")
  if class_probs is None:
    p = scole_class_probs(c, skew)
  else:
    p = np.asarray(class_probs, np.float64)
    if p.shape != (c,) or np.any(p < 0) or not np.isfinite(p).all() or p.sum() <= 0:
      raise ValueError(f"class_probs must be {c} non-negative finite numbers with a positive sum, got {p}")
    p = p / p.sum()
  if np.count_nonzero(p) < classes_per_task:
    raise ValueError(f"only {np.count_nonzero(p)} classes have non-zero probability, "
                     f"fewer than classes_per_task={classes_per_task}")
  if examples_per_class is not None and (not isinstance(examples_per_class, (int, np.integer))
                                         or examples_per_class < 1):
    raise ValueError(f"examples_per_class must be a positive int or None, got {examples_per_class!r}")
  rng = np.random.default_rng((seed, index))
  classes = tuple(sorted(int(x) for x in rng.choice(c, size=classes_per_task, replace=False, p=p)))
  labels = np.asarray(train.labels)
  if examples_per_class is None:
    train_idx = _class_indices(labels, classes)
  else:
    parts = []
    for k in classes:
      pool = np.flatnonzero(labels == k)
      parts.append(rng.choice(pool, size=min(examples_per_class, pool.size), replace=False))
    train_idx = np.sort(np.concatenate(parts)).astype(np.int32)
  return Task(
      train=TaskData(train, train_idx, None, f"{train.name}/scole{index}"),
      test=TaskData(test, _class_indices(test.labels, classes), None, f"{test.name}/scole{index}"),
      classes=classes, logit_mask=_mask(classes, c), index=int(index))


def scole_tasks(
    train: ArrayDataset,
    test: ArrayDataset,
    num_tasks: int,
    classes_per_task: int = 2,
    seed: int = 0,
    *,
    skew: float = 0.0,
    class_probs: np.ndarray | None = None,
    examples_per_class: int | None = None,
) -> list[Task]:
  """The first ``num_tasks`` tasks of a SCoLe stream: ``[scole_task(..., index=t) for t in range(num_tasks)]``.

  Each task holds only index arrays (no image copies), so hundreds of tasks are cheap.
  """
  if not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
    raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
  return [scole_task(train, test, t, classes_per_task=classes_per_task, seed=seed, skew=skew,
                     class_probs=class_probs, examples_per_class=examples_per_class)
          for t in range(num_tasks)]


def class_occurrences(tasks: Sequence[Task], num_classes: int) -> np.ndarray:
  """int ``[num_classes]``: in how many of ``tasks`` each class appears (reoccurrence counts for SCoLe)."""
  counts = np.zeros((num_classes,), np.int64)
  for task in tasks:
    counts[list(task.classes)] += 1
  return counts

