"""What CUDA-graph replay of the grouped step relies on, checked on CPU: a batch rebinds onto a
static copy of its one device buffer, the dropout stream table keeps its address, an unpadded
batch needs no attention mask, and ``cuda_graphs`` asked for where it cannot run is a no-op.
The capture and replay themselves need a GPU: ``benchmarks/graph_step.py`` checks them there."""
from __future__ import annotations

import pytest
import torch

from alto_ray.engine import AdapterConfig, DatasetSpec, GroupedTrainer
from alto_ray.engine.data import pack_batch


def _cfg(**kw) -> AdapterConfig:
    base = dict(rank=4, alpha=8, lr=5e-3, batch_size=2, max_seq_len=48, warmup_steps=1, max_steps=20, seed=0)
    base.update(kw)
    return AdapterConfig(**base)


def test_a_batch_rebinds_onto_a_copy_of_its_device_buffer():
    parts = [("a", [([5, 6, 7, 8], [-100, -100, 7, 8]), ([9, 10], [9, 10])], 8),
             ("b", [([11, 12, 13], [11, 12, 13])], 2)]
    batch = pack_batch(parts, 0, torch.device("cpu"))
    assert batch.padded
    copy = batch.device_buffer.clone()
    bound = batch.on_buffer(copy)
    for field in ("input_ids", "attention_mask", "loss_index", "loss_targets", "loss_owner", "loss_divisor"):
        assert torch.equal(getattr(bound, field), getattr(batch, field)), field
    for field in ("input_ids", "attention_mask", "loss_index", "loss_targets", "loss_owner"):
        t = getattr(bound, field)
        assert t.untyped_storage().data_ptr() == copy.untyped_storage().data_ptr(), field
    copy[0] = 99  # the rebound batch reads the copy, not the original
    assert bound.input_ids[0, 0] == 99 and batch.input_ids[0, 0] == 5
    assert bound.row_layout == batch.row_layout and bound.label_counts == batch.label_counts
    with pytest.raises(ValueError, match="on_buffer"):
        batch.on_buffer(copy[:-1])


def test_an_unpadded_batch_is_marked_so():
    batch = pack_batch([("a", [([5, 6, 7], [5, 6, 7])], 8), ("b", [([1, 2, 3], [1, 2, 3])], 8)], 0,
                       torch.device("cpu"))
    assert not batch.padded and bool(batch.attention_mask.all())


def test_the_stream_table_keeps_its_address_and_holds_each_slots_stream(tiny_model_dir, tiny_dataset_path):
    t = GroupedTrainer(tiny_model_dir, DatasetSpec(tiny_dataset_path), device="cpu")
    for name, seed in (("x", 1), ("y", 2), ("z", 3)):
        t.add_adapter(name, _cfg(seed=seed))
    slots = {n: t.model.adapters[n].slot for n in ("x", "y", "z")}
    table = t.model.load_streams({"x": 11, "y": 12})
    ptr = table.data_ptr()
    assert table[slots["x"]] == 11 and table[slots["y"]] == 12
    again = t.model.load_streams({"y": 5, "z": 2 ** 31 + 7})
    assert again.data_ptr() == ptr
    assert again[slots["x"]] == 11 and again[slots["y"]] == 5 and again[slots["z"]] == 7


def test_cuda_graphs_asked_for_on_a_cpu_train_eagerly_as_without(tiny_model_dir, tiny_dataset_path):
    runs = []
    for graphs in (False, True):
        t = GroupedTrainer(tiny_model_dir, DatasetSpec(tiny_dataset_path), device="cpu", cuda_graphs=graphs)
        assert t.graph_stats is None and t.use_cuda_graphs(graphs) is False
        t.add_adapter("x", _cfg(seed=1, dropout=0.1))
        t.add_adapter("y", _cfg(rank=8, seed=2, batch_size=3))
        runs.append([{n: r.loss for n, r in t.step().items()} for _ in range(3)])
    assert runs[0] == runs[1]


def test_the_causal_mask_skip_answers_for_a_capture_and_defers_otherwise():
    import transformers.masking_utils as masking

    from alto_ray.engine.graphs import causal_mask_skip

    names = ("_ignore_causal_mask_sdpa", "find_packed_sequence_indices")
    originals = {n: getattr(masking, n) for n in names}
    padded = torch.tensor([[True, True, False]])
    two_sequences = torch.tensor([[0, 1, 2, 0, 1]])
    capturing = [False]
    with causal_mask_skip(capturing=lambda: capturing[0]):
        ignore, find = masking._ignore_causal_mask_sdpa, masking.find_packed_sequence_indices
        assert all(getattr(masking, n) is not originals[n] for n in names)
        # Not capturing: transformers' own answers.
        assert bool(ignore(None, 3, 3, 0, 0, None)) is True
        assert bool(ignore(padded, 3, 3, 0, 0, None)) is False
        assert find(two_sequences) is not None
        capturing[0] = True
        # Capturing: no padding mask and q == kv skips (keywords bound by name too) ...
        assert ignore(None, 3, 3, 0, 0, None) is True
        assert ignore(None, q_length=3, kv_length=3, q_offset=0, kv_offset=0) is True
        assert find(torch.arange(5)[None]) is None
        # ... but a padding mask or a local window the sequence reaches goes to transformers.
        assert bool(ignore(padded, 3, 3, 0, 0, None)) is False
        assert bool(ignore(None, 8, 8, 0, 0, 4)) is False
    assert all(getattr(masking, n) is originals[n] for n in names)


def test_a_forward_in_the_causal_mask_skip_matches_one_outside(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from alto_ray.engine.graphs import causal_mask_skip

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outside = model(input_ids=ids, use_cache=False).logits
        with causal_mask_skip(capturing=lambda: True):
            inside = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(inside, outside)


def test_rounded_batch_shapes_give_the_same_losses(tiny_model_dir, tiny_dataset_path):
    from alto_ray.engine.data import IGNORE_INDEX

    t = GroupedTrainer(tiny_model_dir, DatasetSpec(tiny_dataset_path), device="cpu")
    t.add_adapter("x", _cfg(seed=1))
    t.add_adapter("y", _cfg(rank=8, seed=2, batch_size=3))
    train = t.data.train_examples
    parts = [("x", train[:2], 48), ("y", train[5:8], 48)]
    plain = pack_batch(parts, t.data.pad_id, torch.device("cpu"))
    rounded = pack_batch(parts, t.data.pad_id, torch.device("cpu"), width_multiple=64, loss_buckets=4)
    n, width = rounded.input_ids.shape
    assert width == 64 and width > plain.input_ids.shape[1] and rounded.padded
    step = -(-n * width // 4)
    assert rounded.loss_index.numel() % step == 0 and rounded.loss_index.numel() > plain.loss_index.numel()
    assert bool((rounded.loss_targets[plain.loss_index.numel():] == IGNORE_INDEX).all())
    assert rounded.label_counts == plain.label_counts
    with torch.no_grad():
        got = t._token_loss_sums(rounded, training=False)
        want = t._token_loss_sums(plain, training=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float(want.min()) > 0
