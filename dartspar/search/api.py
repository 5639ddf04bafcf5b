"""``search``: one entry point for every planner, all scored by the same cost model.

Builds the ``CostModel`` and ``SearchSpace`` for a profile and a cluster, runs the chosen method
on that space, and returns its ``SearchResult`` with ``plan.predicted`` filled by the cost model,
``plan.meta`` saying where the plan came from, and ``cost`` = ``CostModel.evaluate(plan)``.
"""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Mapping
from dataclasses import asdict, fields, replace

from ..cluster import Cluster
from ..cost.model import CostModel
from ..profile import ModelProfile
from ..space import SearchSpace, SpaceOptions
from .result import SearchResult

__all__ = ["search", "METHODS", "method_options", "space_options", "builtin_model_spec"]

# name -> "module:function"; imported on use so that one missing method does not break the rest.
METHODS = {
    "darts": "dartspar.search.darts:darts_search",
    "dp": "dartspar.search.dp:dp_search",
    "mcmc": "dartspar.search.mcmc:mcmc_search",
    "random": "dartspar.search.random_search:random_search",
    "bruteforce": "dartspar.search.bruteforce:bruteforce_search",
    "device_blind": "dartspar.search.device_blind:device_blind_search",
}
_COMMON = ("space", "seed", "progress", "callback")


def _method(name: str):
    if name not in METHODS:
        raise ValueError(f"search method={name!r} is unknown; choose one of {sorted(METHODS)}")
    module_name, function_name = METHODS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"search method {name!r} is not available: {err}") from err
    return getattr(module, function_name)


def method_options(name: str) -> dict | None:
    """The options ``name`` accepts, with their defaults (None when it takes ``**options``)."""
    params = inspect.signature(_method(name)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {k: p.default for k, p in params.items() if k not in _COMMON}


def space_options(space: SpaceOptions | Mapping | None, global_batch_size: int | None,
                  profile: ModelProfile) -> SpaceOptions:
    """``SpaceOptions`` from an instance, a mapping (e.g. a Hydra config) or None.

    ``global_batch_size`` defaults to the batch the profile was taken at; giving it both here
    and inside ``space`` with different values is an error.
    """
    if space is None:
        space = {}
    if isinstance(space, SpaceOptions):
        if global_batch_size is not None and global_batch_size != space.global_batch_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} disagrees with space.global_batch_size="
                f"{space.global_batch_size}: give it once"
            )
        return space
    if not isinstance(space, Mapping):
        raise TypeError(f"space must be SpaceOptions, a mapping or None, not {type(space).__name__}")
    known = {f.name for f in fields(SpaceOptions)}
    unknown = sorted(set(space) - known)
    if unknown:
        raise ValueError(f"space has unknown options {unknown}; known: {sorted(known)}")
    values = {}
    for key, value in dict(space).items():
        # Config systems hand sequences over as lists (or ListConfig); the options are tuples.
        if value is not None and not isinstance(value, (str, bytes, int, float, bool)):
            value = tuple(value)
        values[key] = value
    if global_batch_size is not None:
        if values.get("global_batch_size", global_batch_size) != global_batch_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} disagrees with space.global_batch_size="
                f"{values['global_batch_size']}: give it once"
            )
        values["global_batch_size"] = global_batch_size
    values.setdefault("global_batch_size", profile.batch_size)
    return SpaceOptions(**values)


def search(
    profile: ModelProfile,
    cluster: Cluster,
    method: str = "darts",
    *,
    global_batch_size: int | None = None,
    space: SpaceOptions | Mapping | None = None,
    estimator="roofline",
    compute_dtype: str | None = None,
    seed: int = 0,
    progress: bool = True,
    callback=None,
    **method_options_,
) -> SearchResult:
    """Find a plan for ``profile`` on ``cluster`` with ``method``.

    Args:
        profile: the model's per-layer profile (``dartspar.profile.profile``).
        cluster: the hardware (``dartspar.cluster``).
        method: one of ``METHODS``: "darts" (gradient descent over the relaxed strategy), "dp"
            (exact inter-op dynamic program), "mcmc" (FlexFlow-style), "random",
            "bruteforce" (small spaces only), "device_blind" (DP on an averaged cluster,
            scored on the real one).
        global_batch_size: samples per step (default: ``space``'s, else the profile's batch).
        space: what may be chosen (``SpaceOptions`` or a mapping of its fields).
        estimator: latency estimator name or instance for the cost model.
        compute_dtype: GEMM dtype on every device (``CostModel``); None: each device's own
            (bf16, else fp16, for a 2-byte training dtype).
        seed: RNG seed of stochastic methods.
        progress: let the method print progress.
        callback: called by the method with each history entry (a dict).
        method_options_: options of the method (see ``method_options(method)``); unknown
            ones are an error.
    Returns:
        SearchResult: ``.plan`` (with ``predicted`` and ``meta``), ``.cost`` (the cost model's
        breakdown), ``.history``, ``.wall_time_s`` (setup + search), ``.info`` (method extras
        plus ``setup_s`` and ``search_s``).
    """
    start = time.perf_counter()
    if not isinstance(profile, ModelProfile):
        raise TypeError(f"profile must be a ModelProfile, not {type(profile).__name__}")
    if not isinstance(cluster, Cluster):
        raise TypeError(f"cluster must be a Cluster, not {type(cluster).__name__}")
    function = _method(method)
    accepted = method_options(method)
    if accepted is not None:
        unknown = sorted(set(method_options_) - set(accepted))
        if unknown:
            raise ValueError(
                f"search method {method!r} has no options {unknown}; it accepts {sorted(accepted)}"
            )
    options = space_options(space, global_batch_size, profile)
    cost_model = CostModel(profile, cluster, estimator, compute_dtype=compute_dtype)
    search_space = SearchSpace(profile, cluster, options, cost_model)
    setup_s = time.perf_counter() - start

    result = function(search_space, seed=seed, progress=progress, callback=callback, **method_options_)
    search_s = time.perf_counter() - start - setup_s

    plan = cost_model.with_prediction(result.plan)
    plan = replace(plan, meta={
        **plan.meta,
        "method": method,
        "seed": seed,
        "cluster": cluster.name,
        # The executor rebuilds built-in models from {"name", "config"}; others keep their label.
        "model": builtin_model_spec(profile) or profile.name,
        "model_label": profile.name,
        "profile_meta": dict(profile.meta),
        "estimator": cost_model.estimator.name,
        "global_batch_size": options.global_batch_size,
        "space": asdict(options),
        "method_options": {k: v for k, v in method_options_.items() if _jsonable(v)},
    })
    result.plan = plan
    result.cost = cost_model.evaluate(plan)
    result.method = method
    result.wall_time_s = time.perf_counter() - start
    result.info = {**result.info, "setup_s": setup_s, "search_s": search_s}
    return result


def builtin_model_spec(profile: ModelProfile) -> dict | None:
    """``{"name", "config"}`` of the built-in model (``dartspar.models``) ``profile`` was made
    from, as ``plan.meta["model"]`` needs it for ``dartspar-run``; None for other models."""
    from ..models import MODEL_CONFIGS

    config = profile.meta.get("config")
    for name, (model_cls, _) in MODEL_CONFIGS.items():
        if profile.meta.get("model_class") == model_cls.__name__ and isinstance(config, dict):
            return {"name": name, "config": dict(config)}
    return None


def _jsonable(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, tuple, dict))
