"""MNIST-1D: the standard split (cached on disk) and a vectorised generator of fresh samples.

MNIST-1D (Greydanus and Kobak 2024, "Scaling Down Deep Learning with MNIST-1D", ICML; the ``mnist1d``
package, Apache-2.0) turns each of ten hand-made 1-D digit templates ``T_y`` (12 points) into a noisy
sequence of 40 values. With the package's default arguments, one sample of class ``y`` is

    a   = lerp_{12+p -> 72}([T_y + 1e-8, 0_p])           p ~ U{36, ..., 60} zeros appended, dilated to 72
    a   = a * (1 + 0.4 (u_s - 1/2))                      u_s ~ U[0, 1)
    a   = roll(a, k)                                     k ~ U{0, ..., 47} (circular shift to the right)
    a_i = a_i if a_i != 0 else (G_2 * 0.25 z)_i          z ~ N(0, I_72); G_2: Gaussian filter, sigma 2
    a   = a + 0.02 z'                                    z' ~ N(0, I_72)
    a_i = a_i - 0.75 (u_h - 1/2) (i / 71 - 1/2)          u_h ~ U[0, 1) (shear)
    x   = lerp_{72 -> 40}(a)

where ``lerp_{n -> m}`` resamples linearly from ``n`` to ``m`` equispaced points of [0, 1] (as
``np.interp``) and ``G_2`` is ``scipy.ndimage.gaussian_filter`` (reflecting boundary, radius 8). The
package draws 500 samples per class, shuffles them and standardises all 5,000 with their own mean and
standard deviation: ``x' = (x - mean) / std``; the first 4,000 are the train split, the rest the test split.

* :func:`load_split` returns that standard split, generated once by the package's ``make_dataset`` with
  its default arguments (about 2-5 s) and then read from a per-user cache.
* :func:`render` is the same transformation for a whole batch at once, bit for bit the package's result
  for the same random parameters (:class:`SampleParams`); :func:`stream_samples` draws those parameters
  i.i.d. (label uniform on the ten classes) from numpy generators seeded by ``(seed, k // 256)``, so that
  sample ``k`` of a stream depends on ``(seed, k)`` only, and standardises with the standard split's
  constants (``RAW_MEAN``, ``RAW_STD``), so stream samples and the standard split share one scale.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import tempfile
import types
import zipfile
from typing import NamedTuple

import numpy as np

NUM_CLASSES = 10
LENGTH = 40                      # final sequence length
TEMPLATE_LENGTH = 12
PADDING = (36, 60)               # zeros appended to a template, inclusive range
DILATED_LENGTH = TEMPLATE_LENGTH + PADDING[1]  # 72: length after the first resampling
SCALE_COEFF = 0.4
MAX_TRANSLATION = 48
CORR_NOISE_SCALE = 0.25
CORR_NOISE_SIGMA = 2
IID_NOISE_SCALE = 0.02
SHEAR_SCALE = 0.75
TEMPLATE_EPS = 1e-8              # added to a template before padding, so only the padding is exactly 0
STANDARD_SEED = 42
STANDARD_SAMPLES = 5000
STANDARD_TRAIN = 4000

# Mean and standard deviation of the 5,000 raw samples behind the standard split (before its
# standardisation), in the package's (shuffled) order; ``tests/tasks/test_mnist1d.py`` recomputes both.
RAW_MEAN = -0.0055075064312771795
RAW_STD = 0.15467803420593054

CACHE_ENV = "PROX_CACHE_DIR"
_STREAM_TAG = 0x4D4E31  # separates the stream's seed sequences from other users of the same seed
_BLOCK = 256            # samples per independently seeded block of the stream
_CHUNK = 8192           # samples rendered at once by stream_samples


class SampleParams(NamedTuple):
  """The random parameters of a batch of MNIST-1D samples (arrays with a leading batch axis B).

  Attributes:
    label: int [B], the class ``y`` in 0..9.
    padding: int [B], zeros ``p`` appended to the template, in [36, 60].
    scale: float64 [B], ``u_s`` in [0, 1); amplitude factor ``1 + 0.4 (u_s - 1/2)``.
    shift: int [B], circular shift ``k`` to the right, in [0, 48).
    corr_noise: float64 [B, 72], standard normal ``z`` of the correlated background noise.
    iid_noise: float64 [B, 72], standard normal ``z'`` of the i.i.d. noise.
    shear: float64 [B], ``u_h`` in [0, 1); shear slope ``0.75 (u_h - 1/2)``.
  """
  label: np.ndarray
  padding: np.ndarray
  scale: np.ndarray
  shift: np.ndarray
  corr_noise: np.ndarray
  iid_noise: np.ndarray
  shear: np.ndarray


# ---------------------------------------------------------------------------------------------------
# The transformation.


@functools.cache
def templates() -> np.ndarray:
  """The ten digit templates, float64 [10, 12], as the ``mnist1d`` package defines them (read-only)."""
  data = _package_data()
  out = np.array(data.get_templates()["x"], dtype=np.float64)
  out.setflags(write=False)
  return out


class _Resample(NamedTuple):
  """``np.interp`` from ``n`` to ``m`` equispaced points of [0, 1] as a gather: per output point the
  left bracket index ``lo``, the bracket width ``dx`` and the offset from its left end ``off``."""
  lo: np.ndarray
  dx: np.ndarray
  off: np.ndarray


@functools.cache
def _resample_table(n: int, m: int) -> _Resample:
  old = np.linspace(0.0, 1.0, n)
  new = np.linspace(0.0, 1.0, m)
  # np.interp's bracket: old[lo] <= new < old[lo + 1] (the last point is handled by the caller).
  lo = np.clip(np.searchsorted(old, new, side="right") - 1, 0, n - 2)
  return _Resample(lo=lo, dx=old[lo + 1] - old[lo], off=new - old[lo])


def _resample(y: np.ndarray, n: int, m: int) -> np.ndarray:
  """The rows of ``y[:, :n]`` resampled to ``m`` points with ``np.interp``'s operations and rounding:
  ``(y[lo + 1] - y[lo]) / dx * off + y[lo]``, and exactly ``y[n - 1]`` at the right end."""
  table = _resample_table(n, m)
  y_lo, y_hi = y[:, table.lo], y[:, table.lo + 1]
  out = (y_hi - y_lo) / table.dx * table.off + y_lo
  out[:, -1] = y[:, n - 1]
  return out


@functools.cache
def _shifted_templates() -> np.ndarray:
  """Every padded, dilated and shifted template: float64 [10, 25, 48, 72], entry ``[y, p - 36, k]``.

  These three steps depend on ``(y, p, k)`` only (1,200 combinations), so a batch gathers its rows
  instead of resampling; the amplitude factor, an elementwise product, commutes with the shift exactly.
  """
  padded = np.zeros((NUM_CLASSES, DILATED_LENGTH))
  padded[:, :TEMPLATE_LENGTH] = templates() + TEMPLATE_EPS
  dilated = np.stack([_resample(padded, TEMPLATE_LENGTH + p, DILATED_LENGTH)
                      for p in range(PADDING[0], PADDING[1] + 1)], axis=1)  # [10, 25, 72]
  columns = (np.arange(DILATED_LENGTH)[None, :] - np.arange(MAX_TRANSLATION)[:, None]) % DILATED_LENGTH
  out = np.ascontiguousarray(dilated[:, :, columns])  # roll right by k: out[..., k, i] = a[(i - k) % 72]
  out.setflags(write=False)
  return out


@functools.cache
def _shear_ramp() -> np.ndarray:
  return np.linspace(-0.5, 0.5, DILATED_LENGTH)


def render(params: SampleParams) -> np.ndarray:
  """The raw (unstandardised) samples for ``params``: float64 [B, 40].

  Equal, bit for bit, to ``mnist1d.transform.transform`` applied to each template with the same random
  parameters, but computed for the whole batch in a few numpy/scipy calls.
  """
  from scipy.ndimage import gaussian_filter1d  # pylint: disable=g-import-not-at-top

  label, padding, shift = (np.asarray(v) for v in (params.label, params.padding, params.shift))
  x = _shifted_templates()[label, padding - PADDING[0], shift]
  x *= (1 + SCALE_COEFF * (np.asarray(params.scale) - 0.5))[:, None]
  corr = gaussian_filter1d(CORR_NOISE_SCALE * np.asarray(params.corr_noise), CORR_NOISE_SIGMA, axis=-1)
  x = np.where(x != 0, x, corr)  # the background (exactly 0 after padding) becomes correlated noise
  x += IID_NOISE_SCALE * np.asarray(params.iid_noise)
  x -= (SHEAR_SCALE * (np.asarray(params.shear) - 0.5))[:, None] * _shear_ramp()
  return _resample(x, DILATED_LENGTH, LENGTH)


# ---------------------------------------------------------------------------------------------------
# The stream.


def draw(seed: int, positions: np.ndarray) -> SampleParams:
  """The random parameters of stream samples ``positions`` (non-negative ints) for ``seed``.

  Positions fall into blocks of 256; block ``j`` draws all its samples' parameters from
  ``np.random.default_rng([seed, tag, j])`` in one fixed order, so a sample depends on
  ``(seed, position)`` only, not on which other samples are drawn with it.
  """
  positions = np.asarray(positions, dtype=np.int64)
  blocks, offsets = np.divmod(positions, _BLOCK)
  out = SampleParams(
      label=np.empty(len(positions), np.int64), padding=np.empty(len(positions), np.int64),
      scale=np.empty(len(positions)), shift=np.empty(len(positions), np.int64),
      corr_noise=np.empty((len(positions), DILATED_LENGTH)),
      iid_noise=np.empty((len(positions), DILATED_LENGTH)), shear=np.empty(len(positions)))
  order = np.argsort(blocks, kind="stable")
  starts = np.flatnonzero(np.diff(blocks[order], prepend=-1))
  for start, stop in zip(starts, [*starts[1:], len(order)]):
    where = order[start:stop]
    rng = np.random.default_rng([int(seed), _STREAM_TAG, int(blocks[where[0]])])
    whole = SampleParams(
        label=rng.integers(0, NUM_CLASSES, _BLOCK),
        padding=rng.integers(PADDING[0], PADDING[1] + 1, _BLOCK),
        scale=rng.random(_BLOCK),
        shift=rng.integers(0, MAX_TRANSLATION, _BLOCK),
        corr_noise=rng.standard_normal((_BLOCK, DILATED_LENGTH)),
        iid_noise=rng.standard_normal((_BLOCK, DILATED_LENGTH)),
        shear=rng.random(_BLOCK))
    rows = offsets[where]
    for field, part in zip(out, whole):
      field[where] = part[rows]
  return out


def standardise(raw: np.ndarray) -> np.ndarray:
  """``(x - RAW_MEAN) / RAW_STD`` as float32 [B, 40, 1]: the standard split's scale and layout."""
  return ((raw - RAW_MEAN) / RAW_STD).astype(np.float32)[..., None]


