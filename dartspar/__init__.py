"""dartspar: find how to parallelize a PyTorch model across a (mixed) cluster by gradient descent,
then run the answer on torch.distributed.

Main entry points::

    prof = dartspar.profile(model, example_inputs)          # per-layer costs, on the meta device
    cluster = dartspar.load_cluster("mixed")                # conf/cluster/mixed.yaml
    result = dartspar.search(prof, cluster, method="darts", global_batch_size=64)
    dartspar.CostModel(prof, cluster).evaluate(result.plan) # the cost breakdown of any plan
"""

from . import profile, search, sim
from .cluster import Cluster, DeviceSpec, Link, Node, list_clusters, load_cluster
from .cost.model import CostBreakdown, CostModel
from .plan import Plan, PlanError, StageSpec
from .profile import GemmShape, LayerProfile, ModelProfile
from .space import Choice, SearchSpace, SpaceOptions

__all__ = [
    "profile", "search", "sim", "Cluster", "DeviceSpec", "Link", "Node", "list_clusters",
    "load_cluster", "CostBreakdown", "CostModel", "Plan", "PlanError", "StageSpec", "GemmShape",
    "LayerProfile", "ModelProfile", "Choice", "SearchSpace", "SpaceOptions",
]
__version__ = "0.1.0"
