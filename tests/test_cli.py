"""The Hydra apps: dartspar-eval, dartspar-search (and its -m sweeps), dartspar-run's front end."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dartspar.cli as cli
import dartspar.execute.launch  # noqa: F401  (monkeypatched below)
from dartspar.cluster import load_cluster
from dartspar.config import CONF_DIR, ConfigError, compose
from dartspar.cost.model import CostModel
from dartspar.execute.report import RunReport
from dartspar.models import build_model
from dartspar.plan import Plan, StageSpec
from dartspar.profile import profile

EXAMPLE_PLAN = CONF_DIR / "plans" / "gpt-small-mixed-small.json"


def _app(entry: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a console entry point as a user would (argv parsed by Hydra)."""
    code = f"import sys; from dartspar.cli import {entry}; sys.exit({entry}())"
    return subprocess.run([sys.executable, "-c", code, *overrides], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _load_experiment(name: str):
    """A script of experiments/ as a module (the folder is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _profile(name: str, config: dict, dtype_bytes: int):
    with torch.device("meta"):
        model = build_model(name, **config)
    return profile(model, model.example_inputs(1, device="meta"), name=name, dtype_bytes=dtype_bytes)


class RecordingLogger:
    """An ExperimentLogger that keeps what it is given."""

    files_dir = None

    def __init__(self) -> None:
        self.metrics, self.images, self.tables, self.artifacts, self.summary = [], [], {}, [], {}
        self.finished = False

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_image(self, key, image, step=None, caption=None):
        self.images.append((key, step, image.shape))

    def log_table(self, key, columns, rows):
        self.tables[key] = (list(columns), [list(r) for r in rows])

    def log_artifact(self, path, name, kind):
        self.artifacts.append((Path(path).name, name, kind))

    def set_summary(self, values):
        self.summary.update(values)

    def finish(self):
        self.finished = True


# ----------------------------------------------------------------------------------- eval
def test_eval_example_plan_prints_the_cost_models_step_time(tmp_path):
    run_dir = tmp_path / "run"
    out = _app("eval_main", f"plan={EXAMPLE_PLAN}", "model=gpt-small", "cluster=mixed-small",
               f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    printed_ms = float(re.search(r"^step time ([0-9.]+) ms", out.stdout, re.M).group(1))

    # The same figure straight from the library, without the app's helpers.
    plan = Plan.from_json(EXAMPLE_PLAN)
    prof = _profile("gpt", plan.meta["model"]["config"], dtype_bytes=2)
    expected = CostModel(prof, load_cluster("mixed-small")).evaluate(plan)
    assert printed_ms == pytest.approx(1e3 * expected.step_time_s, abs=6e-4)
    assert "FITS" in out.stdout and "DOES NOT FIT" not in out.stdout

    written = json.loads((run_dir / "cost.json").read_text())
    assert written["step_time_s"] == pytest.approx(expected.step_time_s, rel=1e-12)
    assert written["fits"] is True and len(written["stages"]) == plan.num_stages
    assert (run_dir / ".hydra" / "config.yaml").exists()


def test_eval_overflowing_plan_says_does_not_fit_and_can_fail(tmp_path, monkeypatch, capsys):
    # gpt-small whole on one T4 (16 GiB) with 64 samples and no recompute: activations overflow.
    plan = Plan(stages=(StageSpec(0, 14, (4,), 1, 1, (False,) * 14),), num_microbatches=1,
                micro_batch_size=64)
    path = tmp_path / "big.json"
    plan.to_json(path)
    cfg = compose("config_eval", [f"plan={path}", "model=gpt-small", "cluster=mixed-small",
                                  "fail_if_not_fits=true"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli._eval_task(cfg)
    assert exit_info.value.code == cli.EXIT_DOES_NOT_FIT
    text = capsys.readouterr().out
    line = next(l for l in text.splitlines() if l.startswith("DOES NOT FIT"))
    assert "stage 0" in line and "T4" in line and "over by" in line
    result = json.loads((tmp_path / "cost.json").read_text())
    assert result["fits"] is False and result["max_overflow_bytes"] > 0


def test_eval_refuses_a_plan_made_for_another_model(tmp_path):
    cfg = compose("config_eval", [f"plan={EXAMPLE_PLAN}", "model=gpt-tiny", "cluster=mixed-small"])
    with pytest.raises(ConfigError, match="pass model=gpt-small"):
        cli.evaluate_app(cfg, tmp_path)


def test_eval_input_errors_exit_2_with_one_line(tmp_path):
    out = _app("eval_main", "plan=missing.json", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert out.returncode == cli.EXIT_INPUT_ERROR
    assert out.stderr.strip().splitlines()[-1].startswith("dartspar-eval: error: plan file")


# --------------------------------------------------------------------------------- search
def test_search_tiny_dp_writes_a_valid_plan_and_compares(tmp_path):
    cfg = compose("config_search", [
        "model=mlp", "cluster=cpu2", "search=dp", "logger=none", "search.progress=false",
        "compare.baselines=[random,bruteforce]", "+compare.options.random={budget: 30}",
        "compare.bruteforce_max_plans=10",
    ])
    summary = cli.search_app(cfg, tmp_path)
    plan = Plan.from_json(tmp_path / "plan.json")
    prof = _profile("mlp", {}, dtype_bytes=4)
    cluster = load_cluster("cpu2")
    plan.validate(prof, cluster)
    assert plan.meta["model"] == {"name": "mlp", "config": {"num_layers": 8, "dim": 64, "width": 256}}
    assert plan.predicted["step_time_s"] == pytest.approx(
        CostModel(prof, cluster).evaluate(plan).step_time_s, rel=1e-12)
    assert summary["step_time_s"] == pytest.approx(plan.predicted["step_time_s"], rel=1e-12)

    history = json.loads((tmp_path / "history.json").read_text())
    assert isinstance(history, list) and all("best_step_time_s" in h for h in history)
    rows = json.loads((tmp_path / "comparison.json").read_text())
    assert [r["method"] for r in rows] == ["dp", "random", "bruteforce"]
    assert rows[1]["evaluations"] <= 30 and rows[1]["step_time_s"] >= rows[0]["step_time_s"] - 1e-15
    assert rows[2]["step_time_s"] is None and rows[2]["note"].startswith("skipped:")


def test_search_sweep_gives_each_job_its_folder_and_offline_wandb_run(tmp_path):
    sweep = tmp_path / "sweep"
    out = _app("search_main", "-m", "model=mlp", "cluster=cpu2", "search=random",
               "search.options.budget=20", "search.seed=0,1", "compare.baselines=[dp]",
               "search.progress=false", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for job in ("0", "1"):
        folder = sweep / job
        Plan.from_json(folder / "plan.json")  # parses
        assert (folder / ".hydra" / "config.yaml").exists()
        runs = list((folder / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1 and runs[0].stat().st_size > 0
    seeds = [json.loads((sweep / j / "plan.json").read_text())["meta"]["seed"] for j in ("0", "1")]
    assert seeds == [0, 1]

    # The sweep as a benchmark: one table of every job's methods (experiments/collect_sweep.py).
    collect_sweep = _load_experiment("collect_sweep")
    assert collect_sweep.main([str(sweep)]) == 0
    rows = json.loads((sweep / "sweep.json").read_text())["search"]
    seed_of = {r["overrides"]: next(o for o in r["overrides"].split() if o.startswith("search.seed=")) for r in rows}
    assert [(seed_of[r["overrides"]], r["method"]) for r in rows] == [
        ("search.seed=0", "random"), ("search.seed=0", "dp"), ("search.seed=1", "random"), ("search.seed=1", "dp")]
    # The DP is exact on this space: it is each job's best, random is no better.
    assert all(r["vs_best"] == 1.0 for r in rows if r["method"] == "dp")
    assert all(r["vs_best"] >= 1.0 for r in rows)
    assert (sweep / "sweep.png").stat().st_size > 0
    assert collect_sweep.main([str(tmp_path / "nope")]) == 2


def test_search_reporter_logs_numbers_and_heatmaps():
    logger = RecordingLogger()
    reporter = cli._SearchReporter(logger, heatmap_every=2)
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.05, 0.95]])
    for step in range(4):
        reporter({
            "step": step, "temperature": 1.0 - 0.1 * step, "expected_step_time_s": 0.5,
            "decoded_step_time_s": math.inf if step == 0 else 0.4, "L_train": 2.0, "L_val": 2.5,
            "entropy": {"layer_stage": 0.3, "shapes": 0.9}, "globals": {"order": [0.5, 0.5]},
            "best_step_time_s": 0.4, "layer_stage_probs": probs.tolist(),
        })
    steps = [s for s, _ in logger.metrics]
    assert steps == [0, 1, 2, 3]
    first, second = logger.metrics[0][1], logger.metrics[1][1]
    assert "search/decoded_step_time_s" not in first  # inf is not a number to plot
    assert second["search/decoded_step_time_s"] == 0.4
    assert first["search/entropy/layer_stage"] == 0.3 and first["search/L_val"] == 2.5
    assert first["search/temperature"] == 1.0
    assert not any(k.startswith("search/globals") for k in first)  # lists are not scalars
    assert [(k, s) for k, s, _ in logger.images] == [("search/A_stage", 0), ("search/A_stage", 2)]
    assert len(reporter.snapshots) == 4


# ------------------------------------------------------------------------------------ run
def test_run_front_end_builds_run_options_in_the_run_folder(tmp_path, monkeypatch):
    plan = Plan(stages=(StageSpec(0, 4, (0,), 1, 1, (False,) * 4), StageSpec(4, 8, (1,), 1, 1, (False,) * 4)),
                num_microbatches=2, micro_batch_size=8, meta={"model": {"name": "mlp", "config": {}}})
    plan_path = tmp_path / "plan.json"
    plan.to_json(plan_path)
    seen = {}

    def fake_launch(path, options, rendezvous=None, env=None):
        seen.update(path=Path(path), options=options, rendezvous=rendezvous)
        figures = dict(
            plan_path=str(path), model={"name": "mlp"}, world_size=2, backend="gloo", device="cpu",
            schedule="1f1b", num_stages=2, mesh_shape={"pp": 2, "dp": 1, "tp": 1},
            num_microbatches=2, micro_batch_size=8, global_batch_size=16, tokens_per_step=16,
            start_step=0, end_step=3, warmup_steps=1, step_time_s=0.02,
            step_times_s=[0.05, 0.02, 0.02], tokens_per_s=800.0, mfu=None, losses=[1.0, 0.9, 0.8],
            ranks=[], stages=[], peak_memory_bytes_max=2**27, predicted={"step_time_s": 0.01},
            predicted_vs_measured={"step_time_s": {"predicted": 0.01, "measured": 0.02, "ratio": 2.0}},
        )
        # Fields the front end does not read get None, so that new report fields need no edit here.
        required = [f.name for f in dataclasses.fields(RunReport)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        report = RunReport(**{name: figures.get(name) for name in required})
        report.to_json(Path(options.out_dir) / "run_report.json")
        return report

    # The package re-exports launch(), which hides the submodule of the same name.
    monkeypatch.setattr(sys.modules["dartspar.execute.launch"], "launch", fake_launch)
    cfg = compose("config_run", [f"plan={plan_path}", "executor=cpu", "executor.steps=3",
                                 "executor.checkpoint_dir=ckpt", "executor.checkpoint_every=1",
                                 "logger=none"])
    out_dir = tmp_path / "out"
    report = cli.run_app(cfg, out_dir)
    options = seen["options"]
    assert seen["path"] == plan_path.resolve()
    assert options.out_dir == str(out_dir) and options.checkpoint_dir == str(out_dir / "ckpt")
    assert options.steps == 3 and options.backend == "gloo" and options.wall_timeout_s == 600.0
    assert seen["rendezvous"].is_standalone
    assert report.step_time_s == 0.02

    logger = RecordingLogger()
    cli._log_run_outputs(logger, report, out_dir / "run_report.json", plan_path)
    assert [s for s, _ in logger.metrics] == [0, 1, 2]
    assert logger.summary["ratio/step_time_s"] == 2.0
    assert ("run_report.json", "run_report", "run_report") in logger.artifacts


def test_run_main_passes_json_first_argument_to_the_executor_cli(monkeypatch):
    seen = {}
    monkeypatch.setattr(sys.modules["dartspar.execute.launch"], "main",
                        lambda argv: seen.setdefault("argv", argv) and 0)
    monkeypatch.setattr(sys, "argv", ["dartspar-run", "p.json", "--steps", "3"])
    with pytest.raises(SystemExit):
        cli.run_main()
    assert seen["argv"] == ["p.json", "--steps", "3"]
