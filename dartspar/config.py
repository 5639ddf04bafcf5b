"""Structured configs of the command-line apps, and their validation.

The YAML files under ``conf/`` (top of the repository) are composed by Hydra on top of the
dataclass schemas below, registered in Hydra's ConfigStore: OmegaConf then rejects unknown keys
and values of the wrong type, and ``validate_*`` checks what types cannot say (names of models,
methods and estimators, ranges), raising ``ConfigError`` with the field, the value and the fix.

Config groups: ``model``, ``search``, ``logger``, ``executor`` (schemas here) and ``cluster``
(free-form: the mapping ``dartspar.cluster.load_cluster`` reads, owned by the cluster catalogue).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import II, MISSING, DictConfig, OmegaConf

import dartspar

__all__ = [
    "CONF_DIR",
    "ConfigError",
    "ModelConfig",
    "CostConfig",
    "SearchConfig",
    "CompareConfig",
    "LoggerConfig",
    "ExecutorConfig",
    "RendezvousConfig",
    "EvalAppConfig",
    "SearchAppConfig",
    "RunAppConfig",
    "SEARCH_METHODS",
    "LOGGER_BACKENDS",
    "LOGGER_MODES",
    "register_configs",
    "compose",
    "validate_model",
    "validate_cost",
    "validate_search",
    "validate_compare",
    "validate_logger",
    "validate_executor",
    "validate_space",
    "validate_eval_app",
    "validate_search_app",
    "validate_run_app",
    "space_options_kwargs",
    "executor_options_kwargs",
]

# conf/ sits next to the package directory (repository top level), not inside it.
CONF_DIR = Path(dartspar.__file__).resolve().parents[1] / "conf"

SEARCH_METHODS = ("darts", "dp", "mcmc", "random", "bruteforce", "device_blind")
LOGGER_BACKENDS = ("wandb", "none")
LOGGER_MODES = ("offline", "online", "disabled")
COMPUTE_DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8")


class ConfigError(ValueError):
    """A config value the apps cannot use; the message names the field, the value and the fix."""


# --------------------------------------------------------------------------------- schemas
@dataclass
class ModelConfig:
    """Which built-in model to build and how to profile it.

    Attributes:
        name: builder key of ``dartspar.models.build_model`` ("gpt", "mlp", "unbalanced").
        config: fields of the builder's config dataclass (e.g. GPTConfig).
        profile_batch_size: samples of the profiling batch (figures scale linearly from it).
        dtype_bytes: training dtype width (2 = bf16 mixed precision).
        global_batch_size: the batch this model trains at by default (``dartspar-search``'s
            ``global_batch_size`` defaults to it).
    """

    name: str = MISSING
    config: Dict[str, Any] = field(default_factory=dict)
    profile_batch_size: int = 1
    dtype_bytes: int = 2
    global_batch_size: int = 8


@dataclass
class CostConfig:
    """The cost model: the kernel latency estimator (registered name + options) and GEMM dtype."""

    estimator: str = "roofline"
    estimator_options: Dict[str, Any] = field(default_factory=dict)
    compute_dtype: Optional[str] = None


@dataclass
class SearchConfig:
    """The search method and its hyper-parameters (forwarded as ``**method_options``)."""

    method: str = "darts"
    options: Dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    progress: bool = True


@dataclass
class CompareConfig:
    """Baselines run on the same case after the main search, for the comparison table.

    Attributes:
        baselines: methods to run (the main method is skipped if listed).
        options: per-method option overrides, ``{method: {option: value}}``, on top of the
            method's ``conf/search/<method>.yaml``.
        bruteforce_max_plans: bruteforce is skipped (with a note) when the space holds more plans.
    """

    baselines: List[str] = field(default_factory=lambda: ["dp", "random", "device_blind"])
    options: Dict[str, Any] = field(default_factory=dict)
    bruteforce_max_plans: int = 200_000


@dataclass
class LoggerConfig:
    """Experiment logging. ``backend=none`` logs nothing; ``wandb`` runs offline unless
    ``mode=online`` (which also lets the ``WANDB_MODE`` environment variable decide).

    Attributes:
        dir: where W&B writes its ``wandb/`` folder; None = the run's output folder.
        init_timeout_s: upper bound on ``wandb.init``; on failure the run goes on offline.
        heatmap_every: log A's heatmap every this many search steps (0 = only at the end).
        system_stats: let W&B sample CPU/GPU statistics.
    """

    backend: str = "wandb"
    project: str = "dartspar"
    entity: Optional[str] = None
    mode: str = "offline"
    group: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    dir: Optional[str] = None
    init_timeout_s: float = 30.0
    heatmap_every: int = 10
    system_stats: bool = False


@dataclass
class RendezvousConfig:
    """torchrun's multi-node flags (``dartspar.execute.Rendezvous``); all null = one node."""

    nnodes: Optional[str] = None
    node_rank: Optional[int] = None
    rdzv_endpoint: Optional[str] = None
    rdzv_id: Optional[str] = None
    rdzv_backend: Optional[str] = None


