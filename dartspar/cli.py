"""Hydra entry points: ``dartspar-eval``, ``dartspar-search`` and ``dartspar-run``.

Each app composes ``conf/config_<app>.yaml`` (model, cluster, method and logger from the config
groups under ``conf/``), validates it (``dartspar.config``), and works in its own output folder
(Hydra's ``outputs/DATE/TIME``, or ``multirun/DATE/TIME/N`` under ``-m``) where Hydra saves the
resolved config in ``.hydra/config.yaml`` and the app writes its results:

- ``dartspar-eval plan=P.json model=M cluster=C``: prints the plan's predicted cost breakdown
  and writes ``cost.json``. A plan that does not fit prints a "DOES NOT FIT" line and exits 0,
  unless ``fail_if_not_fits=true`` (then exit code 2 after writing ``cost.json``).
- ``dartspar-search model=M cluster=C search=METHOD``: runs the search, prints the plan table
  and the comparison with ``compare.baselines`` on the same case, writes ``plan.json``,
  ``history.json``, ``search.json`` and ``comparison.json``.
- ``dartspar-run plan=P.json executor.steps=N``: runs the plan with the torch.distributed
  executor (``dartspar.execute.launch``); the report lands in ``run_report.json``.

Errors in the input (config, plan, a case the method refuses) print one
``dartspar-<app>: error: ...`` line on stderr and exit with code 2 (a failed run: the
executor's code, 1 or 2); ``HYDRA_FULL_ERROR=1`` shows the full traceback instead.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from .config import (
    CONF_DIR,
    ConfigError,
    executor_options_kwargs,
    register_configs,
    space_options_kwargs,
    validate_eval_app,
    validate_run_app,
    validate_search_app,
)

__all__ = [
    "eval_main",
    "search_main",
    "run_main",
    "profile_kernels_main",
    "evaluate_app",
    "search_app",
    "run_app",
    "build_profile",
    "build_cluster",
    "build_cost_model",
    "plan_table",
    "comparison_table",
    "run_summary",
    "RunFailed",
    "to_jsonable",
    "EXIT_INPUT_ERROR",
    "EXIT_DOES_NOT_FIT",
]

GIB = 2.0**30
EXIT_INPUT_ERROR = 2
EXIT_DOES_NOT_FIT = 2


# ------------------------------------------------------------------------- shared helpers
def _hydra_choice(group: str) -> str | None:
    """The config-group option Hydra picked (e.g. "gpt-small" for ``model``), if under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def _run_dir() -> Path:
    """This job's output folder (Hydra's runtime output dir; the cwd outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path.cwd()


def _sweep_group() -> str | None:
    """A W&B group for the jobs of one ``-m`` sweep (its sweep folder's name), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return None


def _absolute(path: str) -> Path:
    """``path`` against the directory the command was started from."""
    from hydra.utils import to_absolute_path

    try:
        return Path(to_absolute_path(path))
    except ValueError:  # outside a Hydra app
        return Path(path).resolve()


def to_jsonable(obj: Any) -> Any:
    """``obj`` with tensors, arrays, dataclasses and tuples turned into JSON types."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # torch tensors, numpy arrays and scalars
        return to_jsonable(obj.tolist())
    return str(obj)


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(to_jsonable(data), indent=1))
    return path


def build_profile(model_cfg: DictConfig, label: str | None = None):
    """Profile the configured built-in model on the meta device (no memory, no weights).

    Returns ``(profile, spec)``; ``spec = {"name": ..., "config": {...}}`` is what the executor
    reads from ``plan.meta["model"]`` to rebuild the same model.
    """
    import torch

    from .models import build_model
    from .profile import profile

    config = OmegaConf.to_container(model_cfg.config, resolve=True)
    try:
        with torch.device("meta"):
            model = build_model(model_cfg.name, **dict(config))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model={label or model_cfg.name} does not build: {err}") from None
    inputs = model.example_inputs(model_cfg.profile_batch_size, device="meta")
    prof = profile(model, inputs, name=label or model_cfg.name, dtype_bytes=model_cfg.dtype_bytes)
    return prof, {"name": model_cfg.name, "config": dict(config)}


def build_cluster(cluster_cfg: Any, label: str | None = None):
    """The Cluster of the ``cluster`` config node (the mapping ``load_cluster`` reads)."""
    from .cluster import load_cluster

    data = OmegaConf.to_container(cluster_cfg, resolve=True) if OmegaConf.is_config(cluster_cfg) else cluster_cfg
    if isinstance(data, dict) and label and "name" not in data:
        data = {"name": label, **data}
    try:
        return load_cluster(data)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"cluster={label or '?'} is not a valid cluster: {err}") from None


def build_cost_model(profile, cluster, cost_cfg: DictConfig):
    """The CostModel with the configured estimator (its options passed through) and GEMM dtype
    (``cost.compute_dtype``; null = the CostModel's per-device default)."""
    from .cost.latency import make_estimator
    from .cost.model import CostModel

    options = OmegaConf.to_container(cost_cfg.estimator_options, resolve=True)
    try:
        estimator = make_estimator(cost_cfg.estimator, **options)
    except TypeError as err:
        raise ConfigError(
            f"cost.estimator_options={options} do not suit estimator {cost_cfg.estimator!r}: {err}"
        ) from None
    return CostModel(profile, cluster, estimator=estimator, compute_dtype=cost_cfg.compute_dtype)


def _model_mismatch(plan_spec: dict, spec: dict) -> str | None:
    """Why the plan's recorded model differs from the configured one (None if they agree),
    comparing full configs so that defaults left out on either side do not count."""
    from .models import MODEL_CONFIGS

    if plan_spec.get("name") != spec["name"]:
        return f"model name {plan_spec.get('name')!r} vs {spec['name']!r}"
    config_cls = MODEL_CONFIGS[spec["name"]][1]
    try:
        theirs = config_cls(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in dict(plan_spec.get("config", {})).items()})
    except (TypeError, ValueError) as err:
        return f"the plan's model config does not build ({err})"
    ours = config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()})
    if theirs != ours:
        diff = {k: (getattr(theirs, k), getattr(ours, k))
                for k in config_cls.__dataclass_fields__ if getattr(theirs, k) != getattr(ours, k)}
        return f"config fields (plan, configured): {diff}"
    return None


