"""The `nm_sparsity` experiment: a tiny run end to end on the one loop, exact N:M sparsity of the evaluated
weights, the logged schedules against their formulas, one compiled step per (method, N:M), restart through
run_once, the paired comparisons, quick mode through main, and bad config values as one-line CLI errors."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from prox import checkpoint as ckpt_lib
from prox import step as step_lib
from prox.experiments import common
from prox.experiments import nm_sparsity as exp
from prox.experiments import report
from prox.experiments.configs import nm_sparsity as nm_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "prox" / "experiments" / "configs" / "nm_sparsity.py"
METHODS = ("dense", "srste", "mdgf_linear", "mdgf_exp", "sdgf_stepwise")
STEPS = 40          # QUICK: 40 steps, 20% hard-mask fine-tune -> a sparse phase of 32 steps
SPARSE = 32


def _quick(**fields) -> ml_collections.ConfigDict:
  """The default config with ``QUICK`` applied (as main does for --config.quick=True), then ``fields``."""
  cfg = nm_config.get_config()
  cfg.update_from_flattened_dict(exp.QUICK)
  cfg.progress = False
  for k, v in fields.items():
    cfg[k] = v
  return cfg


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("nm_quick"))
  cfg = _quick(sparsities="1:8", schedule_plot="last", keep_run_checkpoints=True)
  summary = exp.run(cfg, workdir)
  return cfg, workdir, summary


def test_quick_run_writes_table_plots_and_every_run(quick_run):
  cfg, workdir, summary = quick_run
  assert summary["runs"] == len(METHODS) * 2    # 2 seeds in quick mode
  for name in ("results.md", "results.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  for name in ("accuracy_vs_sparsity.png", "schedules.png"):
    assert Path(workdir, name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  data = json.loads(Path(workdir, "results.json").read_text())
  table = data["table"]["mlp"]
  assert set(table) == set(METHODS)
  assert set(table["dense"]) == {"dense"} and all(set(table[m]) == {"1:8"} for m in METHODS[1:])
  for method in METHODS:
    cell = next(iter(table[method].values()))
    assert cell["seeds"] == [0, 1]
    assert cell["mean"] == pytest.approx(np.mean(cell["accuracy"]))
    assert cell["std"] == pytest.approx(np.std(cell["accuracy"], ddof=1))
    assert min(cell["accuracy"]) > 0.2     # 10 classes: above chance after 40 steps
  # True sparsity of the evaluated weights: exactly 7/8 of every sparse leaf, nothing for dense.
  for r in data["runs"]:
    if r["method"] == "dense":
      assert r["eval_sparsity"] < 0.01 and r["beta"] == 1.0
    else:
      assert r["eval_sparsity"] == pytest.approx(0.875, abs=1e-6) and r["beta"] == 0.0
      assert r["mask_density"] == pytest.approx(0.125, abs=1e-6)
  run = Path(exp.run_dir(workdir, "mlp", "srste", (1, 8), 0))
  assert not (run / "curves.png").exists()                      # plot_curves=False in the runs' config
  assert (run / "checkpoints").exists()                          # keep_run_checkpoints=True
  assert json.loads((run / "metrics.json").read_text())["beta"] == 0.0    # state metrics in the final metrics
  record = json.loads((run / "config.json").read_text())          # run_once's record of the run
  assert record["experiment"] == "nm_sparsity"
  assert record["config"]["sparsity"] == {"n": 1, "m": 8, "total_steps": STEPS, "method": "srste",
                                          "srste_lambda": 2e-4, "warmup_steps": 0.0, "finetune_steps": 0.2,
                                          "filter": cfg.sparse_filter}
  md = Path(workdir, "results.md").read_text()
  assert "| srste |" in md and "Decaying gradient flow minus SR-STE" in md
  assert {c["method"] for c in data["comparisons"]} == {"mdgf_linear", "mdgf_exp", "sdgf_stepwise"}
  assert data["schedule_curves"]["nm"] == "1:8"                  # schedule_plot="last"


def test_seeds_of_a_method_and_nm_share_one_compiled_step(quick_run):
  _, workdir, _ = quick_run
  for method, nm in (("dense", None), ("srste", (1, 8)), ("sdgf_stepwise", (1, 8))):
    first, second = (json.loads(Path(exp.run_dir(workdir, "mlp", method, nm, s), "result.json").read_text())
                     for s in (0, 1))
    assert (first["compiles_this_run"], second["compiles_this_run"]) == (1, 0), method
    assert second["compile_seconds_this_run"] == 0.0


def _template(cfg, method, nm, seed):
  rc = exp.run_config(cfg, "mlp", method, nm, seed)
  train_ds, _ = common.load_splits(rc)
  net = common.build_model(rc, train_ds)
  tx = exp.make_tx(rc, method)
  return common.replicated_state(net.params, tx, step_lib.data_mesh(), seed=seed, model_state=net.model_state)


@pytest.mark.parametrize("method", METHODS[1:])
def test_evaluated_weights_are_exactly_n_of_m(quick_run, method):
  cfg, workdir, _ = quick_run
  path = exp.run_dir(workdir, "mlp", method, (1, 8), 0)
  with ckpt_lib.Checkpointer(os.path.join(path, "checkpoints")) as checkpointer:
    state, _ = checkpointer.restore(_template(cfg, method, (1, 8), 0))
  assert int(state.step) == STEPS
  hard = jax.device_get(exp.eval_params(state))
  kernels = {"hidden/dense0": hard["hidden"]["dense0"]["kernel"], "hidden/dense1": hard["hidden"]["dense1"]["kernel"],
             "head": hard["head"]["kernel"]}
  for name, w in kernels.items():
    groups = np.asarray(w).reshape(w.shape[0] // 8, 8, w.shape[1])   # groups of 8 along the input axis
    assert (np.count_nonzero(groups, axis=1) == 1).all(), name
  # The evaluation weights are the dense weights times the hard mask; biases stay dense.
  dense = jax.device_get(state.params)
  np.testing.assert_array_equal(hard["head"]["bias"], dense["head"]["bias"])
  kept = kernels["head"] != 0
  np.testing.assert_array_equal(kernels["head"][kept], np.asarray(dense["head"]["kernel"])[kept])


def _train_records(workdir, method, nm):
  path = os.path.join(exp.run_dir(workdir, "mlp", method, nm, 0), "metrics.jsonl")
  return [r for r in report.read_metrics(path) if r["split"] == "train"]


def test_logged_beta_and_density_follow_the_schedules(quick_run):
  _, workdir, _ = quick_run
  coef = math.log(1e3) / SPARSE   # exp decay reaching the floor 1e-3 at the end of the sparse phase
  stages = (7 / 8, 4 / 8, 2 / 8, 1 / 8)
  for r in _train_records(workdir, "mdgf_linear", (1, 8)):
    assert r["beta"] == pytest.approx(max(0.0, 1 - r["step"] / SPARSE), abs=1e-6)
    assert r["mask_density"] == pytest.approx(0.125, abs=1e-6)
  for r in _train_records(workdir, "mdgf_exp", (1, 8)):
    b = math.exp(-coef * r["step"])
    assert r["beta"] == pytest.approx(b if b >= 1e-3 and r["step"] < SPARSE else 0.0, rel=1e-5, abs=1e-7)
  for r in _train_records(workdir, "sdgf_stepwise", (1, 8)):
    assert r["beta"] == 0.0
    assert r["mask_density"] == pytest.approx(stages[min(r["step"] * 4 // SPARSE, 3)], abs=1e-6)
  for r in _train_records(workdir, "srste", (1, 8)):
    assert r["beta"] == 0.0 and r["mask_density"] == pytest.approx(0.125, abs=1e-6)
    assert r["eval_sparsity"] == pytest.approx(0.875, abs=1e-6)
  # The standard log action: after step 1 and every log_every (5) steps.
  assert [r["step"] for r in _train_records(workdir, "dense", None)] == [1] + list(range(5, STEPS + 1, 5))


def test_restart_skips_finished_runs_and_rejects_a_changed_config(quick_run):
  cfg, workdir, summary = quick_run
  jsonl = os.path.join(exp.run_dir(workdir, "mlp", "srste", (1, 8), 1), "metrics.jsonl")
  before = Path(jsonl).read_text()
  again = exp.run(cfg, workdir)
  assert again["runs"] == summary["runs"] and Path(jsonl).read_text() == before
  assert json.loads(Path(workdir, "results.json").read_text())["table"]["mlp"]["srste"]["1:8"]["accuracy"] == \
      [r["test_accuracy"] for r in (json.loads(Path(exp.run_dir(workdir, "mlp", "srste", (1, 8), s),
                                                   "result.json").read_text()) for s in (0, 1))]
  changed = _quick(sparsities="1:8", srste_lambda=1e-3)
  with pytest.raises(common.ConfigError, match=r"holds a run of nm_sparsity with sparsity.srste_lambda=0.0002 "
                                               r"\(now 0.001\); use a new --workdir or set it back"):
    exp.run(changed, workdir)


@pytest.mark.parametrize("ours, verdict", [([0.93, 0.94, 0.94], "better"), ([0.93, 0.93, 0.95], "no difference"),
                                            ([0.87, 0.90, 0.88], "worse")])
def test_paired_comparison_against_hand_computed_interval(ours, verdict):
  srste = [0.90, 0.92, 0.91]
  results = [{"setting": "s", "method": m, "nm": "1:16", "seed": i, "test_accuracy": a, "eval_sparsity": 0.9375,
              "eval_sparsity_all": 0.9, "beta": 0.0, "seconds": 1.0}
             for m, values in (("srste", srste), ("mdgf_exp", ours)) for i, a in enumerate(values)]
  [c] = exp.comparisons(exp.aggregate(results), ["srste", "mdgf_exp"], ["1:16"])
  d = np.subtract(ours, srste)
  half = 4.302652729911275 * d.std(ddof=1) / math.sqrt(3)   # t_{0.975, 2}
  assert (c["setting"], c["method"], c["nm"], c["num_pairs"]) == ("s", "mdgf_exp", "1:16", 3)
  assert c["diff_mean"] == pytest.approx(d.mean())
  assert c["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
  assert c["verdict"] == verdict
  assert (c["wins"], c["ties"], c["losses"]) == (int((d > 0).sum()), 0, int((d < 0).sum()))


def test_method_names_map_to_library_arguments():
  cfg = nm_config.get_config()
  assert exp.method_kwargs(cfg, "mdgf_exp") == {"method": "mdgf", "decay": "exp", "decay_end": 1.0, "floor": 1e-3}
  assert exp.method_kwargs(cfg, "mdgf_step") == {"method": "mdgf", "decay": "step"}
  assert exp.method_kwargs(cfg, "sdgf_geometric") == {"method": "sdgf", "structure": "geometric"}
  assert exp.method_kwargs(cfg, "srste") == {"method": "srste", "srste_lambda": 2e-4}
  assert exp.parse_sparsities("2:4, 1:32") == [(2, 4), (1, 32)]
  dense = exp.run_config(cfg, "cnn", "dense", None, 3)
  assert (dense.seed, dense.model, dense.num_steps, dense.batch_size) == (3, "cnn", 300, 32)
  assert dense.sparsity.to_dict() == {"n": 1, "m": 2, "total_steps": 300, "filter": cfg.sparse_filter,
                                      "method": "dense"}


def _prox(tmp_path, *overrides):
  cmd = [sys.executable, "-m", "prox.experiments.main", f"--config={CONFIG}", f"--workdir={tmp_path}",
         *overrides]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_LOG_COMPILES": "1"}
  return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)


def test_quick_mode_through_main_trains_the_sparsities_given(tmp_path):
  # main applies QUICK but keeps the fields given on the command line: 4:8 (QUICK says 2:4,1:8) is trained.
  result = _prox(tmp_path, "--config.quick=True", "--config.sparsities=4:8", "--config.methods=srste",
                 "--config.num_seeds=1")
  assert result.returncode == 0, result.stderr[-2000:]
  runs = sorted(p.relative_to(tmp_path / "runs").as_posix() for p in (tmp_path / "runs").rglob("result.json"))
  assert runs == ["mlp/srste/4of8/seed0/result.json"]
  recorded = json.loads((tmp_path / "runs/mlp/srste/4of8/seed0/config.json").read_text())["config"]
  assert recorded["num_steps"] == 40 and recorded["model_kwargs"] == {"hidden": [32, 32]}   # from QUICK
  final = json.loads((tmp_path / "runs/mlp/srste/4of8/seed0/result.json").read_text())
  assert final["eval_sparsity"] == pytest.approx(0.5, abs=1e-6) and final["step"] == 40
  assert "| srste | " in (tmp_path / "results.md").read_text()
  assert json.loads((tmp_path / "results.json").read_text())["schedule_curves"]["nm"] == "4:8"


@pytest.mark.parametrize("override, expected", [
    ("--config.sparsities=2:4,8:8", "srste at 8:8: nm_sparsity: need 1 <= N < M, got N=8, M=8"),
    ("--config.sparsities=1:24", "models.mlp, srste at 1:24: nm_mask: leaf 'head/kernel' with shape (256, 10) "
                                 "has 256 entries along axis 0, not divisible by M=24"),
    ("--config.methods=srste,mdgf_cubic", "mdgf_cubic at 2:4: nm_sparsity: unknown decay type 'cubic'"),
    ("--config.methods=srste,rigl", "methods: unknown method 'rigl'; expected dense, srste, mdgf_<decay>"),
])
def test_bad_config_is_one_line_before_compiling(tmp_path, override, expected):
  result = _prox(tmp_path, override)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("prox: error:")]
  assert len(errors) == 1 and errors[0].startswith("prox: error: " + expected), result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert "Compiling" not in result.stderr     # JAX_LOG_COMPILES: nothing was compiled
  assert not (tmp_path / "runs").exists()


def test_bad_values_found_by_validate(tmp_path):
  with pytest.raises(common.ConfigError, match=r"models.mlp, sdgf_geometric at 1:16: .*not divisible by M=256"):
    exp.validate(_quick(methods="sdgf_geometric", sparsities="1:16", models=nm_config.get_config().models),
                 str(tmp_path))
  with pytest.raises(common.ConfigError, match="sparse_filter 'nothing' selects no parameter of models.mlp"):
    exp.validate(_quick(sparse_filter="nothing"), str(tmp_path))
  with pytest.raises(common.ConfigError, match="warmup_fraction \\+ finetune_fraction must be < 1"):
    exp.validate(_quick(warmup_fraction=0.5, finetune_fraction=0.5), str(tmp_path))
  with pytest.raises(common.ConfigError, match="sparsities: '1-8' is not of the form N:M"):
    exp.validate(_quick(sparsities="1-8"), str(tmp_path))
  with pytest.raises(common.ConfigError, match="schedule_plot '1:16' must be '', 'last' or one of sparsities"):
    exp.validate(_quick(schedule_plot="1:16"), str(tmp_path))
  with pytest.raises(common.ConfigError, match=r"models.mlp: learning_rate must be a finite number in \(0, inf\]"):
    exp.validate(_quick(learning_rate=-1.0), str(tmp_path))
