"""Data for the grouped step: load + validate once, tokenise once, one shuffled stream per adapter.

Records are either prompt/completion pairs (prompt tokens masked out of the loss) or plain text
(every token trained). Labels use HF's convention: same positions as ``input_ids``, ``-100``
where no loss is taken; the shift happens in the loss.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

IGNORE_INDEX = -100
Example = Tuple[List[int], List[int]]  # (input_ids, labels)


@dataclass
class DatasetSpec:
    """Where the task's data is and which fields to read; the split is seeded by ``seed``."""

    source: Any  # datasets.Dataset, a list of dicts, or a local .jsonl/.json/.parquet path
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    eval_fraction: float = 0.1
    eval_size: Optional[int] = None  # held-out examples; overrides eval_fraction when set
    seed: int = 0


def load_records(spec: DatasetSpec) -> List[Dict[str, Any]]:
    """Read the records and check the fields, so a bad task fails before any weights load."""
    src = spec.source
    if isinstance(src, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(src))
        if not os.path.isfile(path):
            raise ValueError(f"source={src!r}: no such file")
        records = _read_file(path)
    elif isinstance(src, list):
        records = list(src)
    elif hasattr(src, "column_names") and hasattr(src, "to_list"):  # datasets.Dataset
        records = src.to_list()
    else:
        raise ValueError(f"source must be a datasets.Dataset, a list of dicts or a path, got {type(src).__name__}")
    if not records:
        raise ValueError(f"source={src!r}: the dataset is empty")
    field_names = record_fields(spec, records[0])
    for i, rec in enumerate(records):
        for name in field_names:
            value = rec.get(name) if isinstance(rec, dict) else None
            if not isinstance(value, str):
                attr = {spec.text_field: "text_field", spec.prompt_field: "prompt_field"}.get(name, "completion_field")
                raise ValueError(f"{attr}={name!r}: record {i} has no string field {name!r}")
    if not 0.0 <= spec.eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={spec.eval_fraction!r}: must lie in [0, 1)")
    n_eval = eval_count(spec, len(records))
    if n_eval < 0 or len(records) - n_eval < 1:
        raise ValueError(f"eval_size={spec.eval_size!r} leaves no training examples out of {len(records)}")
    return records


def record_fields(spec: DatasetSpec, first: Dict[str, Any]) -> Tuple[str, ...]:
    """Prompt/completion when both fields are there, else the text field."""
    if not isinstance(first, dict):
        raise ValueError(f"records must be dicts, got {type(first).__name__}")
    if spec.prompt_field in first and spec.completion_field in first:
        return (spec.prompt_field, spec.completion_field)
    if spec.text_field in first:
        return (spec.text_field,)
    if spec.prompt_field in first:
        raise ValueError(f"completion_field={spec.completion_field!r}: not in the records (fields: {sorted(first)})")
    raise ValueError(f"text_field={spec.text_field!r}: not in the records, and no "
                     f"prompt_field/completion_field pair either (fields: {sorted(first)})")


def _read_file(path: str) -> List[Dict[str, Any]]:
    lower = path.lower()
    if lower.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if lower.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"source={path!r}: a .json file must hold a list of records")
        return data
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    raise ValueError(f"source={path!r}: expected a .jsonl, .json or .parquet file")


def eval_count(spec: DatasetSpec, n: int) -> int:
    if spec.eval_size is not None:
        return int(spec.eval_size)
    return min(n - 1, int(round(n * spec.eval_fraction))) if n > 1 else 0


def tokenize_records(records: Sequence[Dict[str, Any]], spec: DatasetSpec, tokenizer: Any) -> List[Example]:
    """Tokenise once for every adapter (each truncates at its own ``max_seq_len`` later)."""
    fields = record_fields(spec, records[0])
    eos = tokenizer.eos_token_id
    tail = [eos] if eos is not None else []
    if len(fields) == 2:
        prompts = tokenizer([r[fields[0]] for r in records], add_special_tokens=True)["input_ids"]
        completions = tokenizer([r[fields[1]] for r in records], add_special_tokens=False)["input_ids"]
        out = []
        for p, c in zip(prompts, completions):
            c = list(c) + tail
            out.append((list(p) + c, [IGNORE_INDEX] * len(p) + c))
        return out
    texts = tokenizer([r[fields[0]] for r in records], add_special_tokens=True)["input_ids"]
    return [(list(t) + tail, list(t) + tail) for t in texts]


