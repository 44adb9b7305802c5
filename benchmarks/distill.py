"""General-distillation step throughput (tokens/s): a BERT-base-shaped teacher into TinyBERT4, batch 32, sequence
128, fp32 and bf16, plain engine and DeepSpeed, CPU and CUDA when present; optionally the original TinyBERT
`general_distill.py` step on the same shapes and machine, run from a checkout given with --original.

    python benchmarks/distill.py [--original PATH/TO/Pretrained-Language-Model/TinyBERT] [--quick]

Prints a table and writes JSON (benchmarks/results/distill-<device>.json). Weights are random: throughput does
not depend on their values. Rows are full (no padding), as packed general-distillation rows are.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import types
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch

from tinybert.distill import Distiller
from tinybert.model import Bert, BertConfig
from tinybert.recipe import build_recipe
from tinybert.train import build_engine, decide_precision, teacher_dtype, world


def resolve(precision: str, teacher: str, device) -> tuple[str, dict | None]:
    """A row's precision: fp32 and bf16 as they are; auto as the run's probe decides it (its verdict recorded);
    bf16-fp32teacher is bf16 with the teacher kept in fp32 weights (the choice before teacher_dtype, for the
    comparison)."""
    if precision != "auto":
        return ("bf16" if precision == "bf16-fp32teacher" else precision), None
    verdict = decide_precision("auto", device, BertConfig.preset(teacher))
    return verdict.precision, verdict.to_dict()


def batch_for(B: int, T: int, V: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1, V, (B, T), generator=g).to(device),
        "attention_mask": torch.ones(B, T, dtype=torch.long, device=device),
        "token_type_ids": torch.cat([torch.zeros(B, T // 2), torch.ones(B, T - T // 2)], 1).long().to(device),
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def ours(engine_name: str, precision: str, args, device) -> list[float]:
    """One optimizer step exactly as tinybert's loop makes it: engine forward, weighted sum, backward, step."""
    torch.manual_seed(0)
    resolved, _ = resolve(precision, args.teacher, device)
    teacher = Bert(BertConfig.preset(args.teacher)).to(device)
    student = Bert(BertConfig.preset(args.student)).to(device)
    distiller = Distiller(teacher, student, "uniform", terms=("embedding", "hidden", "attention")).to(device)
    teacher.to(torch.float32 if precision == "bf16-fp32teacher" else teacher_dtype(resolved))
    values = {"batch_size": args.batch, "precision": resolved, "max_grad_norm": 1.0}
    if engine_name == "deepspeed":
        values["deepspeed"] = {"zero_optimization": {"stage": args.zero}, "steps_per_print": 10**9}
    recipe = build_recipe({}, **values)
    engine = build_engine(distiller, recipe, total_steps=1000, device=device)
    distiller.train()
    batch = batch_for(args.batch, args.seq, teacher.config.vocab_size, device)

    def step():
        terms = engine(batch)
        engine.backward(sum(terms.values()))
        engine.step()

    return time_steps(step, device, args.warmup, args.repeats)