# ------------------------------------------------------------------------------- tables
def plan_table(plan, breakdown) -> str:
    """Per-stage table of a plan with its predicted figures (times per micro-batch)."""
    head = (
        f"{'stage':>5} {'layers':>10} {'devices':>26} {'dp':>3} {'tp':>3} {'recompute':>9} "
        f"{'fwd ms':>9} {'bwd ms':>9} {'p2p ms':>8} {'sync ms':>8} {'mem GiB':>8} {'cap GiB':>8}"
    )
    rows = [head, "-" * len(head)]
    for i, (spec, cost) in enumerate(zip(plan.stages, breakdown.stages)):
        flags = f"{sum(spec.recompute)}/{spec.num_layers}"
        over = " !" if cost.memory_bytes > cost.capacity_bytes else ""
        rows.append(
            f"{i:>5} {f'{spec.layer_start}-{spec.layer_end - 1}':>10} {cost.devices[:26]:>26} "
            f"{spec.dp:>3} {spec.tp:>3} {flags:>9} {1e3 * cost.fwd_s:>9.3f} {1e3 * cost.bwd_s:>9.3f} "
            f"{1e3 * cost.p2p_s:>8.3f} {1e3 * cost.dp_sync_s:>8.3f} "
            f"{cost.memory_bytes / GIB:>8.2f} {cost.capacity_bytes / GIB:>8.2f}{over}"
        )
    rows.append("-" * len(head))
    rows.append(
        f"schedule {plan.schedule}, {plan.num_microbatches} micro-batches of "
        f"{plan.micro_batch_size} (global batch {plan.global_batch_size}), activations "
        f"{plan.activation_precision}, gradients {plan.gradient_precision}, data parallel "
        f"{plan.data_parallel}"
    )
    rows.append(
        f"step time {1e3 * breakdown.step_time_s:.3f} ms (pipeline {1e3 * breakdown.makespan_s:.3f} ms "
        f"of which bubble {1e3 * breakdown.bubble_s:.3f} ms, dp sync {1e3 * breakdown.dp_sync_s:.3f} ms, "
        f"optimizer update {1e3 * breakdown.terms['update_s']:.3f} ms)"
    )
    rows.append(_fit_line(breakdown))
    return "\n".join(rows)