class TaskData:
    """The tokenised task with its fixed train/eval split (shared by every adapter)."""

    def __init__(self, records: Sequence[Dict[str, Any]], spec: DatasetSpec, tokenizer: Any) -> None:
        self.spec = spec
        examples = tokenize_records(records, spec, tokenizer)
        n_eval = eval_count(spec, len(examples))
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(int(spec.seed))).tolist()
        self.eval_examples: List[Example] = [examples[i] for i in order[:n_eval]]
        self.train_examples: List[Example] = [examples[i] for i in sorted(order[n_eval:])]
        self.pad_id = pad_token_id(tokenizer)

    @classmethod
    def from_examples(cls, train: Sequence[Example], eval_examples: Sequence[Example] = (),
                      pad_id: int = 0) -> "TaskData":
        """Already tokenised data (benchmarks, custom pipelines): no tokenizer needed."""
        if not train:
            raise ValueError("train: no training examples")
        self = cls.__new__(cls)
        self.spec = None
        self.train_examples, self.eval_examples, self.pad_id = list(train), list(eval_examples), int(pad_id)
        return self


def pad_token_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


@dataclass
class AdapterStream:
    """One adapter's walk through the training examples: reshuffled every epoch, seeded by the
    adapter's seed, resumable from (epoch, position)."""

    num_examples: int
    seed: int
    epoch: int = 0
    position: int = 0
    _order: Optional[List[int]] = field(default=None, repr=False)

    def order(self) -> List[int]:
        if self._order is None:
            gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.num_examples, generator=gen).tolist()
        return self._order

    def take(self, count: int) -> List[int]:
        out: List[int] = []
        while len(out) < count:
            order = self.order()
            need = count - len(out)
            out += order[self.position:self.position + need]
            self.position += need
            if self.position >= self.num_examples:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_examples": self.num_examples,
                "seed": self.seed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if int(state.get("num_examples", self.num_examples)) != self.num_examples:
            raise ValueError("data stream state is for a dataset of a different size")
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


