"""cluster.yaml: valid against the schema Ray ships, and sensible for alto-ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_matches_ray_schema(config: dict) -> None:
    import ray.autoscaler
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)


def test_ray_launcher_accepts_it(config: dict) -> None:
    """What `ray up` does first: fill defaults, then validate (private API: skip if it moved)."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        pytest.skip("ray.autoscaler._private.util moved")
    validate_config(prepare_config(dict(config)))


def test_node_types_and_bounds(config: dict) -> None:
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types
    workers = {name: t for name, t in types.items() if name != head}
    assert workers, "no worker node types"
    for name, t in workers.items():
        res = t["resources"]
        assert res.get("GPU", 0) >= 1, f"worker type {name} has no GPU"
        assert res.get("alto_gpu_memory_gb", 0) > 0, f"worker type {name} lacks alto_gpu_memory_gb"
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"], name
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= config["max_workers"]
    assert max(t["max_workers"] for t in workers.values()) <= config["max_workers"]


def test_commands_install_alto_and_enable_dashboard(config: dict) -> None:
    setup = " ".join(config["setup_commands"])
    assert "alto_ray" in setup or "alto-ray" in setup
    for src in config.get("file_mounts", {}).values():
        assert not str(src).startswith("/"), "file_mounts sources should be repo-relative"
    head = " ".join(config["head_start_ray_commands"])
    assert "--head" in head and "--include-dashboard=true" in head and "--autoscaling-config" in head
    assert "--address=$RAY_HEAD_IP" in " ".join(config["worker_start_ray_commands"])