@dataclass
class ExecutorConfig:
    """Options of ``dartspar.execute.launch``: the fields of ``dartspar.execute.RunOptions``
    (same names, same defaults; see its docstring) except ``out_dir``, which is the run's output
    folder, and ``dump_first_step`` (a test hook). A relative ``checkpoint_dir`` is taken inside
    the run folder, so that every job of a sweep has its own."""

    steps: int = 20
    nproc: Optional[int] = None
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0
    resume: bool = False
    backend: str = "auto"
    timeout_s: float = 300.0
    seed: int = 0
    data_seed: int = 0
    num_train: int = 4096
    num_val: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 2
    trace_steps: int = 2
    memory_limit_bytes: Optional[int] = None
    int8_error_feedback: bool = True
    compute_precision: str = "fp32"
    peak_flops_per_s: Optional[float] = None
    keep_checkpoints: int = 2
    wall_timeout_s: Optional[float] = None
    rendezvous: RendezvousConfig = field(default_factory=RendezvousConfig)


@dataclass
class EvalAppConfig:
    """``dartspar-eval``: score one plan. ``fail_if_not_fits`` turns DOES NOT FIT into exit 2."""

    plan: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: Any = MISSING
    cost: CostConfig = field(default_factory=CostConfig)
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(backend="none"))
    fail_if_not_fits: bool = False


@dataclass
class SearchAppConfig:
    """``dartspar-search``: find a plan for ``model`` on ``cluster``, compare with baselines.

    ``space``: fields of ``dartspar.space.SpaceOptions`` other than ``global_batch_size``.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: Any = MISSING
    cost: CostConfig = field(default_factory=CostConfig)
    global_batch_size: int = II("model.global_batch_size")
    space: Dict[str, Any] = field(default_factory=dict)
    search: SearchConfig = field(default_factory=SearchConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class RunAppConfig:
    """``dartspar-run``: execute a plan with torch.distributed and report measured figures
    next to the plan's own prediction (the model comes from ``plan.meta['model']``)."""

    plan: str = MISSING
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


_SCHEMAS = {
    "dartspar_eval_schema": EvalAppConfig,
    "dartspar_search_schema": SearchAppConfig,
    "dartspar_run_schema": RunAppConfig,
}


