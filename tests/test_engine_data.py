"""Data: validation before weights load, prompt masking, truncation, streams, packing."""
from __future__ import annotations

import json

import pytest
import torch

from alto_ray.engine import AdapterStream, DatasetSpec, TaskData, load_records, pack_batch
from alto_ray.engine.data import IGNORE_INDEX
from alto_ray.engine.testing import arithmetic_records, build_tokenizer


def test_missing_file_empty_and_missing_field_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="source"):
        load_records(DatasetSpec(str(tmp_path / "nope.jsonl")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_records(DatasetSpec(str(empty)))
    with pytest.raises(ValueError, match="text_field"):
        load_records(DatasetSpec([{"body": "x"}]))
    with pytest.raises(ValueError, match="completion_field"):
        load_records(DatasetSpec([{"prompt": "x", "answer": "y"}]))
    with pytest.raises(ValueError, match="text_field"):
        load_records(DatasetSpec([{"text": "a"}, {"text": 3}]))
    with pytest.raises(ValueError, match="eval_fraction"):
        load_records(DatasetSpec([{"text": "a"}], eval_fraction=1.5))


def test_json_parquet_and_hf_dataset_sources(tmp_path):
    records = arithmetic_records(10)
    (tmp_path / "d.json").write_text(json.dumps(records))
    assert load_records(DatasetSpec(str(tmp_path / "d.json"))) == records
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    assert load_records(DatasetSpec(str(tmp_path / "d.parquet"))) == records
    datasets = pytest.importorskip("datasets")
    assert load_records(DatasetSpec(datasets.Dataset.from_list(records))) == records


def test_prompt_masked_eos_appended_and_split():
    tok = build_tokenizer()
    records = [{"prompt": "what is 1 plus 2 ? answer :", "completion": " 3"}] * 9 + [{"prompt": "what is", "completion": " 4"}]
    data = TaskData(records, DatasetSpec(records, eval_size=2, seed=1), tok)
    assert len(data.train_examples) == 8 and len(data.eval_examples) == 2
    ids, labels = next(e for e in data.train_examples + data.eval_examples if len(e[0]) > 5)
    n_prompt = len(tok("what is 1 plus 2 ? answer :")["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] == tok(" 3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    text = TaskData([{"text": "1 plus 1"}] * 3, DatasetSpec([{"text": "1 plus 1"}] * 3, eval_fraction=0.0), tok)
    assert text.train_examples[0][0] == text.train_examples[0][1]


def test_stream_is_seeded_reshuffles_and_resumes():
    a, b = AdapterStream(10, seed=3), AdapterStream(10, seed=3)
    first = a.take(7) + a.take(7)
    assert first == b.take(14)
    assert sorted(first[:10]) == list(range(10))  # epoch 0 is a permutation
    assert (a.epoch, a.position) == (1, 4)
    c = AdapterStream(10, seed=3)
    c.load_state_dict(a.state_dict())
    assert c.take(9) == a.take(9)
    assert AdapterStream(10, seed=4).take(10) != AdapterStream(10, seed=3).take(10)
    with pytest.raises(ValueError):
        AdapterStream(11, seed=3).load_state_dict(a.state_dict())


def test_pack_batch_layout_truncation_and_loss_positions():
    ex = lambda n, first_label: (list(range(1, n + 1)), [IGNORE_INDEX] * first_label + list(range(first_label + 1, n + 1)))
    batch = pack_batch([("a", [ex(5, 2), ex(3, 1)], 4), ("b", [ex(6, 0)], 10)], pad_id=0, device=torch.device("cpu"))
    assert batch.input_ids.shape == (3, 6)
    assert batch.row_layout == [("a", 0, 12), ("b", 12, 18)]
    assert batch.input_ids[0].tolist() == [1, 2, 3, 4, 0, 0]  # truncated to a's max_seq_len 4
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1] * 6]
    assert batch.tokens == {"a": 7, "b": 6}
    # predicting labels at positions 2,3 (row 0), 1,2 (row 1), 1..5 (row 2)
    assert batch.label_counts == [4, 5]
    assert batch.loss_index.tolist() == [1, 2, 6, 7, 12, 13, 14, 15, 16]
    assert batch.loss_targets.tolist() == [3, 4, 2, 3, 2, 3, 4, 5, 6]
    assert batch.loss_owner.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
