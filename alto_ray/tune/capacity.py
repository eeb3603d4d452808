"""What the cluster holds now, and what its autoscaler could add.

A task's capacity checks (`LoRATask.validate`, `local_placement`) look at the alive nodes, but on
an autoscaling cluster (`ray up cluster.yaml` with `min_workers: 0` GPU types) the GPU nodes a
task needs may not exist yet: refusing it, or placing it on the CPU, would be wrong. The cluster
launcher leaves its config on the head node (`~/ray_bootstrap_config.yaml`, where `ray job
submit` runs the driver); each worker type there with `max_workers > 0` is a node the autoscaler
can start for a pending placement group. `ALTO_RAY_BOOTSTRAP_CONFIG` names another file (or
"none" to ignore it); the coordinator actor gets the driver's value as an argument
(`driver_bootstrap_config`), since an actor's process does not see the driver's environment.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

logger = logging.getLogger(__name__)

BOOTSTRAP_ENV = "ALTO_RAY_BOOTSTRAP_CONFIG"
DEFAULT_BOOTSTRAP = "~/ray_bootstrap_config.yaml"


def alive_nodes() -> Optional[List[Dict[str, float]]]:
    """Total resources of each alive node; None when Ray is not connected."""
    try:
        import ray

        if ray.is_initialized():
            return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    except Exception:  # pragma: no cover - Ray not importable / not connected
        pass
    return None


def driver_bootstrap_config() -> Optional[str]:
    """This process's `ALTO_RAY_BOOTSTRAP_CONFIG`, made absolute ("none" kept), for an actor that
    reads the config on the same node; None when it is not set."""
    path = os.environ.get(BOOTSTRAP_ENV)
    if not path:
        return None
    return path if path.strip().lower() == "none" else os.path.abspath(os.path.expanduser(path))


def launchable_node_types(path: Optional[str] = None) -> List[Dict[str, float]]:
    """Resources of each worker node type the autoscaler may start (`max_workers > 0`)."""
    return [resources for _name, resources, _max in launchable_worker_types(path)]


def launchable_worker_types(path: Optional[str] = None) -> List[Tuple[str, Dict[str, float], int]]:
    """(type name, resources, max_workers) of each worker type the autoscaler may start.

    max_workers is the type's own cap, bounded by the cluster-wide `max_workers`; the coordinator
    turns it into that many potential nodes of the type.
    """
    path = path or os.environ.get(BOOTSTRAP_ENV) or DEFAULT_BOOTSTRAP
    if path.strip().lower() == "none":
        return []
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        return []
    try:
        import yaml

        with open(path) as f:
            config: Any = yaml.safe_load(f) or {}
        types = config.get("available_node_types") or {}
        cluster_max = int(config.get("max_workers", 1) or 0)
        out = []
        for name, spec in types.items():
            most = min(int(spec.get("max_workers", cluster_max) or 0), cluster_max)
            if most > 0:
                out.append((str(name), {str(k): float(v) for k, v in (spec.get("resources") or {}).items()}, most))
        return out
    except Exception as err:  # an unreadable config must not break a task: ignore it
        logger.warning("alto: ignoring autoscaler config %s: %s", path, err)
        return []


def alive_gpus(nodes: Optional[List[Dict[str, float]]]) -> float:
    return sum(n.get("GPU", 0.0) for n in nodes or [])


def gpus_possible(nodes: Optional[List[Dict[str, float]]], launchable: List[Dict[str, float]]) -> bool:
    """A GPU now, or a GPU node type the autoscaler can start."""
    return alive_gpus(nodes) > 0 or any(t.get("GPU", 0.0) > 0 for t in launchable)
