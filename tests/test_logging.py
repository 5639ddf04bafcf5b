"""Experiment logging: W&B offline by default, never fatal without network or API key; the
no-op logger; A's heatmaps."""

from __future__ import annotations

import numpy as np
import pytest

from dartspar.logging import NullLogger, WandbLogger, make_logger, resolve_wandb_mode
from dartspar.viz.heatmap import (
    figure_to_rgb,
    plot_stage_evolution,
    plot_stage_probabilities,
    stage_probability_image,
)


@pytest.fixture
def isolated_wandb(tmp_path, monkeypatch):
    """No credentials, no user settings: W&B sees a fresh home directory."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL", "WANDB_ENTITY",
                "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _softmax_rows(rng, layers, stages, sharpness):
    logits = rng.normal(size=(layers, stages)) * sharpness
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def test_mode_offline_ignores_wandb_mode_env():
    assert resolve_wandb_mode("offline", {"WANDB_MODE": "online"}) == "offline"
    assert resolve_wandb_mode("disabled", {"WANDB_MODE": "online"}) == "disabled"


def test_mode_online_is_the_opt_in_that_honours_wandb_mode():
    assert resolve_wandb_mode("online", {}) == "online"
    assert resolve_wandb_mode("online", {"WANDB_MODE": "offline"}) == "offline"
    assert resolve_wandb_mode("online", {"WANDB_MODE": "dryrun"}) == "offline"
    with pytest.raises(ValueError, match="WANDB_MODE='sideways'"):
        resolve_wandb_mode("online", {"WANDB_MODE": "sideways"})
    with pytest.raises(ValueError, match="logger.mode='cloud'"):
        resolve_wandb_mode("cloud", {})


def test_null_logger_accepts_everything(tmp_path):
    logger = make_logger({"backend": "none"}, {"a": 1}, tmp_path)
    assert isinstance(logger, NullLogger)
    logger.log_metrics({"x": 1.0}, step=0)
    logger.log_image("img", np.zeros((4, 4, 3), np.uint8), step=0)
    logger.log_table("t", ["a"], [[1]])
    logger.log_artifact(tmp_path / "nothing.json", "n", "plan")
    logger.set_summary({"x": 1})
    logger.finish()
    assert logger.files_dir is None
    assert list(tmp_path.iterdir()) == []


def test_wandb_offline_writes_files_without_network(isolated_wandb, monkeypatch):
    # A stray WANDB_MODE=online must not send an offline-configured run to the network.
    monkeypatch.setenv("WANDB_MODE", "online")
    run_dir = isolated_wandb / "run"
    logger = make_logger(
        {"backend": "wandb", "mode": "offline", "init_timeout_s": 60}, {"search": {"seed": 3}},
        run_dir, name="test-run",
    )
    assert isinstance(logger, WandbLogger) and logger.active and logger.mode == "offline"
    for step in range(3):
        logger.log_metrics({"search/expected_step_time_s": 1.0 / (step + 1)}, step=step)
    rng = np.random.default_rng(0)
    logger.log_image("search/A_stage", stage_probability_image(_softmax_rows(rng, 6, 3, 2.0), 2), step=2)
    logger.log_table("plan", ["stage", "layers"], [[0, "0-2"], [1, "3-5"]])
    plan_file = run_dir / "plan.json"
    plan_file.write_text('{"stages": []}')
    logger.log_artifact(plan_file, name="plan", kind="plan")
    logger.set_summary({"step_time_s": 0.5})
    logger.finish()
    assert not logger.active

    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and logger.files_dir == runs[0]
    records = list(runs[0].glob("run-*.wandb"))
    assert len(records) == 1 and records[0].stat().st_size > 0
    assert len(list((runs[0] / "files" / "media" / "images").rglob("*.png"))) == 1
    assert list((runs[0] / "files" / "media" / "table").glob("plan_*.table.json"))


def test_wandb_online_without_api_key_falls_back_to_offline(isolated_wandb, capsys):
    run_dir = isolated_wandb / "run"
    logger = WandbLogger(config={"a": 1}, dir=run_dir, mode="online", init_timeout_s=20)
    try:
        assert logger.active and logger.mode == "offline"
        logger.log_metrics({"x": 1.0}, step=0)
    finally:
        logger.finish()
    assert "logging offline" in capsys.readouterr().err
    assert len(list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


def test_heatmap_panels_and_evolution_render():
    rng = np.random.default_rng(1)
    snapshots = [(s, _softmax_rows(rng, 10, 4, 1 + s)) for s in range(0, 40, 5)]
    panels = figure_to_rgb(plot_stage_probabilities(snapshots, max_panels=4))
    evolution = figure_to_rgb(plot_stage_evolution(snapshots))
    for image in (panels, evolution):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert image.std() > 10  # something was drawn, not a blank canvas
    # Four panels are wider than one.
    single = figure_to_rgb(plot_stage_probabilities(snapshots[:1]))
    assert panels.shape[1] > 2 * single.shape[1]


def test_heatmap_rejects_bad_snapshots():
    good = np.full((5, 2), 0.5)
    with pytest.raises(ValueError, match="expected a \\(layers, stages\\) matrix"):
        plot_stage_probabilities([(0, np.ones(5))])
    with pytest.raises(ValueError, match="step 3 has 4 layers, the first has 5"):
        plot_stage_probabilities([(0, good), (3, np.full((4, 2), 0.5))])
    with pytest.raises(ValueError, match="fixed number of stages"):
        plot_stage_evolution([(0, good), (1, np.full((5, 3), 1 / 3))])
    with pytest.raises(ValueError, match="non-finite"):
        plot_stage_evolution([(0, np.full((5, 2), np.nan))])
    with pytest.raises(ValueError, match="empty"):
        plot_stage_evolution([])
