"""The augmented digits stream: prox's jitted JAX warp vs the same augmentation in numpy/scipy.

Both produce a batch of randomly shifted (+-1 px), rotated (+-10 deg), scaled (0.9-1.1) and noised 8x8
digits from the 1,347 training images (bilinear interpolation, constant background):

  jax     prox.tasks.data.next_stream_batch: one jitted function on the host CPU (per-sample keys from
          jax.random.fold_in, vmapped jax.scipy.ndimage.map_coordinates), including host gathers and
          transfers; compiled once per power-of-two batch bucket (warm-up excluded).
  scipy   numpy random numbers + ONE batched scipy.ndimage.map_coordinates call over [B, 8, 8]
          (integer batch coordinate, so no mixing between images), the fastest scipy form we found.
  loop    scipy.ndimage.affine_transform called per image (the textbook form), for reference.

Prints the median time per batch of each and the ratios scipy/jax and loop/jax (> 1: jax is faster).
Calls alternate within each repeat so machine noise hits all alike.

  python benchmarks/augment_digits.py [--repeats 15]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import scipy.ndimage as ndi

from prox.tasks import data

SIZES = (64, 512, 4096)


def _draw(ds: data.ArrayDataset, seed: int, position: int, size: int):
  """Source images, rotation angles, scales, shifts, the centre and the rng (for the noise) of a batch."""
  rng = np.random.default_rng([seed, position])
  sources = rng.integers(0, len(ds.labels), size)
  angle = np.deg2rad(rng.uniform(-10.0, 10.0, size))
  scale = rng.uniform(0.9, 1.1, size)
  shift = rng.uniform(-1.0, 1.0, (size, 2))
  height, width = ds.images.shape[1:3]
  centre = np.array([(height - 1) / 2.0, (width - 1) / 2.0])
  return sources, angle, scale, shift, centre, rng


def scipy_batched(ds: data.ArrayDataset, seed: int, position: int, size: int) -> np.ndarray:
  """Same augmentation with numpy randomness and one batched map_coordinates call."""
  sources, angle, scale, shift, centre, rng = _draw(ds, seed, position, size)
  height, width = ds.images.shape[1:3]
  grid = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"), -1) - centre
  out = grid[None] - shift[:, None, None, :]                     # [B, H, W, 2]
  cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
  in_y = (cos * out[..., 0] + sin * out[..., 1]) / scale[:, None, None] + centre[0]
  in_x = (-sin * out[..., 0] + cos * out[..., 1]) / scale[:, None, None] + centre[1]
  batch_index = np.broadcast_to(np.arange(size)[:, None, None], in_y.shape)
  warped = ndi.map_coordinates(ds.images[sources, :, :, 0], [batch_index, in_y, in_x], order=1,
                               mode="constant", cval=float(ds.images.min()))
  noisy = warped + 0.1 * rng.standard_normal(warped.shape)
  return noisy[..., None].astype(np.float32)


def scipy_loop(ds: data.ArrayDataset, seed: int, position: int, size: int) -> np.ndarray:
  """Same augmentation with scipy.ndimage.affine_transform per image."""
  sources, angle, scale, shift, centre, rng = _draw(ds, seed, position, size)
  height, width = ds.images.shape[1:3]
  background = float(ds.images.min())
  out = np.empty((size, height, width), np.float32)
  for i in range(size):
    cos, sin = np.cos(angle[i]), np.sin(angle[i])
    matrix = np.array([[cos, sin], [-sin, cos]]) / scale[i]     # input = matrix @ output + offset
    offset = centre - matrix @ (centre + shift[i])
    out[i] = ndi.affine_transform(ds.images[sources[i], :, :, 0], matrix, offset=offset, order=1,
                                  mode="constant", cval=background)
  out += 0.1 * rng.standard_normal(out.shape).astype(np.float32)
  return out[..., None]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args()
  ds = data.load("digits", "train")
  print(f"{'batch':>6} {'jax ms':>9} {'scipy ms':>9} {'loop ms':>9} {'scipy/jax':>10} {'loop/jax':>9}")
  for size in SIZES:
    fns = {
        "jax": lambda pos, size=size: data.next_stream_batch(ds, data.StreamState(0, pos), size),
        "scipy": lambda pos, size=size: scipy_batched(ds, 0, pos, size),
        "loop": lambda pos, size=size: scipy_loop(ds, 0, pos, size),
    }
    for fn in fns.values():  # warm-up (compiles the jax bucket)
      fn(0)
    times = {name: [] for name in fns}
    for rep in range(args.repeats):
      for name, fn in fns.items():
        start = time.perf_counter()
        fn((rep + 1) * size)
        times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"{size:>6} {med['jax']:>9.3f} {med['scipy']:>9.3f} {med['loop']:>9.3f} "
          f"{med['scipy'] / med['jax']:>10.2f} {med['loop'] / med['jax']:>9.2f}")


if __name__ == "__main__":
  main()
