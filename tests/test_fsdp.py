"""Fully sharded data parallelism: per-device memory and layouts (8 fake devices, in a subprocess)."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np, optax
    from prox import models, step as S

    net = models.functional(models.make_model("mlp", input_shape=(64,), num_classes=10, hidden=(512, 512)))
    tx = optax.adam(1e-3)
    host = S.init_state(net.params, tx)

    def per_device_bytes(state):
      return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))

    data = S.place(host, S.fsdp_mesh(8, 1))
    fsdp = S.place(host, S.fsdp_mesh(1, 8))
    total = sum(np.asarray(x).nbytes for x in jax.tree.leaves((host.params, host.opt_state)))
    a, b = per_device_bytes(data), per_device_bytes(fsdp)
    print("bytes", total, a, b, b / a)
    # Every large leaf is split in 8 along its last axis; only small ones (biases, counters) are whole.
    small = sum(np.asarray(x).nbytes for x in jax.tree.leaves((host.params, host.opt_state))
                if np.size(x) < S.FSDP_MIN_SIZE)
    assert a == total, (a, total)
    assert b == (total - small) // 8 + small, (b, total, small)
    assert abs(b / a - (1 / 8 + 7 / 8 * small / total)) < 1e-9, b / a   # 1/8, plus whole small leaves
    spec = fsdp.params["hidden"]["dense0"]["kernel"].sharding.spec
    assert tuple(spec) == (None, "fsdp"), spec
    print("ok")
""")


def test_per_device_parameter_and_optimizer_bytes_are_an_eighth_on_1_x_8():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr[-3000:]
