"""LoRATask validation and naming, and checkpoint file handling: no Ray cluster needed."""
from __future__ import annotations

import os

import pytest

from alto_ray.tune.checkpoint import STATE_FILE, read_files, write_files
from alto_ray.tune.task import LoRATask, local_placement
from alto_ray.tune.trainable import LoRATrainable, lora_trainable


def test_valid_task_and_derived_name(tiny_model_dir: str, tiny_dataset_path: str) -> None:
    task = LoRATask(model=tiny_model_dir, dataset=tiny_dataset_path, max_steps=10, eval_every=5)
    assert task.validate() is task
    assert task.checkpoint_interval == 5
    name = task.task_name
    assert name.startswith(os.path.basename(tiny_model_dir)) and "arith" in name
    assert LoRATask(model=tiny_model_dir, dataset=tiny_dataset_path, max_steps=10, eval_every=5).task_name == name
    assert task.replace(max_steps=11).task_name != name  # other settings, other groups
    assert task.replace(name="mine").task_name == "mine"


@pytest.mark.parametrize("changes, field", [
    ({"model": "/no/such/model"}, "model"),
    ({"model": "./relative/missing"}, "model"),
    ({"dataset": "/no/such/data.jsonl"}, "dataset"),
    ({"max_steps": 0}, "max_steps"),
    ({"eval_every": -1}, "eval_every"),
    ({"checkpoint_every": 0}, "checkpoint_every"),
    ({"steps_per_report": 1.5}, "steps_per_report"),
    ({"max_adapters_per_group": 0}, "max_adapters_per_group"),
    ({"device": "tpu"}, "device"),
    ({"dtype": "int8"}, "dtype"),
    ({"lease_timeout_s": 0}, "lease_timeout_s"),
    ({"name": "bad name!"}, "name"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"cuda_graphs": "yes"}, "cuda_graphs"),
    ({"cuda_graphs": True, "gpus_per_group": 2}, "cuda_graphs"),
])
def test_validate_names_the_field(tiny_model_dir: str, tiny_dataset_path: str, changes: dict, field: str) -> None:
    task = LoRATask(model=tiny_model_dir, dataset=tiny_dataset_path).replace(**changes)
    with pytest.raises(ValueError, match=f"LoRATask.{field}"):
        task.validate()
    with pytest.raises(ValueError, match=f"LoRATask.{field}"):
        lora_trainable(task)  # fails on the driver, before Tune starts anything


def test_dataset_records_and_model_dir_are_checked(tiny_model_dir: str, tiny_dataset_path: str, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "answer": "2"}\n')
    with pytest.raises(ValueError, match="LoRATask.dataset: records need 'text'"):
        LoRATask(model=tiny_model_dir, dataset=str(bad)).validate()
    with pytest.raises(ValueError, match="LoRATask.model: .* has no config.json"):
        LoRATask(model=str(tmp_path), dataset=tiny_dataset_path).validate()


def test_hub_id_is_not_checked_locally(tiny_dataset_path: str) -> None:
    LoRATask(model="meta-llama/Llama-3.2-1B", dataset=tiny_dataset_path).validate()


def test_adapter_dict_layers_defaults_schedule_and_config(tiny_model_dir: str, tiny_dataset_path: str) -> None:
    task = LoRATask(model=tiny_model_dir, dataset=tiny_dataset_path, max_steps=7, max_seq_len=64,
                    warmup_steps=2, adapter_defaults={"lr_schedule": "constant", "rank": 4})
    merged = task.adapter_dict({"rank": 16, "lr": 1e-3, "trial_note": "x"})
    assert merged["rank"] == 16 and merged["lr"] == 1e-3 and merged["max_steps"] == 7
    assert merged["max_seq_len"] == 64 and merged["warmup_steps"] == 2 and merged["lr_schedule"] == "constant"


def test_local_placement_without_gpus(tiny_model_dir: str, tiny_dataset_path: str) -> None:
    task = LoRATask(model=tiny_model_dir, dataset=tiny_dataset_path, name="t")
    (spec,) = local_placement(task)
    assert spec.name == "alto:t:g0" and spec.resources == {"CPU": 1.0}
    specs = local_placement(task.replace(num_groups=3, group_resources={"CPU": 0.5}))
    assert [s.name for s in specs] == ["alto:t:g0", "alto:t:g1", "alto:t:g2"]
    assert all(s.resources == {"CPU": 0.5} for s in specs)


def test_trainable_asks_for_almost_nothing(tiny_model_dir: str, tiny_dataset_path: str) -> None:
    cls = lora_trainable(LoRATask(model=tiny_model_dir, dataset=tiny_dataset_path, name="qa-v1"))
    other = lora_trainable(LoRATask(model=tiny_model_dir, dataset=tiny_dataset_path, name="summaries"))
    assert issubclass(cls, LoRATrainable) and cls.__name__ == "LoRATrainable_qa_v1"
    assert other.__name__ != cls.__name__  # Tune's registry is keyed by name
    bundles = cls.default_resource_request({}).bundles
    assert bundles == [{"CPU": 0.01}]


def test_checkpoint_files_round_trip(tmp_path) -> None:
    files = {STATE_FILE: b"\x00state", "adapter_config.json": b"{}", "adapter_model.safetensors": b"w"}
    write_files(str(tmp_path), files)
    assert read_files(str(tmp_path)) == files
    with pytest.raises(ValueError, match="not an alto-ray checkpoint"):
        read_files(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="plain file name"):
        write_files(str(tmp_path), {"../x": b""})


