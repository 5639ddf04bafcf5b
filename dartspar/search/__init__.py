"""Planners over the shared search space: ``search(profile, cluster, method=...)``.

Methods (``METHODS``): "darts" (gradient descent over the relaxed strategy matrix), and the
baselines on the same cost model: "dp" (exact inter-op dynamic program, PipeDream/Alpa),
"mcmc" (FlexFlow-style Metropolis-Hastings), "random", "bruteforce" (small spaces) and
"device_blind" (the DP on the cluster's average device, scored on the real cluster).
"""

import sys as _sys
import types as _types

from .api import METHODS, method_options, search
from .result import SearchResult

__all__ = ["search", "SearchResult", "METHODS", "method_options"]


class _CallableModule(_types.ModuleType):
    """Lets ``dartspar.search(profile, cluster, ...)`` call ``search`` while ``dartspar.search``
    stays this package, so ``dartspar.search.dp`` and the function share a name."""

    def __call__(self, *args, **kwargs) -> SearchResult:
        return search(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
