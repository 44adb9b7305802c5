"""Inference speed of our BERT against `transformers.BertModel` (same config, same weights) for the three presets.

For each device, shape, precision and implementation: latency at batch 1 (p50/p95, ms) and throughput at batch 32
(sequences/s), sequence length 128, random token ids, full attention mask, eval mode, `torch.inference_mode()`.
bf16 is `torch.autocast(device, dtype=torch.bfloat16)` around fp32 weights (how a user runs a checkpoint at bf16).
Prints a table last and writes JSON with the machine it ran on.

    python benchmarks/inference.py                   # CPU (and CUDA when present), full run: a few minutes on 2 cores
    python benchmarks/inference.py --quick           # smoke run: same grid, few repeats, < 1 minute on 2 cores
    python benchmarks/inference.py --device cuda --shapes bert-base --precisions bf16
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

from tinybert.checkpoint import hf_config, ours_to_hf
from tinybert.model import PRESETS, Bert, BertConfig

SEQ_LEN = 128
LATENCY_BATCH = 1
THROUGHPUT_BATCH = 32
SHAPES = ("bert-base", "tinybert-6l-768d", "tinybert-4l-312d")
IMPLS = ("ours", "transformers")
# Both implementations must compute the same function before their speeds are compared. They run the same aten ops
# in the same order (the outputs agree bit for bit on this CPU); the tolerances leave room for kernels that pick a
# different summation order on other hardware: float rounding in fp32, a few bf16 ulps of unit-scale outputs in bf16.
TOLERANCE = {"fp32": 1e-4, "bf16": 0.1}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few repeats (checks the script, numbers are rough)")
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                   help="all = CPU, and CUDA when available (default)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch.set_num_threads (default: the cores this process may use, %(default)s here)")
    p.add_argument("--json", type=Path, default=None,
                   help="where to write results (default benchmarks/results/inference-<device>.json, one per device)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(PRESETS), metavar="SHAPE",
                   help=f"presets to time (default: {' '.join(SHAPES)})")
    p.add_argument("--precisions", type=lambda s: s.split(","), default=["fp32", "bf16", "auto"],
                   help="comma-separated, from fp32,bf16,auto (default all; auto = what the run's probe picks on the "
                        "device for BERT-base's shape, recorded in the JSON and timed as that precision)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed batch-1 forwards per model and precision (default 10, quick 2); batch 32 gets a fifth")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed batch-1 forwards per model and precision (default 50, quick 5); batch 32 gets a "
                        "tenth, at least 1")
    args = p.parse_args(argv)
    for precision in args.precisions:
        if precision not in DTYPES and precision != "auto":
            p.error(f"unknown precision {precision!r}; choose from {','.join(DTYPES)},auto")
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)
    args.repeats = args.repeats if args.repeats is not None else (5 if args.quick else 50)
    # A batch-32 forward of bert-base takes seconds on 2 cores: a tenth of the repeats keeps the full run in minutes.
    args.throughput_warmup, args.throughput_repeats = args.warmup // 5, max(1, args.repeats // 10)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch sees no CUDA device")
    return args


# ---------------------------------------------------------------------------------------------------- models


def build_pair(shape: str, device: str) -> tuple[dict[str, torch.nn.Module], BertConfig]:
    """Our Bert with BERT's random init, and an HF BertModel holding the very same weights."""
    torch.manual_seed(0)
    config = BertConfig.preset(shape)
    ours = Bert(config).eval()
    hf = transformers.BertModel(transformers.BertConfig(**hf_config(config))).eval()
    missing, unexpected = hf.load_state_dict(ours_to_hf(ours.state_dict(), prefix=""), strict=False)
    # HF keeps its position ids as a non-persistent buffer; any other gap means the comparison is not like for like.
    if unexpected or [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]:
        raise RuntimeError(f"weights did not map one to one: missing {missing}, unexpected {unexpected}")
    return {"ours": ours.to(device), "transformers": hf.to(device)}, config


def make_inputs(config: BertConfig, batch: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    input_ids = torch.randint(1, config.vocab_size, (batch, SEQ_LEN), generator=g)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),  # full mask: every position is a real token
        "token_type_ids": torch.zeros_like(input_ids).to(device),
    }


def autocast(device: str, precision: str):
    dtype = DTYPES[precision]
    return torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def last_hidden_and_pooled(impl: str, out) -> tuple[torch.Tensor, torch.Tensor]:
    if impl == "ours":
        return out.hidden_states[-1], out.pooled
    return out.last_hidden_state, out.pooler_output


