"""Structured configs: the shipped YAML composes and validates, bad values name their field."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from dartspar.config import (
    CONF_DIR,
    SEARCH_METHODS,
    ConfigError,
    ExecutorConfig,
    compose,
    executor_options_kwargs,
    space_options_kwargs,
    validate_eval_app,
    validate_model,
    validate_run_app,
    validate_search_app,
)
from dartspar.execute.options import RunOptions
from dartspar.models import build_model
from dartspar.space import SpaceOptions

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def test_primary_configs_compose_and_validate():
    search = compose("config_search")
    validate_search_app(search)
    assert search.global_batch_size == search.model.global_batch_size
    evaluate = compose("config_eval", ["plan=conf/plans/gpt-small-mixed-small.json"])
    validate_eval_app(evaluate)
    assert evaluate.logger.backend == "none"
    run = compose("config_run", ["plan=p.json"])
    validate_run_app(run)
    assert run.logger.backend == "wandb" and run.logger.mode == "offline"


@pytest.mark.parametrize("method", SEARCH_METHODS)
def test_every_search_method_has_a_config_group_option(method):
    cfg = compose("config_search", [f"search={method}"])
    validate_search_app(cfg)
    assert cfg.search.method == method


@pytest.mark.parametrize("name", MODELS)
def test_shipped_models_build_on_meta(name):
    cfg = compose("config_search", [f"model={name}"])
    validate_model(cfg.model)
    with torch.device("meta"):
        model = build_model(cfg.model.name, **OmegaConf.to_container(cfg.model.config))
    assert len(model.layers) >= 2


@pytest.mark.parametrize(
    ("config", "overrides", "message"),
    [
        ("config_search", ["logger.mode=cloud"], "logger.mode='cloud'"),
        ("config_search", ["logger.backend=tensorboard"], "logger.backend='tensorboard'"),
        ("config_search", ["logger.init_timeout_s=0"], "logger.init_timeout_s=0"),
        ("config_search", ["model.profile_batch_size=0"], "model.profile_batch_size=0"),
        ("config_search", ["model.dtype_bytes=3"], "model.dtype_bytes=3"),
        ("config_search", ["+model.config.depth=3"], "model.config has fields ['depth']"),
        ("config_search", ["model.name=resnet"], "model.name='resnet'"),
        ("config_search", ["cost.estimator=magic"], "cost.estimator='magic'"),
        ("config_search", ["cost.compute_dtype=int4"], "cost.compute_dtype='int4'"),
        ("config_search", ["search.method=annealing"], "search.method='annealing'"),
        ("config_search", ["search.seed=-1"], "search.seed=-1"),
        ("config_search", ["global_batch_size=0"], "global_batch_size=0"),
        ("config_search", ["compare.baselines=[dp,genetic]"], "compare.baselines has ['genetic']"),
        ("config_search", ["+compare.options.genetic={x: 1}"], "compare.options has entries ['genetic']"),
        ("config_search", ["+space.stages=3"], "space has fields ['stages']"),
        ("config_run", ["plan=p.json", "executor.steps=0"], "executor.steps=0"),
        ("config_run", ["plan=p.json", "executor.backend=mpi"], "executor.backend='mpi'"),
        ("config_run", ["plan=p.json", "executor.checkpoint_every=5"], "checkpoint_dir"),
        ("config_run", ["plan=p.json", "executor.rendezvous.nnodes=two"], "executor.rendezvous.nnodes='two'"),
        ("config_run", [], "plan is missing: pass plan="),
    ],
)
def test_bad_values_name_the_field(config, overrides, message):
    cfg = compose(config, overrides)
    validate = {"config_search": validate_search_app, "config_run": validate_run_app}[config]
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)


def test_type_errors_are_caught_when_composing_and_name_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose("config_search", ["search.seed=first"])
    assert "search.seed" in str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException, match="model.depth"):
        compose("config_search", ["model.depth=3"])


def test_space_options_pass_through_as_tuples():
    cfg = compose("config_search", ["space.tp_degrees=[1,2]", "space.recompute=stage"])
    kwargs = space_options_kwargs(cfg.space)
    assert kwargs["tp_degrees"] == (1, 2) and kwargs["recompute"] == "stage"


def test_shipped_space_section_equals_space_options_defaults():
    """conf/config_search.yaml lists every SpaceOptions field (so that overrides need no "+")
    with SpaceOptions' own defaults."""
    kwargs = space_options_kwargs(compose("config_search").space)
    defaults = {f.name: f.default for f in dataclasses.fields(SpaceOptions) if f.name != "global_batch_size"}
    assert kwargs == defaults


def test_executor_config_mirrors_run_options():
    """Same field names and defaults as RunOptions, so that the YAML cannot drift from it."""
    ours = {f.name: f for f in dataclasses.fields(ExecutorConfig)}
    theirs = {f.name: f for f in dataclasses.fields(RunOptions)}
    assert set(theirs) - set(ours) == {"out_dir", "dump_first_step"}
    assert set(ours) - set(theirs) == {"rendezvous"}
    for name in set(ours) & set(theirs):
        assert ours[name].default == theirs[name].default, name
    cfg = compose("config_run", ["plan=p.json", "executor.checkpoint_dir=ckpt", "executor.checkpoint_every=2"])
    options = RunOptions(**executor_options_kwargs(cfg.executor, "/tmp/run7"))
    assert options.out_dir == "/tmp/run7" and options.checkpoint_dir == "/tmp/run7/ckpt"