def _fit_line(breakdown) -> str:
    if breakdown.fits:
        peak = max(breakdown.peak_bytes_per_device.values(), default=0.0)
        return f"FITS: peak {peak / GIB:.2f} GiB per device"
    worst = max(
        range(len(breakdown.stages)),
        key=lambda k: breakdown.stages[k].memory_bytes - breakdown.stages[k].capacity_bytes,
    )
    s = breakdown.stages[worst]
    return (
        f"DOES NOT FIT: stage {worst} needs {s.memory_bytes / GIB:.2f} GiB per device on {s.devices} "
        f"({s.capacity_bytes / GIB:.2f} GiB), over by {breakdown.max_overflow_bytes / GIB:.2f} GiB; "
        "enable recompute, raise tp/dp (data_parallel=fsdp), use more micro-batches or stages"
    )


def comparison_table(rows: list[dict]) -> str:
    """The methods side by side: predicted step time, ratio to the first row, fit, search cost."""
    head = (
        f"{'method':>13} {'step ms':>10} {'vs ' + rows[0]['method']:>12} {'fits':>5} "
        f"{'peak GiB':>9} {'search s':>9} {'evals':>8}  note"
    )
    out = [head, "-" * len(head)]
    ref = rows[0].get("step_time_s")
    for r in rows:
        if r.get("step_time_s") is None:
            out.append(f"{r['method']:>13} {'-':>10} {'-':>12} {'-':>5} {'-':>9} {'-':>9} {'-':>8}  {r.get('note', '')}")
            continue
        ratio = r["step_time_s"] / ref if ref else float("nan")
        out.append(
            f"{r['method']:>13} {1e3 * r['step_time_s']:>10.3f} {ratio:>11.3f}x {str(r['fits']):>5} "
            f"{r['peak_bytes'] / GIB:>9.2f} {r['wall_time_s']:>9.2f} {r['evaluations']:>8}  "
            f"{r.get('note', '')}"
        )
    return "\n".join(out)


# ---------------------------------------------------------------------------------- eval
def evaluate_app(cfg: DictConfig, out_dir: str | Path | None = None) -> dict:
    """``dartspar-eval``: score ``cfg.plan`` on ``cfg.model`` x ``cfg.cluster``.

    Prints the breakdown, writes ``cost.json`` in ``out_dir`` (default: the run folder) and
    returns its content (``CostBreakdown.to_dict()`` plus plan, model and cluster names).
    """
    from .logging import make_logger
    from .plan import Plan

    validate_eval_app(cfg)
    out_dir = Path(out_dir) if out_dir is not None else _run_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path = _absolute(cfg.plan)
    plan = Plan.from_json(plan_path)
    model_label = _hydra_choice("model") or cfg.model.name
    profile, spec = build_profile(cfg.model, model_label)
    recorded = plan.meta.get("model") if isinstance(plan.meta, dict) else None
    if isinstance(recorded, dict) and "name" in recorded:
        why = _model_mismatch(recorded, spec)
        if why:
            hint = plan.meta.get("model_label")
            raise ConfigError(
                f"plan {plan_path} was made for another model than model={model_label} ({why}); "
                + (f"pass model={hint}" if hint else "pass the model it was made for")
            )
    cluster = build_cluster(cfg.cluster, _hydra_choice("cluster"))
    cost_model = build_cost_model(profile, cluster, cfg.cost)
    breakdown = cost_model.evaluate(plan)

    print(f"plan {plan_path}\nmodel {model_label} ({profile.num_layers} layers, "
          f"{_params(profile.total_params)} parameters) on cluster {cluster.name} "
          f"({cluster.num_devices} devices), estimator {cost_model.estimator.name}")
    print(plan_table(plan, breakdown))
    result = {
        "plan": str(plan_path), "model": model_label, "cluster": cluster.name,
        "estimator": cost_model.estimator.name, **breakdown.to_dict(),
    }
    _write_json(out_dir / "cost.json", result)
    print(f"wrote {out_dir / 'cost.json'}")
    logger = make_logger(cfg.logger, OmegaConf.to_container(cfg, resolve=True), out_dir,
                         name=f"eval-{model_label}-{cluster.name}", group=_sweep_group())
    try:
        _log_plan(logger, plan, breakdown, plan_path)
        logger.set_summary({"step_time_s": breakdown.step_time_s, "fits": breakdown.fits,
                            "max_overflow_bytes": breakdown.max_overflow_bytes})
    finally:
        logger.finish()
    return result


