"""Built-in models, each a ``SequentialModel`` whose ``layers`` are the pipeline's layers."""

from __future__ import annotations

from .gpt import GPT, GPTConfig
from .mlp import MLP, MLPConfig, Unbalanced, UnbalancedConfig
from .sequential import SequentialModel

__all__ = [
    "GPT", "GPTConfig", "MLP", "MLPConfig", "Unbalanced", "UnbalancedConfig",
    "SequentialModel", "build_model", "MODEL_CONFIGS",
]

MODEL_CONFIGS = {"gpt": (GPT, GPTConfig), "mlp": (MLP, MLPConfig), "unbalanced": (Unbalanced, UnbalancedConfig)}


def build_model(name: str, **config) -> SequentialModel:
    """Build a built-in model by name ("gpt", "mlp", "unbalanced") from its config fields."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"model name {name!r} is unknown; choose one of {sorted(MODEL_CONFIGS)}")
    model_cls, config_cls = MODEL_CONFIGS[name]
    known = set(config_cls.__dataclass_fields__)
    unknown = set(config) - known
    if unknown:
        raise ValueError(f"model {name!r} has no config fields {sorted(unknown)}; known: {sorted(known)}")
    if "widths" in config:
        config["widths"] = tuple(config["widths"])
    return model_cls(config_cls(**config))