def check_parity(models, config, device, precision) -> float:
    """Max |ours - transformers| over the last hidden state and the pooled output; raises beyond TOLERANCE."""
    inputs = make_inputs(config, 2, device)
    with torch.inference_mode(), autocast(device, precision):
        outs = {impl: last_hidden_and_pooled(impl, m(**inputs)) for impl, m in models.items()}
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(outs["ours"], outs["transformers"]))
    if not diff <= TOLERANCE[precision]:
        raise AssertionError(f"ours and transformers disagree by {diff:.3g} ({precision}); timings would not compare")
    return diff


# ---------------------------------------------------------------------------------------------------- timing


def time_interleaved(models, inputs, device, precisions, warmup: int, repeats: int) -> dict[tuple, list[float]]:
    """Seconds per forward for each (impl, precision). All of them take turns forward by forward (the order reversed
    every other round), so a change in machine load (other processes on a shared host) hits each alike and the
    ours/transformers and bf16/fp32 ratios hold. Shapes run one after another: interleaving them too would evict a
    small model's weights from the last-level cache between its forwards, which a real server would not do."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    order = [(impl, precision) for precision in precisions for impl in models]
    times = {key: [] for key in order}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for impl, precision in order if i % 2 == 0 else order[::-1]:
                with autocast(device, precision):  # entered per forward, as a caller would; weights recast each time
                    sync()
                    start = time.perf_counter()
                    models[impl](**inputs)
                    sync()
                    elapsed = time.perf_counter() - start
                if i >= warmup:
                    times[impl, precision].append(elapsed)
    return times


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def bench_device(device: str, args) -> dict:
    rows, parity = [], []
    for shape in args.shapes:
        models, config = build_pair(shape, device)
        params = {impl: sum(p.numel() for p in m.parameters()) / 1e6 for impl, m in models.items()}
        attn_impl = models["transformers"].config._attn_implementation
        for precision in args.precisions:
            diff = check_parity(models, config, device, precision)
            parity.append({"shape": shape, "precision": precision, "max_abs_diff": diff,
                           "tolerance": TOLERANCE[precision]})
        latency = time_interleaved(models, make_inputs(config, LATENCY_BATCH, device), device, args.precisions,
                                   args.warmup, args.repeats)
        throughput = time_interleaved(models, make_inputs(config, THROUGHPUT_BATCH, device), device, args.precisions,
                                      args.throughput_warmup, args.throughput_repeats)
        for precision in args.precisions:
            for impl in models:
                lat, thr = latency[impl, precision], throughput[impl, precision]
                row = {
                    "device": device, "shape": shape, "precision": precision, "impl": impl,
                    # ours runs F.scaled_dot_product_attention in every layer when no scores are asked for
                    "attn_implementation": "sdpa" if impl == "ours" else attn_impl,
                    "params_m": round(params[impl], 2),
                    "latency_p50_ms": percentile(lat, 50) * 1e3,
                    "latency_p95_ms": percentile(lat, 95) * 1e3,
                    "latency_s": lat,
                    # median time per batch: robust to the odd slow forward on a shared machine
                    "throughput_seq_s": THROUGHPUT_BATCH / statistics.median(thr),
                    "throughput_batch_s": thr,
                }
                rows.append(row)
                print(f"  {device} {shape:17s} {precision} {impl:12s} b1 p50 {row['latency_p50_ms']:8.2f} ms  "
                      f"p95 {row['latency_p95_ms']:8.2f} ms   b32 {row['throughput_seq_s']:8.1f} seq/s", flush=True)
        del models
    return {"rows": rows, "parity": parity, "derived": derive(rows)}


# ---------------------------------------------------------------------------------------------------- summary


def derive(rows: list[dict]) -> list[dict]:
    """Speed ratios, > 1 when the first named is faster: b1 from p50 latency, b32 from throughput."""
    at = {(r["device"], r["shape"], r["precision"], r["impl"]): r for r in rows}
    keys = lambda i: list(dict.fromkeys(k[i] for k in at))  # noqa: E731  (in the order they ran)
    devices, shapes, precisions, impls = keys(0), keys(1), keys(2), keys(3)
    derived = []

    def add(what, fast, slow, **where):
        a, b = at.get(fast), at.get(slow)
        if a is not None and b is not None:
            derived.append({"what": what, **where, "b1": b["latency_p50_ms"] / a["latency_p50_ms"],
                            "b32": a["throughput_seq_s"] / b["throughput_seq_s"]})

    for d in devices:
        for s in shapes:
            for p in precisions:
                add("ours / transformers", (d, s, p, "ours"), (d, s, p, "transformers"),
                    device=d, shape=s, precision=p, impl="-")
        for s in shapes:
            for i in impls:
                add("bf16 / fp32", (d, s, "bf16", i), (d, s, "fp32", i), device=d, shape=s, precision="-", impl=i)
        for s in shapes:
            for p in precisions:
                for i in impls:
                    if s != "bert-base":
                        add(f"{s} / bert-base", (d, s, p, i), (d, "bert-base", p, i),
                            device=d, shape=s, precision=p, impl=i)
    return derived


def print_tables(rows: list[dict], derived: list[dict]):
    speed = {(d["device"], d["shape"], d["precision"]): d for d in derived if d["what"] == "ours / transformers"}
    header = ("device", "shape", "prec", "impl", "params(M)", "b1 p50 ms", "b1 p95 ms", "b32 seq/s",
              "ours/hf b1", "ours/hf b32")
    lines = []
    for r in rows:
        s = speed.get((r["device"], r["shape"], r["precision"])) if r["impl"] == "ours" else None
        lines.append((r["device"], r["shape"], r["precision"], r["impl"], f"{r['params_m']:.1f}",
                      f"{r['latency_p50_ms']:.2f}", f"{r['latency_p95_ms']:.2f}", f"{r['throughput_seq_s']:.1f}",
                      f"{s['b1']:.2f}x" if s else "", f"{s['b32']:.2f}x" if s else ""))
    _print_table(header, lines)
    others = [d for d in derived if d["what"] != "ours / transformers"]
    if not others:  # a single shape and precision: nothing to compare across
        return
    print()
    _print_table(("speed-up", "device", "shape", "precision", "impl", "b1 (p50 latency)", "b32 (throughput)"),
                 [(d["what"], d["device"], d["shape"] if d["what"] == "bf16 / fp32" else "", d["precision"],
                   d["impl"], f"{d['b1']:.2f}x", f"{d['b32']:.2f}x") for d in others], first_numeric=5)


def _print_table(header, lines, first_numeric=4):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) if i >= first_numeric else str(c).ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(fmt(line))


def machine_info(device: str, args) -> dict:
    cpu_model, flags = platform.processor(), []
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": cpu_model,
        # bf16 speed on CPU depends on these: avx512_bf16 (dot-product instructions), amx_bf16 (tile matmuls)
        "cpu_bf16_flags": [f for f in flags if "bf16" in f or f.startswith("amx")],
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "threads": torch.get_num_threads(),
        "load_average_1_5_15": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = {"all": ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])}.get(args.device, [args.device])
    settings = {"seq_len": SEQ_LEN, "latency_batch": LATENCY_BATCH, "throughput_batch": THROUGHPUT_BATCH,
                "warmup": args.warmup, "repeats": args.repeats, "throughput_warmup": args.throughput_warmup,
                "throughput_repeats": args.throughput_repeats, "quick": args.quick,
                "bf16": "torch.autocast(device, dtype=torch.bfloat16) around fp32 weights"}
    if "cpu" in devices and os.getloadavg()[0] > 0.5:
        # Each op is an OpenMP parallel region: when another process holds one of the cores, every op waits for a
        # descheduled thread, and a 5 ms forward can take 500 ms. The numbers are then the machine's, not the model's.
        print(f"warning: 1-minute load average {os.getloadavg()[0]:.2f} before starting; if other processes are still "
              f"running on these cores, CPU timings will be slow and noisy (the JSON records the load)", flush=True)
    results = {}
    asked = args.precisions
    for device in devices:
        auto = None
        if "auto" in asked:
            from tinybert.train import decide_precision

            auto = decide_precision("auto", torch.device(device), BertConfig.preset("bert-base")).to_dict()
            print(f"{device}: auto picks {auto['precision']}" + (f" (bf16 matmul {auto['ratio']}x fp32)"
                                                                  if auto["ratio"] else ""), flush=True)
        args.precisions = list(dict.fromkeys(auto["precision"] if p == "auto" else p for p in asked))
        print(f"{device}: {', '.join(args.shapes)} x {', '.join(args.precisions)} x {', '.join(IMPLS)}, "
              f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}", flush=True)
        machine = machine_info(device, args)
        machine["auto"] = auto
        started = time.perf_counter()
        result = bench_device(device, args)
        machine["load_average_1_5_15_end"] = os.getloadavg()
        machine["wall_s"] = round(time.perf_counter() - started, 1)
        results[device] = {"machine": machine, "settings": settings, **result}
    print()
    for device, result in results.items():
        m = result["machine"]
        print(f"{device}: {m.get('gpu', m['cpu_model'])}, {m['threads']} threads, torch {m['torch']}, "
              f"transformers {m['transformers']}, load average {m['load_average_1_5_15'][0]:.2f} at start, "
              f"{m['load_average_1_5_15_end'][0]:.2f} at end, {m['wall_s']} s")
    print_tables([r for res in results.values() for r in res["rows"]],
                 [d for res in results.values() for d in res["derived"]])
    if args.json is not None:
        paths = {args.json: results if len(results) > 1 else next(iter(results.values()))}
    else:
        paths = {Path(__file__).parent / "results" / f"inference-{d}.json": r for d, r in results.items()}
    for path, payload in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
