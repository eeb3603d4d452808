"""Trial checkpoints: a PEFT adapter directory plus the training state to resume it.

Layout of a checkpoint directory::

    adapter_config.json, adapter_model.safetensors   # PeftModel.from_pretrained(base, dir)
    trainer_state.pt                                  # engine adapter_state + alto counters
    alto_checkpoint.json                              # human-readable summary (task, step, config)
    alto_pending.json                                 # results trained but not yet reported (if any)

The group and the trial may sit on different nodes, so a checkpoint travels through Ray as a
`{file name: bytes}` dict: the group packs it (`pack_state`, needs torch), the trial only writes
and reads bytes (`write_files` / `read_files`), which keeps the trial process torch-free.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any, Dict, List, Optional, Tuple

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
STATE_FILE = "trainer_state.pt"
SUMMARY_FILE = "alto_checkpoint.json"
# A group trains ahead of what its trials have reported (`LoRATask.run_ahead`): a checkpoint
# holds the state after its last *trained* step plus the results between the last reported step
# and that one, which the restored trial reports first. Resuming thus redoes nothing and skips
# no report.
PENDING_FILE = "alto_pending.json"
CHECKPOINT_FILES = ADAPTER_FILES + (STATE_FILE, SUMMARY_FILE, PENDING_FILE)
FORMAT_VERSION = 1

Files = Dict[str, bytes]


def write_files(checkpoint_dir: str, files: Files) -> None:
    """Write a packed checkpoint into `checkpoint_dir` (trial side; no torch needed)."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    for name, data in files.items():
        if os.path.basename(name) != name:
            raise ValueError(f"checkpoint file name {name!r} must be a plain file name")
        with open(os.path.join(checkpoint_dir, name), "wb") as f:
            f.write(data)


def read_files(checkpoint_dir: str) -> Files:
    """Read a checkpoint directory back into bytes; ValueError when it is not one of ours."""
    path = os.path.join(checkpoint_dir, STATE_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{checkpoint_dir!r} is not an alto-ray checkpoint (no {STATE_FILE})")
    files: Files = {}
    for name in CHECKPOINT_FILES:
        p = os.path.join(checkpoint_dir, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                files[name] = f.read()
    return files


def snapshot_state(trainer: Any, adapter: str, meta: Dict[str, Any]) -> Any:
    """Group side, between two steps: the adapter's checkpoint as CPU data (device-to-host copies
    only). `files_of` serialises it later, while the group trains on. A trainer without
    `adapter_snapshot` (e.g. a multi-rank group) is packed right away."""
    if not hasattr(trainer, "adapter_snapshot"):
        return pack_state(trainer, adapter, meta)
    peft, engine = trainer.adapter_snapshot(adapter)
    return _Snapshot(peft, engine, dict(meta))


class _Snapshot:
    def __init__(self, peft: Any, engine: Dict[str, Any], meta: Dict[str, Any]) -> None:
        self.peft, self.engine, self.meta = peft, engine, meta


def files_of(snapshot: Any) -> Files:
    """A snapshot (or already packed files) as `{file name: bytes}`."""
    if not isinstance(snapshot, _Snapshot):
        return snapshot
    from alto_ray.engine.export import save_peft_snapshot

    with tempfile.TemporaryDirectory(prefix="alto-ckpt-") as tmp:
        save_peft_snapshot(snapshot.peft, tmp)
        files = _read_dir(tmp)
    return _with_state(files, snapshot.engine, snapshot.meta)


def pack_state(trainer: Any, adapter: str, meta: Dict[str, Any]) -> Files:
    """Group side: the adapter's PEFT files + engine state + `meta` (alto counters) as bytes."""
    with tempfile.TemporaryDirectory(prefix="alto-ckpt-") as tmp:
        trainer.save_adapter(adapter, tmp)
        files = _read_dir(tmp)
    return _with_state(files, trainer.adapter_state(adapter), meta)


def _read_dir(path: str) -> Files:
    files: Files = {}
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            with open(full, "rb") as f:
                files[name] = f.read()
    return files


def _with_state(files: Files, engine: Dict[str, Any], meta: Dict[str, Any]) -> Files:
    import torch

    buf = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, "engine": engine, "alto": meta}, buf)
    files[STATE_FILE] = buf.getvalue()
    summary = {"format": FORMAT_VERSION, **{k: v for k, v in meta.items() if _jsonable(v)}}
    files[SUMMARY_FILE] = json.dumps(summary, indent=2, sort_keys=True, default=str).encode()
    return files


def unpack_state(files: Optional[Files]) -> Tuple[Optional[Dict[str, Any]], Dict[str, Any]]:
    """Group side: (engine state for `add_adapter(state=...)`, alto meta) from packed files."""
    if not files:
        return None, {}
    import torch

    if STATE_FILE not in files:
        raise ValueError(f"checkpoint has no {STATE_FILE}")
    blob = torch.load(io.BytesIO(files[STATE_FILE]), map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT_VERSION:
        raise ValueError(f"{STATE_FILE}: unknown checkpoint format")
    return blob["engine"], dict(blob.get("alto") or {})


def with_pending(files: Files, pending: List[Dict[str, Any]]) -> Files:
    """`files` plus the results not reported yet (none: `files` as they are)."""
    if not pending:
        return {k: v for k, v in files.items() if k != PENDING_FILE}
    return {**files, PENDING_FILE: json.dumps(list(pending)).encode()}


def pending_results(files: Optional[Files]) -> List[Dict[str, Any]]:
    """The unreported results a checkpoint carries (oldest first)."""
    if not files or PENDING_FILE not in files:
        return []
    pending = json.loads(files[PENDING_FILE])
    if not isinstance(pending, list):
        raise ValueError(f"{PENDING_FILE}: expected a list of results")
    return pending


def reported_step(files: Optional[Files]) -> int:
    """The last step the trial reported before this checkpoint (0 for none / an empty one)."""
    pending = pending_results(files)
    if pending:
        return int(pending[0].get("step", 1)) - 1
    if not files or SUMMARY_FILE not in files:
        return 0
    try:
        return int(json.loads(files[SUMMARY_FILE]).get("step", 0))
    except (ValueError, TypeError):
        return 0


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