def stream_samples(seed: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Fresh samples ``positions`` of the stream ``seed``: float32 [B, 40, 1] and int32 labels [B].

  Works through the positions in chunks of 8,192, so that memory stays bounded for any ``B``.
  """
  positions = np.asarray(positions, dtype=np.int64).reshape(-1)
  images = np.empty((len(positions), LENGTH, 1), np.float32)
  labels = np.empty(len(positions), np.int32)
  for start in range(0, len(positions), _CHUNK):
    params = draw(seed, positions[start:start + _CHUNK])
    images[start:start + _CHUNK] = standardise(render(params))
    labels[start:start + _CHUNK] = params.label
  return images, labels


# ---------------------------------------------------------------------------------------------------
# The standard split.


def cache_dir() -> str:
  """``$PROX_CACHE_DIR``, else ``$XDG_CACHE_HOME/prox``, else ``~/.cache/prox``."""
  if os.environ.get(CACHE_ENV):
    return os.path.expanduser(os.environ[CACHE_ENV])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "prox")


def cache_path() -> str:
  """The cache file of the standard split for the installed ``mnist1d`` version."""
  return os.path.join(cache_dir(), f"mnist1d-{_package_version()}-standard.npz")


_ARRAYS = {"x": (STANDARD_TRAIN, LENGTH), "y": (STANDARD_TRAIN,),
           "x_test": (STANDARD_SAMPLES - STANDARD_TRAIN, LENGTH),
           "y_test": (STANDARD_SAMPLES - STANDARD_TRAIN,)}


def standard_arrays() -> dict[str, np.ndarray]:
  """The package's ``make_dataset()`` arrays ``x, y, x_test, y_test`` (float64, int64), from the cache
  when it holds them, else generated (then written to the cache atomically)."""
  path = cache_path()
  try:
    with np.load(path) as stored:
      arrays = {k: stored[k] for k in _ARRAYS}
    if all(arrays[k].shape == shape for k, shape in _ARRAYS.items()):
      return arrays
  except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
    pass  # absent, damaged or from another layout: generate it again
  arrays = _generate_standard()
  _write_atomic(path, arrays)
  return arrays


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """The standard ``"train"`` (4,000) or ``"test"`` (1,000) split: float32 [N, 40, 1], int32 [N]."""
  if split not in ("train", "test"):
    raise ValueError(f"mnist1d has splits 'train' and 'test', got {split!r}")
  arrays = standard_arrays()
  x, y = (arrays["x"], arrays["y"]) if split == "train" else (arrays["x_test"], arrays["y_test"])
  return x.astype(np.float32)[..., None], y.astype(np.int32)


def _generate_standard() -> dict[str, np.ndarray]:
  data = _package_data()
  dataset = data.make_dataset(data.get_dataset_args())
  return {k: np.asarray(dataset[k]) for k in _ARRAYS}


def _write_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes ``arrays`` as ``.npz`` to a temporary file next to ``path`` and renames it into place, so a
  reader never sees a partial file (concurrent writers write identical content; the last rename wins)."""
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  handle, tmp = tempfile.mkstemp(prefix=".mnist1d-", suffix=".npz.tmp", dir=directory)
  try:
    with os.fdopen(handle, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _package_version() -> str:
  try:
    return importlib.metadata.version("mnist1d")
  except importlib.metadata.PackageNotFoundError:
    raise ValueError("dataset 'mnist1d' needs the mnist1d package: pip install mnist1d") from None


def _package_data() -> types.ModuleType:
  """``mnist1d.data``, or a ``ValueError`` saying how to install it."""
  _package_version()
  import mnist1d.data  # pylint: disable=g-import-not-at-top
  return mnist1d.data
