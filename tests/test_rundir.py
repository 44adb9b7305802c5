"""tinybert.rundir: the run folder's names, and metrics.json / bench.json read back as they were written."""

import json

import pytest

from tinybert.rundir import Bench, BenchSide, Metrics, RunDir


def test_checkpoints_are_the_complete_ones_in_step_order(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.checkpoints() == [] and run.latest_checkpoint() is None and not run.holds("general")
    for step in (10, 9, 100):
        run.checkpoint(step).mkdir(parents=True)
    run.checkpoint(200, tmp=True).mkdir()  # a write that did not finish
    assert [p.name for p in run.checkpoints()] == ["step-0000009", "step-0000010", "step-0000100"]
    assert run.latest_checkpoint() == tmp_path / "run" / "checkpoints" / "step-0000100"
    assert run.holds("general") and run.holds("finetune") and not run.holds("task")


def test_logs_are_the_runs_and_its_stages(tmp_path):
    run = RunDir(tmp_path)
    for log in (run.stage("stage2").log, run.stage("stage1").log):
        log.parent.mkdir()
        log.write_text("{}\n")
    assert run.logs() == [tmp_path / "stage1" / "log.jsonl", tmp_path / "stage2" / "log.jsonl"]
    run.log.write_text("{}\n")
    assert run.logs()[0] == tmp_path / "log.jsonl"


def test_metrics_round_trip_and_refuse_other_files(tmp_path):
    best = {"stage": "finetune", "step": 2, "accuracy": 0.9, "validation_mismatched/accuracy": 0.8}
    metrics = Metrics(task="mnli", main_metric="accuracy", best=best, last=best, history=[best])
    metrics.write(tmp_path / "metrics.json")
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        "task": "mnli", "main_metric": "accuracy", "best": best, "last": best, "history": [best]}
    assert Metrics.read(tmp_path / "metrics.json") == metrics
    (tmp_path / "other.json").write_text('{"accuracy": 0.9}')
    with pytest.raises(ValueError, match="is not a run's metrics.json"):
        Metrics.read(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text('{"task": ')
    with pytest.raises(ValueError, match="is not valid JSON"):
        Metrics.read(tmp_path / "broken.json")


def test_bench_round_trip_and_the_hand_written_form(tmp_path):
    side = BenchSide(model="m", device="cpu", dtype="fp32", seq_len=128, parameters=14_000_000,
                     size_on_disk_bytes=None, latency_ms_p50=2.5, latency_ms_p95=3.0, throughput_batch=32,
                     throughput_seq_per_s=900.0, threads=2)
    bench = Bench(model=side, vs=None, speedup={"latency_speedup": 9.2}, machine={"cpu": "x"})
    bench.write(tmp_path / "bench.json")
    assert Bench.read(tmp_path / "bench.json") == bench
    hand = Bench.read({"model": {"name": "m", "p50_ms": 2.5, "throughput": 900, "p95": float("nan")},
                       "speedup": 9.2, "device": "cpu"})
    assert hand.model == BenchSide(model="m", device="cpu", latency_ms_p50=2.5, throughput_seq_per_s=900)
    assert hand.speedup == {"latency_speedup": 9.2} and hand.vs is None
    with pytest.raises(ValueError, match="bench file"):
        Bench.read(tmp_path / "missing.json")


def test_onnx_bench_round_trip_keeps_int8_apart_from_the_sides(tmp_path):
    """`tinybert bench --engine onnxruntime`: the int8 side and its speed-up read back as themselves, and an older
    file's top-level engine goes to the model's side while int8 does not."""
    fp32 = BenchSide(model="out/model.onnx", engine="onnxruntime", dtype="fp32", latency_ms_p50=4.0,
                     throughput_seq_per_s=250.0)
    int8 = BenchSide(model="out/model_quantized.onnx", engine="onnxruntime", dtype="int8", latency_ms_p50=2.0,
                     throughput_seq_per_s=500.0)
    torch_side = BenchSide(model="student", engine="torch", dtype="fp32", latency_ms_p50=5.0)
    bench = Bench(model=fp32, vs=torch_side, speedup={"latency_speedup": 1.25}, machine={"onnxruntime": "1.20"},
                  int8=int8, int8_speedup={"latency_speedup": 2.0, "throughput_speedup": 2.0})
    bench.write(tmp_path / "bench.json")
    assert json.loads((tmp_path / "bench.json").read_text())["int8"]["engine"] == "onnxruntime"
    assert Bench.read(tmp_path / "bench.json") == bench
    raw = json.loads((tmp_path / "bench.json").read_text())
    older = Bench.read({"engine": "onnxruntime", **raw, "model": {k: v for k, v in raw["model"].items()
                                                                  if k != "engine"}})
    assert older.model == fp32 and older.int8 == int8 and older.int8_speedup == bench.int8_speedup