# -------------------------------------------------------------------------------- search
def _options(node: Any) -> dict:
    """A config node of method options as a plain dict (None = no options)."""
    return dict(OmegaConf.to_container(node, resolve=True)) if node is not None else {}


def _baseline_defaults(method: str) -> dict:
    """The options of ``conf/search/<method>.yaml`` (a baseline runs as it would on its own)."""
    path = CONF_DIR / "search" / f"{method}.yaml"
    if not path.exists():
        return {}
    node = OmegaConf.load(path)
    return dict(OmegaConf.to_container(node.get("options", {}), resolve=True))


def _stage_probabilities(record: dict):
    """The (L, p) layer-to-stage probabilities in a history record or snapshot, or None."""
    import numpy as np

    value = record.get("layer_stage_probs")
    if value is None:
        return None
    array = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, dtype=float)
    return array if array.ndim == 2 else None


def _scalars(record: dict, prefix: str) -> dict:
    """Finite numbers of a record (one level of nested dicts flattened with "/")."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update(_scalars(value, f"{prefix}/{key}"))
            continue
        if hasattr(value, "numel") and value.numel() == 1:
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


class _SearchReporter:
    """The search callback: logs each history record's numbers (expected and decoded cost,
    temperature, entropies, L_train, L_val, ...) at its step, and A's heatmap every
    ``heatmap_every`` records that carry ``layer_stage_probs``."""

    def __init__(self, logger, heatmap_every: int, prefix: str = "search",
                 progress_steps: int | None = None) -> None:
        self.logger, self.heatmap_every, self.prefix = logger, heatmap_every, prefix
        self.snapshots: list = []
        self.records = 0
        self.bar = None
        if progress_steps:
            from tqdm import tqdm

            self.bar = tqdm(total=progress_steps, desc=prefix, unit="step", mininterval=0.5,
                            dynamic_ncols=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __call__(self, record: dict) -> None:
        self.records += 1
        step = int(record.get("step", self.records - 1))
        if self.bar is not None:
            self.bar.update(max(0, step + 1 - self.bar.n))
            postfix = {}
            if "temperature" in record:
                postfix["T"] = f"{record['temperature']:.3f}"
            if "expected_step_time_s" in record:
                postfix["E[step]"] = f"{1e3 * record['expected_step_time_s']:.2f}ms"
            best = record.get("best_step_time_s")
            if isinstance(best, float) and math.isfinite(best):
                postfix["best"] = f"{1e3 * best:.2f}ms"
            self.bar.set_postfix(postfix, refresh=False)
        scalars = _scalars(record, self.prefix)
        if scalars:
            self.logger.log_metrics(scalars, step=step)
        probs = _stage_probabilities(record)
        if probs is not None:
            self.snapshots.append((step, probs))
            if self.heatmap_every and (len(self.snapshots) - 1) % self.heatmap_every == 0:
                from .viz.heatmap import stage_probability_image

                self.logger.log_image(f"{self.prefix}/A_stage", stage_probability_image(probs, step), step=step)


def _darts_steps(options: dict) -> int | None:
    """Number of relaxed steps DARTS will run (its option, else its default)."""
    if "steps" in options:
        return int(options["steps"])
    from .search.api import method_options

    accepted = method_options("darts") or {}
    steps = accepted.get("steps")
    return int(steps) if isinstance(steps, int) else None


def _snapshots(result, reporter: _SearchReporter) -> list:
    """A's layer-stage snapshots ``(step, probs)``: the method's own (DARTS keeps them in
    ``info["stage_snapshots"]``), else those the callback saw."""
    kept = result.info.get("stage_snapshots") if isinstance(result.info, dict) else None
    if kept:
        out = []
        for snap in kept:
            probs = _stage_probabilities(snap)
            if probs is not None:
                out.append((int(snap.get("step", len(out))), probs, snap.get("order"), snap.get("num_stages")))
        return out
    return [(step, probs, None, probs.shape[1]) for step, probs in reporter.snapshots]


def _heatmaps(snapshots: list, out_dir: Path) -> list[tuple[str, Path, Any]]:
    """A's heatmap figures over the search: panels at several steps, and the expected stage of
    every layer over the steps that share the last snapshot's branch. Written as PNGs."""
    from .viz.heatmap import plot_stage_evolution, plot_stage_probabilities, save_figure

    figures = []
    panels = plot_stage_probabilities([(s, p) for s, p, _, _ in snapshots],
                                      title="P(layer in stage) over the search")
    figures.append(("A_stage_over_steps", save_figure(panels, out_dir / "A_heatmap.png"), panels))
    last = snapshots[-1]
    same_branch = [(s, p) for s, p, o, n in snapshots if (o, n) == (last[2], last[3])]
    if len(same_branch) > 1 and same_branch[-1][1].shape[1] > 1:
        evo = plot_stage_evolution(same_branch, title=f"expected stage per layer ({last[3]} stages)")
        figures.append(("A_stage_evolution", save_figure(evo, out_dir / "A_evolution.png"), evo))
    return figures


