"""Per-adapter hyperparameters: one ``AdapterConfig`` per trial, checked before any work starts."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Tuple

DEFAULT_TARGET_MODULES: Tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR_SCHEDULES: Tuple[str, ...] = ("cosine", "linear", "constant")

# Tune search spaces often use PEFT's names; accept them as aliases of ours.
_ALIASES = {"r": "rank", "lora_r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout",
            "learning_rate": "lr", "per_device_train_batch_size": "batch_size",
            "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "lr_schedule"}


def _as_target_tuple(value: Any) -> Tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return tuple(str(v) for v in value)


@dataclass
class AdapterConfig:
    """Everything that makes one adapter's training differ from another's in the same group."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    lr: float = 2e-4
    batch_size: int = 2
    max_seq_len: int = 256
    warmup_steps: int = 0
    max_steps: int = 1000
    lr_schedule: str = "cosine"
    max_grad_norm: float = 1.0          # <= 0 or inf: no clipping
    grad_accum: int = 1
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    seed: int = 0
    target_modules: Tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGET_MODULES)

    def __post_init__(self) -> None:
        self.target_modules = _as_target_tuple(self.target_modules)
        self.betas = tuple(self.betas)  # type: ignore[assignment]

    @property
    def scale(self) -> float:
        """PEFT's ``lora_alpha / r`` (no rsLoRA)."""
        return float(self.alpha) / float(self.rank)

    def validate(self) -> "AdapterConfig":
        """Raise ValueError naming the first bad field, so a trial fails before it joins a group."""
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"AdapterConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("rank", "batch_size", "max_seq_len", "grad_accum", "max_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "must be an integer >= 1")
        for name in ("alpha", "lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise bad(name, "must be a finite number > 0")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must lie in [0, 1)")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise bad("warmup_steps", "must be an integer >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", f"must be one of {LR_SCHEDULES}")
        if not isinstance(self.max_grad_norm, (int, float)) or math.isnan(self.max_grad_norm):
            raise bad("max_grad_norm", "must be a number (<= 0 or inf turns clipping off)")
        if not isinstance(self.weight_decay, (int, float)) or not math.isfinite(self.weight_decay) \
                or self.weight_decay < 0:
            raise bad("weight_decay", "must be a finite number >= 0")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas):
            raise bad("betas", "must be two numbers in [0, 1)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise bad("seed", "must be an integer")
        if not self.target_modules:
            raise bad("target_modules", "must name at least one module")
        return self

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "AdapterConfig":
        """Build from a Tune config: known keys (and PEFT-style aliases) only, others ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict = {}
        for key, value in config.items():
            name = _ALIASES.get(key, key)
            if name not in known:
                continue
            if name in values and key != name:
                continue  # the canonical key wins over an alias
            values[name] = value
        for name in ("rank", "batch_size", "max_seq_len", "grad_accum", "max_steps", "warmup_steps", "seed"):
            # Tune's quantised samplers hand back floats like 16.0; accept exact integers.
            v = values.get(name)
            if isinstance(v, float) and v.is_integer():
                values[name] = int(v)
        return cls(**values)

    def to_dict(self) -> dict:
        """Plain data (lists, not tuples) for checkpoints and JSON."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["target_modules"] = list(self.target_modules)
        return d


def lr_at(cfg: AdapterConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based), as in transformers' schedules.

    Linear warm-up from 0 over ``warmup_steps``, then cosine / linear decay to 0 at
    ``max_steps`` or constant; the same formulas as ``get_{cosine,linear,constant}_schedule_with_warmup``.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * step / max(1, cfg.warmup_steps)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.lr_schedule == "linear":
        return cfg.lr * max(0.0, 1.0 - progress)
    return cfg.lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
