"""The grouped step: isolation of non-finite adapters, resume, add/remove, learning."""
from __future__ import annotations

import math

import pytest
import torch

from alto_ray.engine import AdapterConfig, DatasetSpec, GroupedTrainer


def _cfg(**kw) -> AdapterConfig:
    base = dict(rank=4, alpha=8, lr=5e-3, batch_size=2, max_seq_len=48, warmup_steps=1, max_steps=20, seed=0)
    base.update(kw)
    return AdapterConfig(**base)


THREE = {"x": _cfg(rank=4, seed=1), "y": _cfg(rank=8, lr=1e-2, batch_size=3, seed=2),
         "z": _cfg(rank=2, lr=2e-3, batch_size=1, grad_accum=2, seed=3)}


@pytest.fixture(scope="module")
def trainer_factory(tiny_model_dir, tiny_dataset_path):
    def make(configs=THREE) -> GroupedTrainer:
        t = GroupedTrainer(tiny_model_dir, DatasetSpec(tiny_dataset_path), device="cpu")
        for name, cfg in configs.items():
            t.add_adapter(name, cfg)
        return t
    return make


def _masters(t: GroupedTrainer) -> dict:
    return {n: w.master.detach().clone() for n, w in t.model.adapters.items()}


def test_nan_adapter_is_isolated(trainer_factory):
    clean, poisoned = trainer_factory(), trainer_factory()
    first_entry = poisoned.model.adapters["y"].entries[0]
    with torch.no_grad():  # poison one element of y's first A
        poisoned.model.adapters["y"].master[first_entry.a_offset] = float("nan")
    for _ in range(3):
        rc, rp = clean.step(), poisoned.step()
        assert not rp["y"].finite and math.isnan(rp["y"].loss)
        assert rc["y"].finite
        for name in ("x", "z"):
            assert rp[name].finite
            assert rp[name].loss == rc[name].loss  # bit for bit
            assert rp[name].grad_norm == rc[name].grad_norm
    mc, mp = _masters(clean), _masters(poisoned)
    for name in ("x", "z"):
        assert torch.equal(mc[name], mp[name])
    # y's optimizer step was skipped: only the poisoned element differs from the initial weights
    fresh = trainer_factory()
    y0 = fresh.model.adapters["y"].master.detach()
    same = (mp["y"] == y0) | torch.isnan(mp["y"])
    assert bool(same.all())
    assert poisoned.adapter_state("y")["optimizer"]["state"] == {}


def test_an_overflowing_optimizer_step_hurts_only_its_adapter(trainer_factory):
    # lr 1e38: y's gradients are finite but its first real update overflows its weights to
    # inf/NaN; from then on only y's results are non-finite, and x and z train bit for bit as
    # in a group where y is sane.
    clean = trainer_factory()
    wild = trainer_factory({**THREE, "y": _cfg(rank=8, lr=1e38, batch_size=3, seed=2)})
    seen_bad = False
    for _ in range(4):
        rc, rw = clean.step(), wild.step()
        seen_bad |= not rw["y"].finite
        for name in ("x", "z"):
            assert rw[name].finite and rw[name].loss == rc[name].loss
    assert seen_bad, "lr=1e38 never made y non-finite"
    mc, mw = _masters(clean), _masters(wild)
    assert all(torch.equal(mc[n], mw[n]) for n in ("x", "z"))


def test_step_results_are_per_adapter(trainer_factory):
    t = trainer_factory()
    results = t.step()
    assert set(results) == {"x", "y", "z"}
    assert results["x"].step == 1 and results["x"].lr == 0.0  # warm-up starts at 0
    r2 = t.step()
    assert r2["x"].lr == pytest.approx(5e-3) and r2["y"].lr == pytest.approx(1e-2)
    # z has grad_accum 2 × batch 1, x batch 2: they read the same number of sequences per step
    assert results["z"].tokens > 0 and results["x"].tokens > 0
    assert all(r.grad_norm > 0 for r in r2.values())


def test_resume_is_exact(trainer_factory):
    straight = trainer_factory()
    expected = [straight.step() for _ in range(6)]
    first = trainer_factory()
    got = [first.step() for _ in range(3)]
    states = {n: first.adapter_state(n) for n in first.adapter_names}
    for s in states.values():
        assert s["lora"].device.type == "cpu"
    resumed = trainer_factory({})
    for name, cfg in THREE.items():
        resumed.add_adapter(name, cfg, state=states[name])
    got += [resumed.step() for _ in range(3)]
    for step, (e, g) in enumerate(zip(expected, got)):
        for name in THREE:
            assert g[name].step == e[name].step == step + 1
            assert g[name].loss == pytest.approx(e[name].loss, rel=1e-6, abs=1e-7), (step, name)
            assert g[name].lr == e[name].lr