def test_reports_of_several_steps_average_the_loss() -> None:
    from alto_ray.tune.trainable import _merge

    rows = [{"loss": 2.0, "finite": True, "step": 1, "lr": 0.1, "group_step_s": 0.5},
            {"loss": 4.0, "finite": True, "step": 2, "lr": 0.2, "group_step_s": 0.5}]
    merged = _merge(rows)
    assert merged["loss"] == 3.0 and merged["step"] == 2 and merged["lr"] == 0.2
    assert merged["time_in_group_s"] == 1.0
    rows[0].update(loss=float("nan"), finite=False)
    merged = _merge(rows)
    assert merged["loss"] != merged["loss"] and not merged["finite"]  # NaN anywhere shows


def test_memory_budget_admits_by_estimate_and_cap(tiny_model_dir: str) -> None:
    import torch
    from transformers import AutoConfig

    from alto_ray.engine import AdapterConfig
    from alto_ray.tune.admission import MemoryBudget

    cfg = AdapterConfig(rank=8, batch_size=4, max_seq_len=64)
    mem = MemoryBudget("cpu", AutoConfig.from_pretrained(tiny_model_dir), torch.float32, 0.1, None)
    need = mem.estimate(cfg)
    assert need > 0
    mem.budget = 2.5 * need
    assert mem.admit("a", cfg, []) and mem.admit("b", cfg, ["a"])
    assert not mem.admit("c", cfg, ["a", "b"])  # a third would not fit
    assert mem.admit("c", cfg, ["b"])  # "a" left: its charge is released
    mem.on_oom()  # the estimate proved too low: what was charged no longer fits
    assert mem.budget < 2 * need and not mem.admit("d", cfg, ["b", "c"])
    assert mem.admit("lone", cfg, [])  # a lone adapter always gets a try
    capped = MemoryBudget("cpu", None, None, 0.1, max_adapters=1)
    assert capped.admit("a", cfg, []) and not capped.admit("b", cfg, ["a"])


def _rank_adder(mem, cfg, where: dict, route: dict):
    """Admit an adapter the way an AdapterGroup over a RankLocalGroup does: route, admit, place."""
    def add(name: str, rank: int) -> bool:
        route["rank"] = rank
        ok = mem.admit(name, cfg, list(where))
        if ok:
            where[name] = rank
        return ok
    return add


def test_rank_budget_charges_the_rank_an_adapter_is_routed_to(tiny_model_dir: str) -> None:
    import torch
    from transformers import AutoConfig

    from alto_ray.engine import AdapterConfig
    from alto_ray.tune.admission import RankMemoryBudget

    cfg = AdapterConfig(rank=8, batch_size=4, max_seq_len=64)
    where: dict = {}  # adapter -> rank, as RankLocalGroup.placement reports it
    route = {"rank": 0}  # where RankLocalGroup.route would send the next adapter
    mem = RankMemoryBudget(AutoConfig.from_pretrained(tiny_model_dir), torch.float32, 0.1, None, free=-1.0,
                           placement=lambda: dict(where), route=lambda c: route["rank"])
    assert mem.budget == 0.0  # a negative figure (gathered units bigger than free memory): lone adapters only
    need = mem.estimate(cfg)
    mem.budget = 2.5 * need  # two adapters per rank

    add = _rank_adder(mem, cfg, where, route)

    assert add("a", 0) and add("b", 0)
    assert not add("c", 0)  # rank 0 is full...
    assert add("c", 1) and add("d", 1)  # ...rank 1 is not: 4 adapters, twice one device's budget
    assert not add("e", 1) and not add("e", 0)
    del where["a"]  # left: its rank has room again
    assert add("e", 0)
    mem.on_oom()  # the fullest rank's charge proved too much
    assert mem.budget < 2 * need and not add("f", 1)


def test_rank_budget_follows_the_ranks_measured_peaks(tiny_model_dir: str) -> None:
    # On GPUs each rank reports its step's peak; the estimates (over-estimates) are scaled to the
    # worst rank's measured/charged ratio, so more adapters fit when they cost less than estimated.
    import torch
    from transformers import AutoConfig

    from alto_ray.engine import AdapterConfig
    from alto_ray.tune.admission import RankMemoryBudget

    cfg = AdapterConfig(rank=8, batch_size=4, max_seq_len=64)
    where: dict = {}
    route = {"rank": 0}
    peaks: list = [None, None]
    mem = RankMemoryBudget(AutoConfig.from_pretrained(tiny_model_dir), torch.float32, 0.1, None, free=1.0,
                           placement=lambda: dict(where), route=lambda c: route["rank"], peaks=lambda: peaks)
    need = mem.estimate(cfg)
    mem.budget = 2.5 * need

    add = _rank_adder(mem, cfg, where, route)

    assert add("a", 0) and add("b", 0) and not add("c", 0)
    mem.after_step()  # CPU ranks measure nothing: the estimates stand
    assert mem.scale == 1.0 and not add("c", 0)
    peaks[:] = [int(0.5 * need), None]  # rank 0's two adapters used a quarter of their estimate
    mem.after_step()
    assert abs(mem.scale - 1.15 * 0.25) < 1e-9
    assert add("c", 0) and add("d", 0)  # now four fit where two did
    add("x", 1)
    peaks[:] = [int(0.5 * need), int(2 * need)]  # rank 1 used twice its estimate: it sets the scale
    mem.after_step()
    assert mem.scale == 1.0 and not add("e", 0)