def register_configs() -> None:
    """Store the app schemas in Hydra's ConfigStore (idempotent); the primary YAML configs
    name them first in their defaults lists."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, node in _SCHEMAS.items():
        store.store(name=name, node=node)


def compose(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line style ``overrides`` (no run dir,
    no logging setup): for tests and notebooks. Hydra must not be initialised already."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or ()))


# ------------------------------------------------------------------------------ validation
def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _missing(cfg: DictConfig, key: str) -> bool:
    return OmegaConf.is_missing(cfg, key)


def validate_model(model: DictConfig) -> None:
    """Check ``model``: a known builder whose config fields exist, positive sizes."""
    from .models import MODEL_CONFIGS

    _require(
        not _missing(model, "name"),
        "model.name is missing: choose a model with model=<name> (files in conf/model/)",
    )
    _require(
        model.name in MODEL_CONFIGS,
        f"model.name={model.name!r} is not a built-in model; choose one of {sorted(MODEL_CONFIGS)}",
    )
    known = set(MODEL_CONFIGS[model.name][1].__dataclass_fields__)
    unknown = sorted(set(model.config) - known)
    _require(
        not unknown,
        f"model.config has fields {unknown} that model {model.name!r} does not have; "
        f"known fields: {sorted(known)}",
    )
    for key in ("profile_batch_size", "global_batch_size"):
        _require(model[key] >= 1, f"model.{key}={model[key]} must be >= 1")
    _require(
        model.dtype_bytes in (1, 2, 4),
        f"model.dtype_bytes={model.dtype_bytes} must be 1, 2 or 4 (bytes of the training dtype)",
    )


def validate_cost(cost: DictConfig) -> None:
    """Check ``cost``: a registered estimator (importing the fitted one on demand), a dtype."""
    from .cost import latency
    from .cost import fitted  # noqa: F401  (registers "fitted" on import)

    available = latency.available_estimators()
    _require(
        cost.estimator in available,
        f"cost.estimator={cost.estimator!r} is not a registered latency estimator; "
        f"available: {available}",
    )
    _require(
        cost.compute_dtype is None or cost.compute_dtype in COMPUTE_DTYPES,
        f"cost.compute_dtype={cost.compute_dtype!r} must be null (from the model's dtype) or one "
        f"of {COMPUTE_DTYPES}",
    )


def _check_method_options(method: str, options: Any, where: str) -> None:
    """Option names against what the method's function accepts."""
    from .search.api import method_options

    try:
        accepted = method_options(method)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    if accepted is None:  # the method takes **options
        return
    unknown = sorted(set(options) - set(accepted))
    _require(
        not unknown,
        f"{where} has {unknown}, which search method {method!r} does not take; it takes "
        f"{sorted(accepted)}",
    )


def validate_search(search: DictConfig) -> None:
    """Check the search method, its option names and the seed."""
    _require(
        search.method in SEARCH_METHODS,
        f"search.method={search.method!r} is not a search method; choose one of "
        f"{SEARCH_METHODS} (search=<method> picks conf/search/<method>.yaml)",
    )
    _require(search.seed >= 0, f"search.seed={search.seed} must be >= 0")
    _check_method_options(search.method, search.options, "search.options")


def validate_compare(compare: DictConfig) -> None:
    """Check the baseline list and per-method option overrides."""
    bad = [m for m in compare.baselines if m not in SEARCH_METHODS]
    _require(
        not bad,
        f"compare.baselines has {bad}, which are not search methods; allowed: {SEARCH_METHODS} "
        "(use compare.baselines=[] for none)",
    )
    bad = [m for m in compare.options if m not in SEARCH_METHODS]
    _require(
        not bad,
        f"compare.options has entries {bad} that are not search methods; allowed: {SEARCH_METHODS}",
    )
    for method, options in compare.options.items():
        _check_method_options(method, options or {}, f"compare.options.{method}")
    _require(
        compare.bruteforce_max_plans >= 1,
        f"compare.bruteforce_max_plans={compare.bruteforce_max_plans} must be >= 1",
    )


def validate_logger(logger: DictConfig) -> None:
    """Check the logger backend, W&B mode and timing fields."""
    _require(
        logger.backend in LOGGER_BACKENDS,
        f"logger.backend={logger.backend!r} must be one of {LOGGER_BACKENDS} "
        "(logger=wandb or logger=none)",
    )
    _require(
        logger.mode in LOGGER_MODES,
        f"logger.mode={logger.mode!r} must be one of {LOGGER_MODES}",
    )
    _require(
        logger.init_timeout_s > 0,
        f"logger.init_timeout_s={logger.init_timeout_s} must be > 0 seconds",
    )
    _require(
        logger.heatmap_every >= 0,
        f"logger.heatmap_every={logger.heatmap_every} must be >= 0 (0 = only the final heatmap)",
    )


