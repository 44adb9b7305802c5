"""`tinybert bench`: parameters, size on disk, latency (batch 1) and throughput (batch 32) of a model at sequence
length 128, and the speed-up against another model. Model cards take their figures from here."""

from __future__ import annotations

import platform
import statistics
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch

from tinybert.checkpoint import load_model
from tinybert.model import Bert
from tinybert.rundir import BENCH, Bench, BenchSide


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model: torch.nn.Module, batch: dict, device: torch.device, dtype: str, *, warmup: int,
                 repeats: int, call=None) -> list[float]:
    """Seconds per forward pass (eval mode, inference_mode, bf16 = autocast), after `warmup` untimed passes.
    `call(model, batch)` runs one pass; the default passes the batch as keyword arguments."""
    call = call or (lambda m, b: m(**b))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    model.eval()
    times = []
    with torch.inference_mode(), autocast:
        for i in range(warmup + repeats):
            _sync(device)
            start = time.perf_counter()
            call(model, batch)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


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
    return BenchSide(
        model=str(source), device=device, dtype=dtype, seq_len=seq_len, parameters=params, size_on_disk_bytes=size,
        latency_ms_p50=1000 * statistics.median(one), latency_ms_p95=1000 * percentile(one, 95),
        throughput_batch=throughput_batch, throughput_seq_per_s=throughput_batch / statistics.median(many),
        threads=torch.get_num_threads(),
    )


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


def run_bench(model: str, vs: str | None, device: str, dtype: str, json_path: Path | None, echo=print) -> Bench:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch; use --device cpu")
    if dtype == "auto":  # the run's own probe: bf16 where it measures fast on this device
        from tinybert.checkpoint import read_config
        from tinybert.model import BertConfig
        from tinybert.train import decide_precision

        config = read_config(model) if Path(model).is_dir() else BertConfig.preset(model)
        dtype = decide_precision("auto", torch.device(device), config, echo).precision
    results = [benchmark(model, device=device, dtype=dtype)]
    speedup = None
    if vs:
        results.append(benchmark(vs, device=device, dtype=dtype))
        speedup = compare(results[0], results[1])
    echo(format_table(results, speedup))
    report = Bench(model=results[0], vs=results[1] if vs else None, speedup=speedup, machine=machine())
    if json_path is None and Path(model).is_dir():
        json_path = Path(model) / BENCH
    if json_path is not None:
        report.write(json_path)
        echo(f"wrote {json_path}")
    return report
