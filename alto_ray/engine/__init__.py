"""The grouped multi-LoRA training engine: pure PyTorch, no Ray (see docs/ARCHITECTURE.md §2)."""
from .config import DEFAULT_TARGET_MODULES, LR_SCHEDULES, AdapterConfig, lr_at
from .data import AdapterStream, DatasetSpec, PackedBatch, TaskData, load_records, pack_batch
from .export import peft_state_dict, save_peft_adapter
from .memory import estimate_adapter_breakdown, estimate_adapter_bytes, estimate_backbone_bytes, lora_param_count
from .lora import BatchLayout, LoRARuntime, LoRASlot, MultiLoRALinear, SegmentRun
from .model import AdapterWeights, MultiLoRAModel, load_backbone
from .trainer import GroupedTrainer, StepResult

__all__ = [
    "AdapterConfig", "AdapterStream", "AdapterWeights", "BatchLayout", "DEFAULT_TARGET_MODULES", "DatasetSpec",
    "GroupedTrainer", "LR_SCHEDULES", "LoRARuntime", "LoRASlot", "MultiLoRALinear", "MultiLoRAModel",
    "PackedBatch", "SegmentRun", "StepResult", "TaskData", "load_backbone", "load_records", "lr_at",
    "pack_batch", "peft_state_dict", "save_peft_adapter", "estimate_adapter_breakdown", "estimate_adapter_bytes",
    "estimate_backbone_bytes",
    "lora_param_count",
]
