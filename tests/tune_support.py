"""Helpers shared by the tests of `alto_ray.tune` on a real local Ray cluster."""
from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ray import tune


class Recorder(tune.Callback):
    """Every result Tune sees (in the driver), trials Tune recovered after an error."""

    def __init__(self, on_result: Optional[Any] = None) -> None:
        self.rows: List[Dict[str, Any]] = []
        self.recovered: set = set()
        self.errored: set = set()
        self._on_result = on_result

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: Dict[str, Any], **info: Any) -> None:
        self.rows.append({"trial": trial.trial_id, "step": result.get("step"), "loss": result.get("loss"),
                          "t": time.time(), "group": result.get("alto_group"),
                          "active": result.get("alto_active"), "queue_wait_s": result.get("queue_wait_s"),
                          "pid": result.get("pid"),
                          "config": dict(trial.config)})
        if self._on_result is not None:
            self._on_result(trial, result)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.recovered.add(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.errored.add(trial.trial_id)

    def steps(self) -> Dict[str, List[int]]:
        out: Dict[str, List[int]] = defaultdict(list)
        for row in self.rows:
            out[row["trial"]].append(int(row["step"]))
        return dict(out)

    def losses(self) -> Dict[str, Dict[int, float]]:
        """Per trial: step → loss, the last report of a step winning (a resumed step repeats)."""
        out: Dict[str, Dict[int, float]] = defaultdict(dict)
        for row in self.rows:
            out[row["trial"]][int(row["step"])] = float(row["loss"])
        return dict(out)


def reference_losses(task: Any, configs: Sequence[Dict[str, Any]], steps: int) -> List[List[float]]:
    """The same adapters trained in-process in one GroupedTrainer, without Ray or Tune."""
    import torch

    from alto_ray.engine import AdapterConfig, DatasetSpec, GroupedTrainer

    torch.manual_seed(0)
    trainer = GroupedTrainer(task.model, DatasetSpec(task.dataset, eval_size=task.eval_size),
                             device="cpu", eval_size=task.eval_size)
    for i, config in enumerate(configs):
        trainer.add_adapter(str(i), AdapterConfig.from_dict(task.adapter_dict(config)))
    history: List[List[float]] = [[] for _ in configs]
    for _ in range(steps):
        results = trainer.step()
        for i in range(len(configs)):
            history[i].append(results[str(i)].loss)
    return history


def close(a: float, b: float, rel: float = 1e-4) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=rel)


def contiguous_resume(steps: List[int], every: int) -> bool:
    """Steps rise by one, except that after a restart they resume at a checkpoint (a multiple
    of `every`) + 1 — so no step beyond the checkpoint is lost or skipped."""
    for prev, cur in zip(steps, steps[1:]):
        if cur == prev + 1:
            continue
        if not (cur <= prev and (cur - 1) % every == 0):
            return False
    return True


@contextmanager
def local_ray(**init_kwargs: Any) -> Iterator[None]:
    """A fresh 2-CPU local Ray for a test module; the coordinator (if a tenant made one) dies with it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, **init_kwargs)
    try:
        yield
    finally:
        kill_coordinator(wait=False)
        ray.shutdown()


@contextmanager
def local_cluster(head_cpus: int = 2) -> Iterator[Any]:
    """A real multi-node Ray on this machine (`ray.cluster_utils.Cluster`: a head; tests add
    and remove nodes), the driver connected; the coordinator (if one was made) dies with it."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus})
    ray.init(address=cluster.address, namespace="alto-test", log_to_driver=False, configure_logging=False)
    try:
        yield cluster
    finally:
        kill_coordinator(wait=False)
        ray.shutdown()
        cluster.shutdown()


def kill_coordinator(wait: bool = True) -> None:
    """Kill the cluster's coordinator actor, if any; `wait`: until its name is free again."""
    import ray

    from alto_ray.cluster.coordinator import COORDINATOR_NAME, COORDINATOR_NAMESPACE

    def alive() -> Any:
        try:
            return ray.get_actor(COORDINATOR_NAME, namespace=COORDINATOR_NAMESPACE)
        except ValueError:
            return None

    coord = alive()
    if coord is not None:
        ray.kill(coord)
        if wait:
            until(lambda: alive() is None)


def until(check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    """Poll `check` until it returns something true (and return that); fail after `timeout_s`."""
    end = time.time() + timeout_s
    while not (value := check()):
        assert time.time() < end, "timed out"
        time.sleep(0.1)
    return value


def write_bootstrap(tmp_path: Any, gpus: int = 4, max_workers: int = 2) -> str:
    """A launcher config as `ray up` leaves it on the head: a CPU head, one GPU worker type `gpu4`."""
    import yaml

    config = {"cluster_name": "t", "max_workers": 4, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 2, "GPU": 0}, "max_workers": 0},
        "gpu4": {"resources": {"CPU": 8, "GPU": gpus}, "min_workers": 0, "max_workers": max_workers}}}
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def load_peft_checkpoint(model_dir: str, path: str) -> Tuple[int, bool]:
    """`PeftModel.from_pretrained(base, path)`: (the adapter's r, whether it changes the logits)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    with torch.no_grad():
        before = base(ids).logits
        model = PeftModel.from_pretrained(base, path)
        after = model(ids).logits
    return model.peft_config["default"].r, not torch.allclose(before, after)