def _result_note(result) -> str:
    """What a reader of the comparison should know about how a result was obtained."""
    info = result.info if isinstance(result.info, dict) else {}
    notes = []
    dp_info = info.get("dp", info) if result.method in ("dp", "device_blind") else {}
    if dp_info.get("stopped_early"):
        gap = dp_info.get("gap_bound")
        bounded = isinstance(gap, float) and 0 <= gap < 1
        notes.append("DP stopped at its time/solve limit: "
                     + (f"within {gap:.1%} of optimal" if bounded else "no optimality bound yet"))
    elif result.method == "dp" and info.get("exact") is False:
        notes.append("optimal within its restrictions: " + "; ".join(info.get("notes", [])))
    if result.method == "device_blind" and info.get("repaired_stages"):
        notes.append(f"recompute turned on for stages {info['repaired_stages']} to fit")
    if info.get("found_fitting") is False:
        notes.append("no sampled plan fits")
    if result.method == "darts" and isinstance(info.get("gap"), float) and math.isfinite(info["gap"]):
        notes.append(f"relaxed->decoded gap {info['gap']:+.1%}")
    if not result.cost.fits:
        notes.append("DOES NOT FIT")
    return "; ".join(notes)


def _result_row(result) -> dict:
    cost = result.cost
    return {
        "method": result.method,
        "step_time_s": cost.step_time_s,
        "fits": cost.fits,
        "peak_bytes": max(cost.peak_bytes_per_device.values(), default=0.0),
        "wall_time_s": result.wall_time_s,
        "evaluations": result.evaluations,
        "note": _result_note(result),
    }


def _bruteforce_size(profile, cluster, cost_model, space_options) -> int:
    from .search.bruteforce import count_choices
    from .space import SearchSpace

    return count_choices(SearchSpace(profile, cluster, space_options, cost_model))


