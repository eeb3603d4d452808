"""AdapterConfig validation, Tune-config parsing and LR schedules."""
from __future__ import annotations

import pytest
import torch

from alto_ray.engine import DEFAULT_TARGET_MODULES, AdapterConfig, lr_at


@pytest.mark.parametrize("field,value", [
    ("rank", 0), ("rank", -4), ("rank", 2.5), ("alpha", 0), ("alpha", -1.0), ("lr", 0.0), ("lr", -1e-4),
    ("lr", float("nan")), ("dropout", 1.0), ("dropout", -0.1), ("batch_size", 0), ("max_seq_len", 0),
    ("grad_accum", 0), ("warmup_steps", -1), ("lr_schedule", "exponential"), ("weight_decay", -0.1),
    ("betas", (0.9, 1.0)), ("max_steps", 0), ("target_modules", ()),
])
def test_validate_names_the_bad_field(field, value):
    cfg = AdapterConfig()
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=field):
        cfg.validate()


def test_defaults_validate():
    cfg = AdapterConfig().validate()
    assert cfg.target_modules == DEFAULT_TARGET_MODULES
    assert cfg.scale == 2.0


def test_from_dict_known_keys_aliases_and_comma_targets():
    cfg = AdapterConfig.from_dict({"r": 8, "lora_alpha": 16, "lr": 1e-3, "batch_size": 4.0,
                                   "target_modules": "q_proj, v_proj", "unrelated_tune_key": 3,
                                   "lr_schedule": "linear"})
    assert (cfg.rank, cfg.alpha, cfg.lr, cfg.batch_size) == (8, 16, 1e-3, 4)
    assert isinstance(cfg.batch_size, int)
    assert cfg.target_modules == ("q_proj", "v_proj")
    assert cfg.lr_schedule == "linear"
    both = AdapterConfig.from_dict({"rank": 4, "r": 99})
    assert both.rank == 4  # the canonical key wins
    listed = AdapterConfig.from_dict({"target_modules": ["k_proj"], "betas": [0.8, 0.9]})
    assert listed.target_modules == ("k_proj",) and listed.betas == (0.8, 0.9)
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule_matches_transformers(schedule):
    import transformers

    cfg = AdapterConfig(lr=3e-3, warmup_steps=4, max_steps=20, lr_schedule=schedule)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = {"cosine": lambda: transformers.get_cosine_schedule_with_warmup(opt, 4, 20),
             "linear": lambda: transformers.get_linear_schedule_with_warmup(opt, 4, 20),
             "constant": lambda: transformers.get_constant_schedule_with_warmup(opt, 4)}[schedule]()
    for step in range(25):
        assert lr_at(cfg, step) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
        opt.step()
        sched.step()
