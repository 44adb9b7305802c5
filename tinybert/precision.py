"""`precision: auto`, decided by measurement on the device a run will use: on CUDA bf16 where supported; on a CPU
the run's own matrix product (tokens x hidden by hidden x intermediate) is timed in fp32 and in bf16, and bf16 is
chosen where it is at least BF16_MIN_SPEEDUP times faster. The same CPU model can be either case (an Intel VM without
AMX runs bf16 at half the fp32 speed, an AMD EPYC with avx512_bf16 at 4.6x), so no CPU is judged by its name.

Verdicts are cached per device, torch version, thread count and shape in $TINYBERT_CACHE/precision.json (default
~/.cache/tinybert), so a probe costs about a second once and nothing after; a corrupt cache is ignored and rewritten.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

BF16_MIN_SPEEDUP = 1.3
_FORMAT = 1


@dataclass(frozen=True)
class Verdict:
    """The precision a run uses and why: `how` is recipe (forced), cuda, probe (measured now) or cache."""

    precision: str
    how: str
    ratio: float | None = None  # bf16 matmul speed over fp32 on this device (probe/cache)
    device: str = ""

    def describe(self) -> str:
        """One line for a run's first lines and --dry-run."""
        if self.how == "recipe":
            return f"precision: {self.precision} (set in the recipe)"
        if self.how == "cuda":
            return f"precision: {self.precision} (auto: {'bf16 is' if self.precision == 'bf16' else 'bf16 is not'} " \
                   f"supported on {self.device})"
        cached = ", cached" if self.how == "cache" else ""
        return (f"precision: {self.precision} (auto: bf16 matmul {self.ratio:.1f}x fp32 on this CPU{cached}; "
                f"bf16 needs >= {BF16_MIN_SPEEDUP}x)")

    def to_dict(self) -> dict:
        return asdict(self)


def cache_file() -> Path:
    return Path(os.environ.get("TINYBERT_CACHE", Path.home() / ".cache" / "tinybert")).expanduser() / "precision.json"


def cpu_name() -> str:
    """The CPU model, as /proc/cpuinfo names it (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(device: torch.device, hidden: int, intermediate: int, tokens: int = 2048, budget_s: float = 1.0) -> float:
    """bf16 over fp32 speed of `F.linear` (tokens, hidden) x (intermediate, hidden) on `device`: the best of several
    products in each precision, fp32 and bf16 taking turns (so a passing load on the machine hits both alike), in
    about budget_s seconds."""
    x = torch.randn(tokens, hidden, device=device)
    w = torch.randn(intermediate, hidden, device=device)
    pairs = {dtype: (x.to(dtype), w.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    best = {dtype: float("inf") for dtype in pairs}
    for a, b in pairs.values():
        F.linear(a, b)  # warm-up: first calls pick kernels and allocate
    spent, rounds = 0.0, 0
    while (spent < budget_s or rounds < 3) and rounds < 50:
        for dtype, (a, b) in pairs.items():
            started = time.perf_counter()
            F.linear(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - started
            best[dtype], spent = min(best[dtype], elapsed), spent + elapsed
        rounds += 1
    return best[torch.float32] / best[torch.bfloat16]


def resolve(precision: str, device: torch.device, *, hidden: int = 768, intermediate: int = 3072,
            tokens: int = 2048) -> Verdict:
    """The Verdict for a recipe's `precision` (auto, fp32, bf16) on `device`, for a model of that shape."""
    if precision != "auto":
        return Verdict(precision, "recipe")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return Verdict("bf16" if torch.cuda.is_bf16_supported() else "fp32", "cuda", device=name)
    key = f"{cpu_name()}|torch {torch.__version__}|threads {torch.get_num_threads()}|{tokens}x{hidden}x{intermediate}"
    path, cache = cache_file(), {}
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict) or cache.get("format") != _FORMAT:
            cache = {}
        ratio = float(cache["verdicts"][key])
        return Verdict("bf16" if ratio >= BF16_MIN_SPEEDUP else "fp32", "cache", ratio, key)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache, a corrupt one, or no verdict for this key: measure and (re)write it
    ratio = round(measure(device, hidden, intermediate, tokens), 2)
    verdicts = cache.get("verdicts") if isinstance(cache.get("verdicts"), dict) else {}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": _FORMAT, "verdicts": {**verdicts, key: ratio}}, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache costs a probe per run, nothing else
    return Verdict("bf16" if ratio >= BF16_MIN_SPEEDUP else "fp32", "probe", ratio, key)