def search_app(cfg: DictConfig, out_dir: str | Path | None = None) -> dict:
    """``dartspar-search``: search, compare with baselines, write the results (module doc).

    Returns a summary dict (paths of the written files, the main result's figures, the
    comparison rows).
    """
    from .logging import make_logger
    from .search.api import search
    from .space import SpaceOptions

    validate_search_app(cfg)
    out_dir = Path(out_dir) if out_dir is not None else _run_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    model_label = _hydra_choice("model") or cfg.model.name
    cluster_label = _hydra_choice("cluster")
    profile, spec = build_profile(cfg.model, model_label)
    cluster = build_cluster(cfg.cluster, cluster_label)
    cost_model = build_cost_model(profile, cluster, cfg.cost)
    try:
        space = SpaceOptions(global_batch_size=cfg.global_batch_size, **space_options_kwargs(cfg.space))
    except TypeError as err:
        raise ConfigError(f"space: {err}") from None
    method = cfg.search.method
    dtype_option = {"compute_dtype": cost_model.compute_dtype}
    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger = make_logger(
        cfg.logger, resolved, out_dir, name=f"{method}-{model_label}-{cluster.name}",
        group=_sweep_group(),
    )
    try:
        print(f"searching with {method}: model {model_label} ({profile.num_layers} layers, "
              f"{_params(profile.total_params)} parameters) on cluster {cluster.name} "
              f"({cluster.num_devices} devices), global batch {cfg.global_batch_size}")
        options = _options(cfg.search.options)
        # DARTS reports every step through the callback: a tqdm bar replaces its printed lines.
        bar_steps = _darts_steps(options) if method == "darts" and cfg.search.progress else None
        reporter = _SearchReporter(logger, cfg.logger.heatmap_every, progress_steps=bar_steps)
        try:
            result = search(
                profile, cluster, method, global_batch_size=cfg.global_batch_size, space=space,
                estimator=cost_model.estimator, seed=cfg.search.seed,
                progress=cfg.search.progress and bar_steps is None,
                callback=reporter, **dtype_option, **options,
            )
        except ValueError as err:
            # The methods refuse cases they cannot do (space too big, bad option value) with a
            # message that names the option to change.
            raise ConfigError(f"search={method}: {err}") from err
        finally:
            reporter.close()
        plan = replace(result.plan, meta={
            **(result.plan.meta or {}),
            "model": spec, "model_label": model_label, "cluster": cluster.name,
            "method": method, "seed": cfg.search.seed, "global_batch_size": cfg.global_batch_size,
        })
        if not plan.predicted:
            plan = cost_model.with_prediction(plan)
        plan_path = out_dir / "plan.json"
        plan.to_json(plan_path)
        _write_json(out_dir / "history.json", result.history)
        _write_json(out_dir / "search.json", {
            "method": method, "wall_time_s": result.wall_time_s, "evaluations": result.evaluations,
            "info": result.info, "cost": result.cost.to_dict(),
        })
        print(f"\n{method}: best plan ({result.wall_time_s:.2f} s, {result.evaluations} evaluations)")
        print(plan_table(plan, result.cost))

        rows = [_result_row(result)]
        rows += _run_baselines(cfg, profile, cluster, cost_model, space, method, dtype_option)
        _write_json(out_dir / "comparison.json", rows)
        print("\ncomparison on the same model, cluster and space")
        print(comparison_table(rows))

        _log_search_outputs(logger, plan, result, rows, reporter, plan_path, out_dir)
        print(f"\nwrote {plan_path}, {out_dir / 'history.json'}, {out_dir / 'comparison.json'}")
        return {
            "plan_path": str(plan_path), "step_time_s": result.cost.step_time_s,
            "fits": result.cost.fits, "wall_time_s": result.wall_time_s, "comparison": rows,
        }
    finally:
        logger.finish()


def _run_baselines(cfg, profile, cluster, cost_model, space, method: str, dtype_option: dict) -> list[dict]:
    from .search.api import search

    rows = []
    for baseline in cfg.compare.baselines:
        if baseline == method:
            continue
        options = {**_baseline_defaults(baseline), **_options(cfg.compare.options.get(baseline))}
        if baseline == "bruteforce":
            size = _bruteforce_size(profile, cluster, cost_model, space)
            limit = min(cfg.compare.bruteforce_max_plans, options.get("max_choices", size))
            if size > limit:
                rows.append({"method": baseline, "step_time_s": None,
                             "note": f"skipped: {size:,} plans in the space > {limit:,}"})
                continue
        print(f"baseline {baseline} ...", flush=True)
        try:
            result = search(
                profile, cluster, baseline, global_batch_size=cfg.global_batch_size, space=space,
                estimator=cost_model.estimator, seed=cfg.search.seed, progress=False,
                callback=None, **dtype_option, **options,
            )
        except ValueError as err:
            # A method that refuses the case (too big a space for it) says why; keep going.
            rows.append({"method": baseline, "step_time_s": None, "note": f"skipped: {err}"})
            continue
        rows.append(_result_row(result))
    return rows


def _log_plan(logger, plan, breakdown, plan_path: Path) -> None:
    """The plan as a per-stage table and as an artifact."""
    columns = ["stage", "layers", "devices", "dp", "tp", "recompute", "fwd_ms", "bwd_ms",
               "p2p_ms", "sync_ms", "memory_GiB", "capacity_GiB"]
    table = [
        [i, f"{s.layer_start}-{s.layer_end - 1}", c.devices, s.dp, s.tp, sum(s.recompute),
         1e3 * c.fwd_s, 1e3 * c.bwd_s, 1e3 * c.p2p_s, 1e3 * c.dp_sync_s, c.memory_bytes / GIB,
         c.capacity_bytes / GIB]
        for i, (s, c) in enumerate(zip(plan.stages, breakdown.stages))
    ]
    logger.log_table("plan", columns, table)
    logger.log_artifact(plan_path, name="plan", kind="plan")