def import_original(path: str):
    """The original TinyBERT's `transformer.modeling` and `transformer.optimization`, imported from a checkout.
    Its file_utils imports boto3/botocore for S3 downloads, which a benchmark never makes: stand-ins satisfy it."""
    sys.path.insert(0, str(Path(path).resolve()))
    for name in ("boto3", "botocore", "botocore.exceptions"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["botocore.exceptions"].ClientError = Exception
    from transformer import modeling, optimization

    return modeling, optimization


def original_config(config_class, preset: str):
    """The original's BertConfig for one of our presets."""
    c = BertConfig.preset(preset)
    return config_class(vocab_size_or_config_json_file=c.vocab_size, hidden_size=c.hidden_size,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                        intermediate_size=c.intermediate_size)


def original_layer_loss(student_atts, teacher_atts, student_reps, teacher_reps):
    """The original's intermediate-layer loss as its scripts compute it: the <= -1e2 zeroing on mask-added scores,
    teacher layer (j+1)*k for student layer j and state j*k for state j (k = N/M), summed MSEs."""
    mse = torch.nn.functional.mse_loss
    k = len(teacher_atts) // len(student_atts)
    loss = 0.0
    for j, s_att in enumerate(student_atts):
        t_att = teacher_atts[(j + 1) * k - 1]
        loss = loss + mse(torch.where(s_att <= -1e2, torch.zeros_like(s_att), s_att),
                          torch.where(t_att <= -1e2, torch.zeros_like(t_att), t_att))
    for j, s_rep in enumerate(student_reps):
        loss = loss + mse(s_rep, teacher_reps[j * k])
    return loss


def original(precision: str, args, device) -> list[float]:
    """The original general_distill.py inner step (teacher in train mode with autograd, fp32, BertAdam), calling
    the original's own modules from --original; nothing of it is copied here."""
    modeling, optimization = import_original(args.original)
    config = partial(original_config, modeling.BertConfig)
    torch.manual_seed(0)
    teacher = modeling.BertModel(config(args.teacher)).to(device)  # never put in eval() by the original
    student = modeling.TinyBertForPreTraining(config(args.student), fit_size=768).to(device)
    student.train()
    optimizer = optimization.BertAdam(student.parameters(), lr=5e-5, warmup=0.1, t_total=1000)
    b = batch_for(args.batch, args.seq, 30522, device)
    def step():
        # As in general_distill.py: both forwards with autograd, teacher outputs detached afterwards, the
        # <= -1e2 zeroing on mask-added scores, mapped layers k = 12/4, summed MSEs.
        student_atts, student_reps = student(b["input_ids"], b["token_type_ids"], b["attention_mask"])
        teacher_reps, teacher_atts, _ = teacher(b["input_ids"], b["token_type_ids"], b["attention_mask"])
        teacher_reps = [t.detach() for t in teacher_reps]
        teacher_atts = [t.detach() for t in teacher_atts]
        loss = original_layer_loss(student_atts, teacher_atts, student_reps, teacher_reps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return time_steps(step, device, args.warmup, args.repeats)


def machine(device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
        info["cores"] = len(names)
        info["amx"] = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
        info["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx_vnni", "avx2", "fma")))
    return info


def step_flops_per_token(teacher: BertConfig, student: BertConfig, seq: int) -> float:
    """Model FLOPs of one distillation step per token: the teacher's forward and the student's forward and backward
    (3x a forward); a forward is 2 FLOPs per weight of the encoder's matrices plus 4*T*H per layer for the scores
    and the weighted sum of values. Embeddings, projections, LayerNorms and softmax are left out (a few %)."""
    def forward(c: BertConfig) -> float:
        H, I, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
        return L * (2 * (4 * H * H + 2 * H * I) + 4 * seq * H)

    return forward(teacher) + 3 * forward(student)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--teacher", default="bert-base")
    p.add_argument("--student", default="tinybert-4l-312d")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--precisions", default="fp32,bf16,auto",
                   help="fp32, bf16 (teacher in bf16 weights, as runs do), bf16-fp32teacher, auto (the probe)")
    p.add_argument("--engines", default="plain,deepspeed")
    p.add_argument("--zero", type=int, default=2, help="ZeRO stage for the DeepSpeed rows")
    p.add_argument("--original", help="path to the original TinyBERT folder (holds transformer/)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's dense bf16 peak, for model FLOPs utilisation (e.g. 989 for an H100/H200 SXM)")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch's default)")
    p.add_argument("--quick", action="store_true", help="batch 8, one repeat: checks the script runs")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.quick:
        args.batch, args.repeats, args.warmup = 8, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tokens = args.batch * args.seq
    rows = []
    runs = [("tinybert", e, prec) for e in args.engines.split(",") for prec in args.precisions.split(",")]
    if args.original:
        runs.append(("original", "plain", "fp32"))
    for impl, engine_name, precision in runs:
        times = original(precision, args, device) if impl == "original" else ours(engine_name, precision, args, device)
        median = statistics.median(times)
        verdict = resolve(precision, args.teacher, device)[1] if impl == "tinybert" else None
        flops = step_flops_per_token(BertConfig.preset(args.teacher), BertConfig.preset(args.student), args.seq)
        rows.append({"impl": impl, "engine": engine_name, "precision": precision, "median_s": median,
                     "tokens_per_s": tokens / median, "times_s": times, "auto": verdict,
                     "model_tflops_per_s": tokens / median * flops / 1e12,
                     "mfu": tokens / median * flops / (args.peak_tflops * 1e12) if args.peak_tflops else None})
        print(f"  {impl:<9} {engine_name:<9} {precision:<5} {median:7.2f} s/step  {tokens / median:8.0f} tok/s",
              flush=True)
    base = next((r["tokens_per_s"] for r in rows if r["impl"] == "original"), None)
    print(f"\ngeneral distillation step: {args.teacher} -> {args.student}, batch {args.batch}, seq {args.seq}, "
          f"{device}, {torch.get_num_threads()} threads")
    print(f"{'impl':<10}{'engine':<11}{'precision':<18}{'s/step':>8}{'tokens/s':>11}{'vs original':>13}")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        name = r["precision"] + (f" ({r['auto']['precision']})" if r.get("auto") else "")
        print(f"{r['impl']:<10}{r['engine']:<11}{name:<18}{r['median_s']:>8.2f}{r['tokens_per_s']:>11.0f}"
              f"{ratio:>13}")
    for r in rows:
        if r.get("auto"):
            ratio = f", bf16 matmul {r['auto']['ratio']}x fp32" if r["auto"]["ratio"] else ""
            print(f"auto: {r['auto']['precision']}{ratio} ({r['auto']['how']})")
            break
    for r in rows:
        mfu = f", MFU {100 * r['mfu']:.1f}% of {args.peak_tflops:g}" if r["mfu"] is not None else ""
        print(f"  {r['impl']} {r['engine']} {r['precision']}: {r['model_tflops_per_s']:.2f} model TFLOP/s{mfu}")
    out = args.json or Path(__file__).parent / "results" / f"distill-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(device), "config": vars(args) | {"json": str(out)},
                               "rows": rows}, indent=2, default=str))
    print(f"wrote {out}")
    if world()[1] > 1 or torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
