"""Cluster layer: CP-SAT allocator, duration prediction, and the coordinator actor.

The allocator and predictor are pure Python (+ OR-Tools); only `coordinator` needs Ray, and it
is imported lazily so planning works without a Ray runtime.
"""

from alto_ray.cluster.allocator import OBJECTIVES, Allocator, plan, plan_fcfs
from alto_ray.cluster.plan import (GIB, Assignment, GroupBundles, InfeasibleTaskError, NodeSpec, Plan, PlanError,
                                   RunningGroup, TaskSpec)
from alto_ray.cluster.predict import DurationPredictor

__all__ = [
    "GIB", "OBJECTIVES", "Allocator", "Assignment", "DurationPredictor", "GroupBundles", "InfeasibleTaskError",
    "NodeSpec", "Plan", "PlanError", "RunningGroup", "TaskSpec", "plan", "plan_fcfs",
    "Coordinator", "GroupGrant", "get_coordinator", "COORDINATOR_NAME", "COORDINATOR_NAMESPACE",
    "Tenant", "GrantedPlacement", "TaskAlreadyFinished", "coordinated", "run_tenant",
    "RankLocalTrainer", "RankLocalGroup", "RankLocalWorker", "rank_local_trainer",
]

_LAZY = {"Coordinator": "coordinator", "GroupGrant": "coordinator", "get_coordinator": "coordinator",
         "COORDINATOR_NAME": "coordinator", "COORDINATOR_NAMESPACE": "coordinator",
         "Tenant": "tenant", "GrantedPlacement": "tenant", "TaskAlreadyFinished": "tenant",
         "coordinated": "tenant", "run_tenant": "tenant",
         # torch.distributed / Ray pieces of rank-local adapter parallelism, also imported lazily
         "RankLocalTrainer": "ranklocal", "RankLocalGroup": "ranklocal_ray", "RankLocalWorker": "ranklocal_ray",
         "rank_local_trainer": "ranklocal_ray"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"alto_ray.cluster.{_LAZY[name]}"), name)
    raise AttributeError(name)