def _log_search_outputs(logger, plan, result, rows, reporter, plan_path, out_dir) -> None:
    _log_plan(logger, plan, result.cost, plan_path)
    logger.log_table(
        "comparison", ["method", "step_time_ms", "fits", "wall_time_s", "evaluations", "note"],
        [[r["method"], None if r.get("step_time_s") is None else 1e3 * r["step_time_s"],
          r.get("fits"), r.get("wall_time_s"), r.get("evaluations"), r.get("note", "")] for r in rows],
    )
    snapshots = _snapshots(result, reporter)
    if snapshots:
        from .viz.heatmap import figure_to_rgb

        for key, _, fig in _heatmaps(snapshots, out_dir):
            logger.log_image(f"search/{key}", figure_to_rgb(fig))
    logger.set_summary({
        "step_time_s": result.cost.step_time_s, "fits": result.cost.fits,
        "search_wall_time_s": result.wall_time_s, "evaluations": result.evaluations,
        "num_stages": plan.num_stages, "num_microbatches": plan.num_microbatches,
        **{f"baseline/{r['method']}/step_time_s": r["step_time_s"] for r in rows[1:]
           if r.get("step_time_s") is not None},
    })


# ----------------------------------------------------------------------------------- run
class RunFailed(RuntimeError):
    """The executor could not run the plan; ``exit_code`` as ``LaunchError``'s (2: the plan
    cannot run here, 1: a rank failed during the run)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_app(cfg: DictConfig, out_dir: str | Path | None = None):
    """``dartspar-run``: run ``cfg.plan`` with the executor in ``out_dir`` (default: the run
    folder); prints measured vs predicted figures and returns the ``RunReport``.

    Raises RunFailed when the launch fails (after logging the failure)."""
    from .execute.launch import LaunchError, launch
    from .execute.options import Rendezvous, RunOptions
    from .logging import make_logger
    from .plan import Plan

    validate_run_app(cfg)
    out_dir = Path(out_dir) if out_dir is not None else _run_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path = _absolute(cfg.plan)
    plan = Plan.from_json(plan_path)  # a clear error for a missing or malformed file
    options = RunOptions(**executor_options_kwargs(cfg.executor, out_dir))
    rendezvous = Rendezvous(**OmegaConf.to_container(cfg.executor.rendezvous, resolve=True))
    meta = plan.meta if isinstance(plan.meta, dict) else {}
    model = meta.get("model")
    label = meta.get("model_label") or (model.get("name") if isinstance(model, dict) else model) or "model"
    logger = make_logger(
        cfg.logger, OmegaConf.to_container(cfg, resolve=True), out_dir,
        name=f"run-{label}-{plan.num_stages}st", group=_sweep_group(),
    )
    try:
        print(f"running {plan_path} ({plan.num_stages} stages, {len(plan.device_ids)} devices) for "
              f"{options.steps} steps, output in {out_dir}", flush=True)
        try:
            report = launch(plan_path, options, rendezvous)
        except LaunchError as err:
            logger.set_summary({"failed": True, "error": str(err)})
            raise RunFailed(str(err), err.exit_code) from None
        if report is None:  # a node other than the first of a multi-node run
            print("this node's ranks finished; the report is written by node 0")
            return None
        report_path = out_dir / "run_report.json"
        print(run_summary(report))
        print(f"run report: {report_path}")
        _log_run_outputs(logger, report, report_path, plan_path)
        return report
    finally:
        logger.finish()


def run_summary(report) -> str:
    """Measured figures of a run and, where the plan predicted them, the ratio."""
    loss = f"{report.losses[0]:.4f} -> {report.losses[-1]:.4f}" if report.losses else "n/a"
    lines = [
        f"step {1e3 * report.step_time_s:.2f} ms (median after {report.warmup_steps} warm-up "
        f"steps), {report.tokens_per_s:,.0f} tokens/s, loss {loss}, peak memory "
        f"{report.peak_memory_bytes_max / 2**20:.0f} MiB on {report.device} ({report.backend}, "
        f"{report.world_size} ranks)",
    ]
    if report.predicted_vs_measured:
        lines.append(f"{'figure':>24} {'predicted':>12} {'measured':>12} {'measured/predicted':>19}")
        for key, row in report.predicted_vs_measured.items():
            lines.append(f"{key:>24} {row['predicted']:>12.4g} {row['measured']:>12.4g} {row['ratio']:>19.3f}")
    return "\n".join(lines)


def _log_run_outputs(logger, report, report_path: Path, plan_path: Path) -> None:
    for i, (loss, step_s) in enumerate(zip(report.losses, report.step_times_s)):
        logger.log_metrics({"run/loss": loss, "run/step_time_s": step_s}, step=report.start_step + i)
    logger.log_table(
        "predicted_vs_measured", ["figure", "predicted", "measured", "ratio"],
        [[k, r["predicted"], r["measured"], r["ratio"]] for k, r in report.predicted_vs_measured.items()],
    )
    logger.log_table(
        "stages", ["stage", "layers", "ranks", "forward_s", "backward_s", "comm_s", "peak_memory_bytes"],
        [[s["stage"], str(s["layers"]), str(s["ranks"]), s["forward_s"], s["backward_s"], s["comm_s"],
          s["peak_memory_bytes"]] for s in (to_jsonable(st) for st in report.stages)],
    )
    logger.log_artifact(report_path, name="run_report", kind="run_report")
    logger.log_artifact(plan_path, name="plan", kind="plan")
    logger.set_summary({
        "step_time_s": report.step_time_s, "tokens_per_s": report.tokens_per_s,
        "mfu": report.mfu, "peak_memory_bytes": report.peak_memory_bytes_max,
        "final_loss": report.losses[-1] if report.losses else None,
        **{f"ratio/{k}": r["ratio"] for k, r in report.predicted_vs_measured.items()},
    })


# --------------------------------------------------------------------------- entry points
def _input_errors() -> tuple[type[BaseException], ...]:
    from omegaconf.errors import OmegaConfBaseException

    from .plan import PlanError

    errors: list[type[BaseException]] = [ConfigError, PlanError, OmegaConfBaseException]
    try:
        from .execute.checks import ExecutorError

        errors.append(ExecutorError)
    except ImportError:
        pass
    return tuple(errors)


def _hydra_app(config_name: str, prog: str, app: Callable[[DictConfig], Any]) -> None:
    """Run ``app`` as a Hydra app on ``conf/<config_name>.yaml``; input errors exit with one
    line on stderr and EXIT_INPUT_ERROR."""
    import hydra

    register_configs()

    def task(cfg: DictConfig) -> Any:
        try:
            return app(cfg)
        except (*_input_errors(), RunFailed) as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
            code = err.exit_code if isinstance(err, RunFailed) else EXIT_INPUT_ERROR
            raise SystemExit(code) from None

    task.__name__ = prog.replace("-", "_")
    hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(task)()


def _eval_task(cfg: DictConfig) -> None:
    result = evaluate_app(cfg)
    if not result["fits"] and cfg.fail_if_not_fits:
        raise SystemExit(EXIT_DOES_NOT_FIT)


def eval_main() -> None:
    """``dartspar-eval`` console script."""
    _hydra_app("config_eval", "dartspar-eval", _eval_task)


def search_main() -> None:
    """``dartspar-search`` console script."""
    _hydra_app("config_search", "dartspar-search", search_app)


def run_main() -> None:
    """``dartspar-run`` console script.

    ``dartspar-run plan=P.json executor.steps=N ...`` is the Hydra front end (sweeps with -m,
    W&B logging, one output folder per run). A first argument that is a ``.json`` path rather
    than a ``key=value`` override (``dartspar-run P.json --steps N``) goes to the executor's own
    argparse interface, ``dartspar.execute.launch.main``, unchanged.
    """
    argv = sys.argv[1:]
    if argv and argv[0].endswith(".json") and "=" not in argv[0]:
        from .execute.launch import main as launch_main

        raise SystemExit(launch_main(argv))
    _hydra_app("config_run", "dartspar-run", run_app)


def profile_kernels_main() -> None:
    """``dartspar-profile-kernels`` console script (``dartspar.cost.kernels.profiler.main``)."""
    from .cost.kernels.profiler import main

    raise SystemExit(main(sys.argv[1:]))
