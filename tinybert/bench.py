"""`tinybert bench`: parameters, size on disk, latency (batch 1) and throughput (batch 32) of a model at sequence
length 128, and the speed-up against another model; with `--engine onnxruntime`, of an ONNX export (fp32 and int8)
next to the PyTorch model it came from, on the same number of threads. Model cards take their figures from here."""

from __future__ import annotations

import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from tinybert.checkpoint import load_model, read_config
from tinybert.download import hub_snapshot
from tinybert.model import Bert
from tinybert.rundir import BENCH, Bench, BenchSide
from tinybert.train import autocast


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(run, *, warmup: int, repeats: int, sync=lambda: None) -> list[float]:
    """Seconds per call of `run()`, after `warmup` untimed calls; `sync()` waits for queued device work."""
    times = []
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def time_forward(model: torch.nn.Module, batch: dict, device: torch.device, dtype: str, *, warmup: int,
                 repeats: int, call=None) -> list[float]:
    """Seconds per forward pass (eval mode, inference_mode, bf16 = autocast), after `warmup` untimed passes.
    `call(model, batch)` runs one pass; the default passes the batch as keyword arguments."""
    call = call or (lambda m, b: m(**b))
    model.eval()
    with torch.inference_mode(), autocast(device, dtype):
        return time_calls(lambda: call(model, batch), warmup=warmup, repeats=repeats, sync=lambda: _sync(device))


