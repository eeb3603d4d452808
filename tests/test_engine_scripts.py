"""The engine's example and benchmark still run (tiny, CPU)."""
from __future__ import annotations

import importlib.util
import json
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke_writes_json_and_no_summary_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "benchmarks" / "engine.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, summary = tmp_path / "engine.json", tmp_path / "summary.json"
    result = bench.main(["--smoke", "--adapters", "2", "--out", str(out), "--summary", str(summary)])
    saved = json.loads(out.read_text())
    shape = saved["shapes"]["smoke"]
    assert shape["engine"]["tokens_per_step"] == 2 * saved["seq"]
    assert shape["engine"]["tokens_per_s"] > 0 and shape["peft_sequential"]["tokens_per_s"] > 0
    assert shape["engine"]["all_losses_finite"]
    assert 0 < shape["engine"]["mfu"] < 1 and saved["versions"]["torch"]
    assert result["command"].startswith("python ")
    assert not summary.exists()  # figures are merged only from a CUDA run


def test_engine_demo_runs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["engine_demo.py", "--steps", "3"])
    runpy.run_path(str(ROOT / "examples" / "engine_demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "8 adapters" in out
    assert sum(1 for line in out.splitlines() if line.startswith("r")) == 8
