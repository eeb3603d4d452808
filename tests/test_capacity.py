"""Capacity checks on an autoscaling cluster: GPU node types the autoscaler can start count.

A real local Ray cluster (CPU only) plays the head of a `ray up` cluster whose GPU workers are not
up yet; the cluster launcher's config (the repo's own `cluster.yaml` schema) says what can start.
"""
from __future__ import annotations

import os

import pytest
import yaml

ray = pytest.importorskip("ray")

from alto_ray.tune.capacity import BOOTSTRAP_ENV, launchable_node_types  # noqa: E402
from alto_ray.tune.task import RANK_LOCAL_TRAINER, LoRATask  # noqa: E402
from alto_ray.tune.trainable import lora_trainable  # noqa: E402
from tune_support import local_ray  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cluster():
    with local_ray():
        yield


def _bootstrap(tmp_path, gpu_max_workers: int) -> str:
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        config = yaml.safe_load(f)
    for spec in config["available_node_types"].values():
        if spec.get("resources", {}).get("GPU"):
            spec["max_workers"] = gpu_max_workers if spec["resources"]["GPU"] >= 8 else 0
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_the_launchers_config_lists_the_worker_types_it_can_start(tmp_path) -> None:
    types = launchable_node_types(os.path.join(ROOT, "cluster.yaml"))
    assert sorted(t["GPU"] for t in types) == [1.0, 8.0, 8.0]  # the head (max_workers 0) is not one
    assert launchable_node_types(str(tmp_path / "missing.yaml")) == []
    assert launchable_node_types("none") == []


def test_a_task_waits_for_gpu_nodes_the_autoscaler_can_start(cluster, tiny_model_dir, tiny_dataset_path,
                                                               tmp_path, monkeypatch) -> None:
    big = dict(model=tiny_model_dir, dataset=tiny_dataset_path, gpus_per_group=4, device="cuda", name="big")
    one = dict(model=tiny_model_dir, dataset=tiny_dataset_path, name="one")
    monkeypatch.setenv(BOOTSTRAP_ENV, "none")  # no autoscaler: only the alive (CPU) node counts
    with pytest.raises(ValueError, match=r"LoRATask\.gpus_per_group: .* no node"):
        lora_trainable(LoRATask(**big))
    assert "GPU" not in LoRATask(**one).group_specs()[0].resources
    monkeypatch.setenv(BOOTSTRAP_ENV, _bootstrap(tmp_path, gpu_max_workers=2))  # 8-GPU nodes can start
    lora_trainable(LoRATask(**big))  # no error: its group's placement group will wait for a node
    (spec,) = LoRATask(**big).group_specs()
    assert spec.trainer == RANK_LOCAL_TRAINER and spec.trainer_kwargs["use_gpu"]
    assert spec.trainer_kwargs["num_ranks"] == 4
    assert LoRATask(**one).group_specs()[0].resources.get("GPU") == 1.0  # a GPU group, not a CPU one
    monkeypatch.setenv(BOOTSTRAP_ENV, _bootstrap(tmp_path, gpu_max_workers=0))  # GPU types capped at 0
    with pytest.raises(ValueError, match=r"LoRATask\.gpus_per_group"):
        lora_trainable(LoRATask(**big))