def random_batch(batch_size: int, seq_len: int, vocab_size: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab_size, (batch_size, seq_len), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "token_type_ids": torch.zeros_like(ids).to(device)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def benchmark(source: str | Path, *, device: str = "cpu", dtype: str = "fp32", seq_len: int = 128,
              throughput_batch: int = 32, latency_repeats: int = 30, throughput_repeats: int = 5) -> BenchSide:
    """Figures for one model (a directory or a preset name)."""
    dev = torch.device(device)
    model: Bert = load_model(source).to(dev)
    params = model.num_parameters()["total"]
    path = Path(source)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else None
    V = model.config.vocab_size
    one = time_forward(model, random_batch(1, seq_len, V, dev), dev, dtype, warmup=3, repeats=latency_repeats)
    many = time_forward(model, random_batch(throughput_batch, seq_len, V, dev), dev, dtype, warmup=1,
                        repeats=throughput_repeats)
    return figures(str(source), "torch", device, dtype, params, size, one, many, seq_len=seq_len,
                   throughput_batch=throughput_batch, threads=torch.get_num_threads())


def figures(model: str, engine: str, device: str, dtype: str, params: int, size: int | None, one: list[float],
            many: list[float], *, seq_len: int, throughput_batch: int, threads: int) -> BenchSide:
    """One row of the table (and one side of bench.json) from the batch-1 and batch-B times, for either engine."""
    return BenchSide(
        model=model, engine=engine, device=device, dtype=dtype, seq_len=seq_len, parameters=params,
        size_on_disk_bytes=size, latency_ms_p50=1000 * statistics.median(one),
        latency_ms_p95=1000 * percentile(one, 95), throughput_batch=throughput_batch,
        throughput_seq_per_s=throughput_batch / statistics.median(many), threads=threads,
    )


def benchmark_onnx(export_dir: str | Path, file: str, *, seq_len: int = 128, throughput_batch: int = 32,
                   latency_repeats: int = 30, throughput_repeats: int = 5, threads: int | None = None) -> BenchSide:
    """Figures for one graph of an ONNX export folder (model.onnx or model_quantized.onnx) under ONNX Runtime on the
    CPU, with `threads` intra-op threads (default: torch's, so both engines get the same)."""
    from tinybert.onnx_export import INT8_FILE, RECORD_FILE, run_session, session

    export_dir = Path(export_dir)
    threads = threads or torch.get_num_threads()
    sess = session(export_dir / file, threads)
    record = json.loads((export_dir / RECORD_FILE).read_text())
    V = read_config(export_dir).vocab_size
    device = torch.device("cpu")
    b1, bn = random_batch(1, seq_len, V, device), random_batch(throughput_batch, seq_len, V, device)
    one = time_calls(lambda: run_session(sess, b1), warmup=3, repeats=latency_repeats)
    many = time_calls(lambda: run_session(sess, bn), warmup=1, repeats=throughput_repeats)
    size = sum(p.stat().st_size for p in export_dir.glob(file + "*"))  # with its external data, if any
    return figures(str(export_dir / file), "onnxruntime", "cpu", "int8" if file == INT8_FILE else "fp32",
                   record["parameters"], size, one, many, seq_len=seq_len, throughput_batch=throughput_batch,
                   threads=threads)


def machine() -> dict:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    info = {"cpu": cpu, "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def compare(model: BenchSide, other: BenchSide) -> dict[str, float]:
    """Speed-ups of `model` over `other` (> 1 = model is faster)."""
    return {"latency_speedup": other.latency_ms_p50 / model.latency_ms_p50,
            "throughput_speedup": model.throughput_seq_per_s / other.throughput_seq_per_s,
            "size_ratio": other.parameters / model.parameters}


def format_table(results: list[BenchSide], speedup: dict | None = None) -> str:
    header = f"{'model':<44}{'params':>9}{'disk':>10}{'p50 ms':>9}{'p95 ms':>9}{'seq/s (b=32)':>14}"
    lines = [header, "-" * len(header)]
    for r in results:
        name = r.model if len(r.model) <= 42 else "..." + r.model[-39:]
        disk = f"{r.size_on_disk_bytes / 2**20:.0f} MB" if r.size_on_disk_bytes else "-"
        lines.append(f"{name:<44}{r.parameters / 1e6:>8.1f}M{disk:>10}{r.latency_ms_p50:>9.1f}"
                     f"{r.latency_ms_p95:>9.1f}{r.throughput_seq_per_s:>14.1f}")
    if speedup:
        lines.append(f"speed-up: {speedup['latency_speedup']:.2f}x latency, {speedup['throughput_speedup']:.2f}x "
                     f"throughput, {speedup['size_ratio']:.2f}x fewer parameters")
    r = results[0]
    lines.append(f"({r.device}, {r.dtype}, sequence {r.seq_len}, {r.threads} threads)")
    return "\n".join(lines)


def format_engines(report: Bench) -> str:
    """The table of `tinybert bench --engine onnxruntime`: one row per engine and precision, then the speed-ups."""
    rows = [r for r in (report.vs, report.model, report.int8) if r]
    batch = f"seq/s (b={report.model.throughput_batch})"
    header = f"{'engine':<22}{'params':>9}{'disk':>10}{'p50 ms':>9}{'p95 ms':>9}{batch:>14}"
    lines = [header, "-" * len(header)]
    for r in rows:
        disk = f"{r.size_on_disk_bytes / 2**20:.0f} MB" if r.size_on_disk_bytes else "-"
        lines.append(f"{r.engine + ' ' + r.dtype:<22}{r.parameters / 1e6:>8.1f}M{disk:>10}"
                     f"{r.latency_ms_p50:>9.1f}{r.latency_ms_p95:>9.1f}{r.throughput_seq_per_s:>14.1f}")
    if report.speedup:
        lines.append(f"onnxruntime fp32 vs torch fp32: {report.speedup['latency_speedup']:.2f}x latency (batch 1), "
                     f"{report.speedup['throughput_speedup']:.2f}x throughput")
    if report.int8_speedup:
        lines.append(f"onnxruntime int8 vs fp32: {report.int8_speedup['latency_speedup']:.2f}x latency (batch 1), "
                     f"{report.int8_speedup['throughput_speedup']:.2f}x throughput (batch "
                     f"{report.model.throughput_batch})")
    r = report.model
    lines.append(f"(cpu, sequence {r.seq_len}, {r.threads} threads for each engine; {r.model})")
    return "\n".join(lines)


def run_bench(model: str, vs: str | None, device: str, dtype: str, json_path: Path | None, echo=print, *,
              engine: str = "torch", **sizes) -> Bench:
    """sizes: seq_len, throughput_batch, latency_repeats, throughput_repeats (defaults: 128, 32, 30, 5)."""
    if engine == "onnxruntime":
        return run_bench_onnx(Path(model), vs, json_path, echo, **sizes)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch; use --device cpu")
    if dtype == "auto":  # the run's own probe: bf16 where it measures fast on this device
        from tinybert.model import BertConfig
        from tinybert.train import decide_precision

        config = read_config(model) if Path(model).is_dir() else BertConfig.preset(model)
        dtype = decide_precision("auto", torch.device(device), config, echo).precision
    results = [benchmark(model, device=device, dtype=dtype, **sizes)]
    speedup = None
    if vs:
        results.append(benchmark(vs, device=device, dtype=dtype, **sizes))
        speedup = compare(results[0], results[1])
    echo(format_table(results, speedup))
    report = Bench(model=results[0], vs=results[1] if vs else None, speedup=speedup, machine=machine())
    if json_path is None and Path(model).is_dir() and not hub_snapshot(model):  # never into the hub cache
        json_path = Path(model) / BENCH
    if json_path is not None:
        report.write(json_path)
        echo(f"wrote {json_path}")
    return report


def run_bench_onnx(export_dir: Path, vs: str | None, json_path: Path | None, echo=print, **sizes) -> Bench:
    """ONNX Runtime fp32 (and int8 when the folder holds it) next to torch fp32 of `vs`, by default the model the
    export was made from; bench.json goes into the export folder."""
    from tinybert.onnx_export import INT8_FILE, MODEL_FILE, RECORD_FILE, ExportError, require_onnx

    require_onnx("onnxruntime")
    if not (export_dir / MODEL_FILE).is_file() or not (export_dir / RECORD_FILE).is_file():
        raise ExportError(f"{export_dir} holds no ONNX export ({MODEL_FILE}, {RECORD_FILE}); make one with "
                          f"tinybert export MODEL_DIR --format onnx --output {export_dir}")
    source = vs or json.loads((export_dir / RECORD_FILE).read_text()).get("source")
    fp32 = benchmark_onnx(export_dir, MODEL_FILE, **sizes)
    int8 = benchmark_onnx(export_dir, INT8_FILE, **sizes) if (export_dir / INT8_FILE).is_file() else None
    torch_row = benchmark(source, **sizes) if source and (vs or Path(source).is_dir()) else None
    import onnxruntime

    report = Bench(model=fp32, vs=torch_row, speedup=compare(fp32, torch_row) if torch_row else None,
                   machine={**machine(), "onnxruntime": onnxruntime.__version__},
                   int8=int8, int8_speedup=compare(int8, fp32) if int8 else None)
    echo(format_engines(report))
    json_path = json_path or export_dir / BENCH
    report.write(json_path)
    echo(f"wrote {json_path}")
    return report