def executor_options_kwargs(executor: DictConfig, out_dir: str | Path) -> dict:
    """``executor`` as keyword arguments of ``RunOptions`` with ``out_dir`` (relative
    ``checkpoint_dir`` placed inside ``out_dir``)."""
    data = OmegaConf.to_container(executor, resolve=True)
    data.pop("rendezvous", None)
    if data.get("checkpoint_dir") and not Path(data["checkpoint_dir"]).is_absolute():
        data["checkpoint_dir"] = str(Path(out_dir) / data["checkpoint_dir"])
    return {"out_dir": str(out_dir), **data}


def validate_executor(executor: DictConfig) -> None:
    """Check the executor options by building ``RunOptions`` from them (its checks name the
    field; the message is rephrased with the config path ``executor.<field>``)."""
    from .execute.options import RunOptions

    try:
        RunOptions(**executor_options_kwargs(executor, "."))
    except (TypeError, ValueError) as err:
        message = str(err).replace("RunOptions.", "executor.")
        raise ConfigError(f"{message} (config group executor)") from None
    nnodes = executor.rendezvous.nnodes
    _require(
        nnodes is None or all(part.isdigit() for part in str(nnodes).split(":")),
        f"executor.rendezvous.nnodes={nnodes!r} must be N or MIN:MAX (torchrun --nnodes)",
    )


def space_options_kwargs(space: DictConfig | dict) -> dict:
    """``space`` as keyword arguments of ``SpaceOptions`` (lists become tuples); raises
    ConfigError on fields SpaceOptions does not have."""
    from .space import SpaceOptions

    data = OmegaConf.to_container(space, resolve=True) if isinstance(space, DictConfig) else dict(space)
    known = {f.name for f in fields(SpaceOptions)} - {"global_batch_size"}
    unknown = sorted(set(data) - known)
    _require(
        not unknown,
        f"space has fields {unknown} that dartspar.space.SpaceOptions does not have; known: "
        f"{sorted(known)} (global_batch_size is set at the top level)",
    )
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def validate_space(space: DictConfig) -> None:
    space_options_kwargs(space)


def _check_cluster(cfg: DictConfig) -> None:
    _require(
        not _missing(cfg, "cluster"),
        "cluster is missing: choose one with cluster=<name> (files in conf/cluster/)",
    )


def _check_plan_path(cfg: DictConfig) -> None:
    _require(
        not _missing(cfg, "plan"),
        "plan is missing: pass plan=path/to/plan.json (e.g. the plan.json a dartspar-search run "
        "wrote, or conf/plans/gpt-small-mixed-small.json)",
    )


def validate_eval_app(cfg: DictConfig) -> None:
    """All checks for ``dartspar-eval``."""
    _check_plan_path(cfg)
    validate_model(cfg.model)
    _check_cluster(cfg)
    validate_cost(cfg.cost)
    validate_logger(cfg.logger)


def validate_search_app(cfg: DictConfig) -> None:
    """All checks for ``dartspar-search``."""
    validate_model(cfg.model)
    _check_cluster(cfg)
    validate_cost(cfg.cost)
    _require(
        cfg.global_batch_size >= 1, f"global_batch_size={cfg.global_batch_size} must be >= 1"
    )
    validate_space(cfg.space)
    validate_search(cfg.search)
    validate_compare(cfg.compare)
    validate_logger(cfg.logger)


def validate_run_app(cfg: DictConfig) -> None:
    """All checks for ``dartspar-run``."""
    _check_plan_path(cfg)
    validate_executor(cfg.executor)
    validate_logger(cfg.logger)