@dataclass
class PackedBatch:
    """All adapters' micro-batches in one right-padded ``[B, L]`` batch, adapter by adapter."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    row_layout: List[Tuple[str, int, int]]   # (adapter, first row, end row) in the flattened B*L
    seq_ranges: List[Tuple[str, int, int]]   # (adapter, first sequence, end sequence)
    tokens: Dict[str, int]                   # non-pad tokens per adapter
    loss_index: torch.Tensor    # [N] flat hidden positions b*L+j whose next token has a label
    loss_targets: torch.Tensor  # [N] that next token
    loss_owner: torch.Tensor    # [N] index of the owning adapter in ``row_layout``
    label_counts: List[int]     # loss tokens per adapter, in ``row_layout`` order
    loss_divisor: torch.Tensor  # [adapters] max(1, label_counts) on the device
    # The one int64 device buffer every device tensor above (but ``loss_divisor``, a float32
    # copy) is a view of: ids | mask | loss_index | loss_targets | loss_owner | divisor.
    device_buffer: Optional[torch.Tensor] = None

    @property
    def padded(self) -> bool:
        """Whether any row has padding (the attention mask is not all ones)."""
        return sum(self.tokens.values()) != self.input_ids.numel()

    def on_buffer(self, flat: torch.Tensor) -> "PackedBatch":
        """This batch with its device tensors as views of ``flat``, a buffer of the same size and
        layout as ``device_buffer`` (a CUDA graph's static copy: a replay reads what was copied
        into it, with no host work)."""
        if self.device_buffer is None or flat.shape != self.device_buffer.shape:
            raise ValueError("on_buffer: needs a buffer shaped like this batch's device_buffer")
        n, width = self.input_ids.shape
        sizes = (n * width, n * width, self.loss_index.numel(), self.loss_targets.numel(),
                 self.loss_owner.numel(), self.loss_divisor.numel())
        views, start = [], 0
        for size in sizes:
            views.append(flat[start:start + size])
            start += size
        ids_t, mask_t, index_t, targets_t, owner_t, divisor_t = views
        return dataclasses.replace(self, input_ids=ids_t.view(n, width), attention_mask=mask_t.view(n, width),
                                   loss_index=index_t, loss_targets=targets_t, loss_owner=owner_t,
                                   loss_divisor=divisor_t.to(torch.float32), device_buffer=flat)


def truncated_sequences(parts: Sequence[Tuple[str, Sequence[Example], int]]
                        ) -> Tuple[List[Example], List[Tuple[str, int, int]], Dict[str, int]]:
    """The parts' sequences cut to their ``max_seq_len``, each adapter's ``(name, first, end)``
    sequence range, and its non-pad token count."""
    seqs: List[Example] = []
    seq_ranges: List[Tuple[str, int, int]] = []
    tokens: Dict[str, int] = {}
    for name, examples, max_len in parts:
        start = len(seqs)
        for ids, labels in examples:
            seqs.append((ids[:max_len], labels[:max_len]))
        seq_ranges.append((name, start, len(seqs)))
        tokens[name] = sum(len(s[0]) for s in seqs[start:])
    return seqs, seq_ranges, tokens


def pack_batch(parts: Sequence[Tuple[str, Sequence[Example], int]], pad_id: int,
               device: torch.device, width_multiple: int = 1, loss_buckets: int = 0) -> PackedBatch:
    """Each part is (adapter, examples, max_seq_len). Sequences are truncated, then padded on
    the right to the longest in the whole batch; no sequence shares a row with another, so
    attention never crosses a sequence boundary.

    For CUDA-graph replay, whose batches must repeat their shapes: ``width_multiple`` rounds the
    width up, and ``loss_buckets`` > 0 rounds the loss positions up to one of that many sizes
    per width (the extra positions point at token 0 with an ignored target: they add 0)."""
    seqs, seq_ranges, tokens = truncated_sequences(parts)
    longest = max(len(ids) for ids, _ in seqs)
    width = -(-longest // max(1, int(width_multiple))) * max(1, int(width_multiple))
    n = len(seqs)
    # Built in numpy and sent as one pinned int64 buffer: torch's CPU indexing ops were seen
    # taking 0.1-2 ms each on a GPU host while the GPU was busy (27 us idle), and each tensor
    # sent on its own pays a pinned allocation and a copy.
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    for row, (ids, lab) in enumerate(seqs):
        input_ids[row, :len(ids)] = ids
        labels[row, :len(lab)] = lab
        mask[row, :len(ids)] = 1
    row_layout = [(name, a * width, b * width) for name, a, b in seq_ranges]
    # Loss positions are found here on the CPU so the step needs no boolean indexing (a GPU sync).
    shifted = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    shifted[:, :-1] = labels[:, 1:]
    loss_index = np.flatnonzero(shifted.reshape(-1) != IGNORE_INDEX)
    owner_of_row = np.repeat(np.arange(len(seq_ranges), dtype=np.int64), [b - a for _, a, b in seq_ranges])
    loss_owner = owner_of_row[loss_index // width]
    label_counts = np.bincount(loss_owner, minlength=len(seq_ranges)).tolist()
    divisor = np.array([max(1, c) for c in label_counts], dtype=np.int64)
    if loss_buckets > 0:
        step = -(-n * width // int(loss_buckets))
        extra = min(-(-loss_index.size // step) * step, n * width) - loss_index.size
        loss_index = np.concatenate([loss_index, np.zeros(extra, dtype=np.int64)])
        loss_owner = np.concatenate([loss_owner, np.zeros(extra, dtype=np.int64)])
    targets = shifted.reshape(-1)[loss_index]
    if loss_buckets > 0 and extra:
        targets[-extra:] = IGNORE_INDEX
    pieces = (input_ids.reshape(-1), mask.reshape(-1), loss_index, targets, loss_owner, divisor)
    sent = to_device(torch.from_numpy(np.concatenate(pieces)), device)
    views, start = [], 0
    for piece in pieces:
        views.append(sent[start:start + piece.size])
        start += piece.size
    ids_t, mask_t, index_t, targets_t, owner_t, divisor_t = views
    return PackedBatch(ids_t.view(n, width), mask_t.view(n, width), torch.from_numpy(labels), row_layout, seq_ranges,
                       tokens, index_t, targets_t, owner_t, label_counts, divisor_t.to(torch.float32), sent)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host→device without a stream sync (pinned + non_blocking on CUDA): a plain ``.to`` from
    pageable memory would wait for all queued GPU work in the middle of a step."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