def test_add_remove_reuses_slot_and_leaves_others_alone(trainer_factory):
    t = trainer_factory()
    ref = trainer_factory()
    slot_y = t.model.adapters["y"].slot
    t.remove_adapter("y")
    ref.remove_adapter("y")
    t.add_adapter("w", _cfg(rank=3, seed=9, target_modules=("q_proj",)))
    assert t.model.adapters["w"].slot == slot_y
    assert t.num_adapters == 3 and sorted(t.adapter_names) == ["w", "x", "z"]
    rt, rr = t.step(), ref.step()
    for name in ("x", "z"):  # other adapters' numbers unchanged by the newcomer
        assert rt[name].loss == pytest.approx(rr[name].loss, rel=1e-5)
    with pytest.raises(ValueError, match="already"):
        t.add_adapter("w", _cfg())
    with pytest.raises(ValueError, match="target_modules"):
        t.add_adapter("v", _cfg(target_modules=("nonexistent_proj",)))
    assert "v" not in t.adapter_names


def test_adapters_learn_the_task(trainer_factory):
    t = trainer_factory({"fast": _cfg(rank=8, alpha=8, lr=2e-2, batch_size=4, max_steps=40, seed=1),
                         "frozen_lr": _cfg(rank=8, alpha=8, lr=1e-7, batch_size=4, max_steps=40, seed=1)})
    t.eval_size = 16
    before = t.evaluate()
    assert before["fast"] == before["frozen_lr"]  # same init (seed), B = 0: the backbone's loss
    for _ in range(12):
        t.step()
    after = t.evaluate()
    assert after["fast"] < before["fast"] - 0.25
    assert abs(after["frozen_lr"] - before["frozen_lr"]) < 0.01


def test_eval_under_a_small_token_budget_gives_the_same_losses(trainer_factory):
    """Evaluation split over adapter subsets and smaller example chunks (as after an OOM back-off)
    must not change any adapter's eval loss."""
    t = trainer_factory({"a": _cfg(rank=4, seed=1), "b": _cfg(rank=8, seed=2), "c": _cfg(rank=2, seed=3)})
    for _ in range(2):
        t.step()
    whole = t.evaluate()
    t.eval_token_budget = 40  # forces one adapter per forward and 1-2 examples per chunk
    split = t.evaluate()
    assert set(split) == {"a", "b", "c"}
    for name in whole:
        assert split[name] == pytest.approx(whole[name], rel=1e-5)


def test_no_cyclic_collection_lands_inside_a_step(trainer_factory):
    """With a generation-0 threshold of 1 every allocation would collect; held off, none runs
    inside step() or evaluate() (a collection's stack holds their frames), and the collector is
    back on (or still off) afterwards."""
    import gc
    import sys

    t = trainer_factory()
    t.step()
    seen: list = []
    inner = {"_step", "_evaluate"}

    def count(phase, info):
        if phase != "start":
            return
        f = sys._getframe(1)
        while f is not None and f.f_code.co_name not in inner:
            f = f.f_back
        if f is not None:
            seen.append(f.f_code.co_name)

    old = gc.get_threshold()
    gc.callbacks.append(count)
    try:
        gc.set_threshold(1, 10, 10)
        counts = {}
        for pause in (False, True):
            t.pause_gc = pause
            before = len(seen)
            t.step()
            t.evaluate()
            counts[pause] = len(seen) - before
            assert gc.isenabled()
        gc.disable()
        t.step()
        assert not gc.isenabled()  # a caller's choice is left as it was
        gc.enable()
    finally:
        gc.set_threshold(*old)
        gc.callbacks.remove(count)
        gc.enable()
    assert counts[False] > 0, "the threshold did not make the collector run: the test sees nothing"
    assert counts[True] == 0


def test_pause_gc_follows_the_environment(trainer_factory, monkeypatch):
    from alto_ray.engine.gc_pause import pause_gc_default

    monkeypatch.setenv("ALTO_PAUSE_GC", "0")
    assert pause_gc_default() is False and pause_gc_default(True) is True
    monkeypatch.delenv("ALTO_PAUSE_GC")
    assert pause_gc_default() is True and pause_gc_default(False) is False
