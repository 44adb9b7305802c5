"""The one training loop that general distillation, both task-distillation stages and fine-tuning share, with its
engine seam (DeepSpeed when the recipe has a `deepspeed` block, a small plain engine otherwise), atomic
checkpoints that resume exactly, and logging (progress bar, JSONL, TensorBoard)."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from tinybert.recipe import Recipe
from tinybert.rundir import WRITES, RunDir, manifest_problem, read_log, write_atomic, write_manifest


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, bad output directory); earlier checkpoints stay intact."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run at a step boundary, once `checkpoint` was written; cli.py prints the
    --resume command (rank 0) and exits 130."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path):
        super().__init__(f"{signal_name}: stopped after step {step}; checkpoint {checkpoint} written")
        self.checkpoint, self.rank = checkpoint, world()[0]


# ------------------------------------------------------------------------------------------------ distributed


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def decide_precision(precision: str, device: torch.device, config=None, echo=None):
    """The precision.Verdict for a recipe's `precision` on `device` ('auto': bf16 where bf16 matrix products measure
    fast, see precision.resolve). config: the model whose hidden x intermediate product is probed (default BERT-base's
    shape); echo: prints the decision, e.g. `precision: bf16 (auto: bf16 matmul 4.6x fp32 on this CPU)`."""
    from tinybert.precision import resolve

    shape = {} if config is None else {"hidden": config.hidden_size, "intermediate": config.intermediate_size}
    verdict = resolve(precision, device, **shape)
    if echo is not None:
        echo(verdict.describe())
    return verdict


def teacher_dtype(precision: str) -> torch.dtype:
    """The frozen teacher's weight dtype for a run's (resolved) precision: bf16 in a bf16 run, so its matrix
    products get bf16 weights without a cast of every weight on every step (autocast re-casts weights that need no
    gradient on each call) and a DeepSpeed bf16 student meets a bf16 teacher; fp32 otherwise. The student keeps fp32
    master weights under autocast, and the losses are computed in fp32 either way (losses.py)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def init_deepspeed():
    """Start torch.distributed for DeepSpeed. Launched by `deepspeed` or `torchrun` the environment is set; a
    plain `python` run gets a one-process group on this machine."""
    import deepspeed

    # The shared-memory allreduce op compiles for ~37 s on first use and gloo does the job on CPU.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if "RANK" not in os.environ:
        with socket.socket() as s:  # a free port
            s.bind(("127.0.0.1", 0))
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(s.getsockname()[1]))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return deepspeed


def autocast(device: torch.device, precision: str):
    """bf16 autocast in a bf16 run (the weights stay fp32), nothing otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def barrier():
    if world()[1] > 1:
        torch.distributed.barrier()


@dataclass(frozen=True)
class Run:
    """What every run knows about its process once `start_run` has set it up."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints, writes files and exports."""
        return self.rank == 0

    def say(self, echo: Callable[[str], None]) -> Callable[[str], None]:
        """`echo` on rank 0, a no-op elsewhere: N processes print one report."""
        return echo if self.main else (lambda *args, **kwargs: None)


def start_run(recipe: Recipe, *, dry_run: bool = False) -> Run:
    """The one set-up of every run (general distillation, fine-tuning, task distillation): the process group when a
    launcher started several processes, or a one-process group when DeepSpeed needs one; then the seed and the
    device. Everything after it (micro-batch sizes, ranks, who writes) reads the world it made."""
    if not dry_run and recipe.deepspeed is not None:
        init_deepspeed()
    elif not dry_run and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(default_device())
    seed_everything(recipe.seed)
    return Run(*world(), default_device())


def micro_batch_size(recipe: Recipe) -> int:
    """Rows per process per forward: the recipe's batch_size is the global batch (all processes, all
    micro-batches of one optimizer step)."""
    world_size = world()[1]
    if (micro := recipe.batch_size // (recipe.grad_accum * world_size)) == 0:
        raise TrainingError(f"batch_size {recipe.batch_size} is smaller than grad_accum x processes "
                            f"({recipe.grad_accum} x {world_size})")
    return micro


# ---------------------------------------------------------------------------------------------------- engines


class PlainEngine:
    """The engine seam without DeepSpeed: what the loop calls on a DeepSpeedEngine (step only updates at an
    accumulation boundary). Under a launcher with several processes it averages the gradients across them before
    each update (what DDP does), so every process holds the same weights."""

    def __init__(self, module: nn.Module, optimizer, scheduler, recipe: Recipe, device: torch.device):
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.recipe, self.device, self.micro_steps, self.grad_norm = recipe, device, 0, None

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        with autocast(self.device, self.recipe.precision):
            return self.module(batch)

    def backward(self, loss: Tensor):
        (loss / self.recipe.grad_accum).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.recipe.grad_accum == 0

    def step(self):
        if self.is_gradient_accumulation_boundary():
            params = [p for p in self.module.parameters() if p.grad is not None]
            world_size = world()[1]
            if world_size > 1 and params:  # the gradients' mean over the processes, all-reduced in one flat buffer
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                torch.distributed.all_reduce(flat)
                for p, chunk in zip(params, flat.div_(world_size).split([p.numel() for p in params])):
                    p.grad.copy_(chunk.view_as(p))
            max_norm = self.recipe.max_grad_norm if self.recipe.max_grad_norm > 0 else math.inf
            self.grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1

    def get_global_grad_norm(self):
        return self.grad_norm

    def save_checkpoint(self, directory: Path):
        """directory/state.pt: tensors, and the plain numbers and lists of the optimizer's and schedule's state
        dicts, nothing that needs unpickling code to load (it loads with weights_only=True)."""
        torch.save({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "micro_steps": self.micro_steps}, directory / "state.pt")

    def load_checkpoint(self, directory: Path):
        state = load_tensors(directory / "state.pt", self.device)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps = state["micro_steps"]


def load_tensors(path: Path, device) -> dict:
    """torch.load with weights_only=True: tensors and plain containers load, any other pickled object (code that
    would run on load) is refused in one line."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise TrainingError(f"{path} holds pickled objects besides tensors; refused to load it (weights_only): a "
                            f"checkpoint tinybert writes never does, so this one was altered or made elsewhere; "
                            f"do not resume from it") from None


class DeepSpeedEngine:
    """deepspeed.initialize's engine behind the same seam; the recipe's `deepspeed` block is its config. The rest of
    the seam (module, backward, step, is_gradient_accumulation_boundary) is the engine's own."""

    def __init__(self, module: nn.Module, optimizer, scheduler, recipe: Recipe, device: torch.device):
        deepspeed, config, micro = init_deepspeed(), dict(recipe.deepspeed), micro_batch_size(recipe)
        derived = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": recipe.grad_accum,
                   "train_batch_size": micro * recipe.grad_accum * world()[1],
                   "gradient_clipping": recipe.max_grad_norm, "bf16": {"enabled": recipe.precision == "bf16"}}
        for key, value in derived.items():
            if key in config and config[key] != value:
                raise TrainingError(f"deepspeed.{key} is {config[key]!r} but the recipe implies {value!r} (from "
                                    f"batch_size, grad_accum, max_grad_norm, precision); set it through those "
                                    f"recipe keys")
            config[key] = value
        if config.get("fp16", {}).get("enabled") and device.type == "cpu":
            raise TrainingError("deepspeed fp16 does not run on CPU; use precision=bf16")
        # A torch optimizer, not one named in the config: DeepSpeed's own compile for about a minute on first use.
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(model=module, optimizer=optimizer,
                                                                              lr_scheduler=scheduler, config=config)
        self.device = device

    def __getattr__(self, name: str):  # only for names this class does not set
        return getattr(self.__dict__["engine"], name)

    def __call__(self, batch):
        return self.engine(batch)

    def get_global_grad_norm(self):
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def save_checkpoint(self, directory: Path):
        self.engine.save_checkpoint(str(directory), tag="deepspeed")

    def load_checkpoint(self, directory: Path):
        # DeepSpeed's loader unpickles its files (torch.load with weights_only=False); the caller has checked them
        # against the checkpoint's manifest first (docs/resume.md).
        path, _ = self.engine.load_checkpoint(str(directory), tag="deepspeed")
        if path is None:
            raise TrainingError(f"DeepSpeed could not load the checkpoint in {directory}")


def build_engine(module: nn.Module, recipe: Recipe, total_steps: int, device: torch.device):
    """AdamW (no weight decay on biases and LayerNorm), warmup then the recipe's schedule, wrapped in an engine."""
    from transformers import get_scheduler

    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": recipe.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    # The fused kernel updates each tensor in one pass; torch's CPU default loops over tensors with several passes
    # each, which is most of a small student's step (TinyBERT4 on CPU: ~140 ms of Adam per step against ~23 ms).
    # DeepSpeed keeps the default: its ZeRO optimizers step flattened partitions of their own.
    optimizer = torch.optim.AdamW(groups, lr=recipe.learning_rate, betas=tuple(recipe.adam_betas), eps=recipe.adam_eps,
                                  fused=True if recipe.deepspeed is None and device.type in ("cpu", "cuda") else None)
    scheduler = get_scheduler(recipe.scheduler, optimizer, num_warmup_steps=int(recipe.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    engine = DeepSpeedEngine if recipe.deepspeed is not None else PlainEngine
    return engine(module, optimizer, scheduler, recipe, device)


# ------------------------------------------------------------------------------------------------ checkpoints


def rng_state() -> tuple[dict[str, Tensor], dict]:
    """This process's RNG states as tensors (rng.pt) and the numbers beside them (state.json): python's and numpy's
    Mersenne Twister keys as int64 tensors, torch's (and this process's GPU's) byte states as they are."""
    version, keys, gauss = random.getstate()
    name, np_keys, position, has_gauss, cached = np.random.get_state()
    tensors = {"python": torch.tensor(keys, dtype=torch.int64), "numpy": torch.from_numpy(np_keys.astype(np.int64)),
               "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # This process's GPU only: get_rng_state_all() would start a CUDA context on every visible GPU from every
        # rank (memory on each GPU times the ranks), and a resume on another GPU count could not restore it.
        tensors["cuda"] = torch.cuda.get_rng_state(default_device())
    return tensors, {"python": [version, gauss], "numpy": [name, int(position), int(has_gauss), float(cached)]}


def set_rng_state(tensors: dict[str, Tensor], numbers: dict):
    version, gauss = numbers["python"]
    random.setstate((version, tuple(tensors["python"].tolist()), gauss))
    name, position, has_gauss, cached = numbers["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"], default_device())


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(engine, run_dir: RunDir, client_state: dict, keep: int) -> Path:
    """Write into a temporary directory, manifest last, then rename: a crash mid-write never leaves a half checkpoint
    under a checkpoint's name. Each rank writes rank{r}/state.json (the loop's state) and rank{r}/rng.pt (its RNG
    states: every rank's differ); the engine its own files (rank{r}/state.pt, or DeepSpeed's deepspeed/)."""
    rank, step = world()[0], client_state["step"]
    final, tmp = run_dir.checkpoint(step), run_dir.checkpoint(step, tmp=True)
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    own = tmp / f"rank{rank}"
    own.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(own if isinstance(engine, PlainEngine) else tmp)
    tensors, numbers = rng_state()
    torch.save(tensors, own / "rng.pt")
    (own / "state.json").write_text(json.dumps(dict(client_state, rng=numbers), indent=1) + "\n")
    barrier()
    if rank == 0:
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in run_dir.checkpoints()[:-keep]:
            shutil.rmtree(old)
    barrier()
    return final


def load_checkpoint(engine, path: Path) -> dict:
    """Restore a checkpoint whose manifest was checked (resume_point): the engine's state, this rank's RNG states;
    returns the loop's state (state.json)."""
    own = path / f"rank{world()[0]}"
    engine.load_checkpoint(own if isinstance(engine, PlainEngine) else path)
    client_state = json.loads((own / "state.json").read_text())
    set_rng_state(load_tensors(own / "rng.pt", "cpu"), client_state.pop("rng"))
    return client_state


def resume_point(run_dir: RunDir, echo) -> Path | None:
    """--resume's checkpoint: the newest one whose manifest holds (rundir.manifest_problem), checked before any
    engine reads a byte of it. Damaged newer ones are named in one line and passed over; when every checkpoint is
    damaged the run stops, naming what to delete. Folders under checkpoints/ that are not ours are named and left."""
    for odd in run_dir.odd_checkpoints():
        echo(f"note: ignoring {odd}: not a checkpoint folder (those are named step-NNNNNNN)")
    damaged = []
    for path in reversed(run_dir.checkpoints()):
        problem = manifest_problem(path)
        if problem is None:
            if damaged:
                echo(f"warning: damaged checkpoint {'; '.join(damaged)}; resuming from the previous complete one, "
                     f"{path.name}")
            return path
        damaged.append(f"{path} ({problem})")
    if damaged:
        raise TrainingError(f"--resume: no complete checkpoint: damaged {'; '.join(damaged)}; delete "
                            f"{'that folder' if len(damaged) == 1 else 'those folders'} and start again with "
                            f"--overwrite")
    return None


# ------------------------------------------------------------------------------------------------ run directories


def check_output(run_dir: RunDir, kind: str, *, resume: bool, overwrite: bool, inputs: dict, fingerprint: dict,
                 needs_checkpoint: bool = False, echo=print):
    """Refuse to mix two runs in one directory (`kind`: general, finetune or task, whose files it looks for).
    Removes nothing: `start_output` does, once the new run is set up, so a bad input leaves the old run intact.
    needs_checkpoint: --resume also needs a checkpoint under checkpoints/ (a one-stage run). inputs: label -> the
    run's input paths, which --output may not be, hold or lie in; fingerprint: what makes the run's result, which
    --resume may not change (guards.py). Rank 0 takes the output's lock for the rest of the process."""
    from tinybert import guards

    guards.check_output_place(run_dir.path, inputs)
    if int(os.environ.get("RANK", "0")) == 0:  # before start_run: world() does not know the ranks yet
        guards.take_lock(run_dir.path, echo)
    output, holds_run = run_dir.path, run_dir.holds(kind)
    if resume and not holds_run:
        raise TrainingError(f"--resume: {output} holds no run to resume; drop --resume to start one")
    if resume and needs_checkpoint and run_dir.latest_checkpoint() is None:
        raise TrainingError(f"--resume: {output} holds no checkpoint to resume from; pass --overwrite to start "
                            f"again")
    if not resume and holds_run and not overwrite:
        raise TrainingError(f"{output} already holds a run; pass --resume to continue it, --overwrite to replace "
                            f"it, or choose another --output")
    if resume:
        guards.compare_fingerprint(run_dir, fingerprint, echo)


def start_output(run_dir: RunDir, kind: str, record: dict, fingerprint: dict, *, clear: bool):
    """Once the run is set up (so a bad input leaves the old run intact), rank 0: clear (--overwrite) removes the
    previous run's files (only those; anything else in the directory stays); then recipe.yaml, what the run was
    started with, and fingerprint.json, what --resume compares."""
    import yaml

    from tinybert.guards import write_fingerprint

    if world()[0] == 0:
        for name in WRITES[kind] if clear else ():
            path = run_dir.path / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        run_dir.path.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir.recipe, yaml.safe_dump(record, sort_keys=False))
        write_fingerprint(run_dir, fingerprint)
    barrier()


def run_stage(stage: Stage, recipe: Recipe, run_dir: RunDir, steps: int, device: torch.device, *, resume: bool,
              extra_state: dict[str, dict] | None = None, on_start: Callable[[], None] | None = None,
              progress: bool = True, echo=print):
    """One stage of a run, the same for every kind: engine, resume from the newest checkpoint under `run_dir`
    (with --resume), train to `steps`, checkpoints on the way. Returns the engine.

    extra_state: dicts that travel in the checkpoints (e.g. the best score so far); on resume each is refilled
    from the checkpoint before training goes on. on_start: called once the engine stands and the checkpoint is
    loaded, before the first step (where --overwrite clears the old run: a run that fails to set up leaves it)."""
    import copy

    latest = resume_point(run_dir, echo) if resume else None
    stage.module.to(device)
    engine = build_engine(stage.module, recipe, steps, device)
    resumed = load_checkpoint(engine, latest) if latest else None
    if resume and world()[0] == 0:  # once the checkpoint loaded: a refused resume changes nothing
        for unfinished in run_dir.unfinished_checkpoints():  # writes a killed run never finished
            shutil.rmtree(unfinished)
        trim_log(run_dir, stage.name, resumed["step"] if resumed else 0, echo)
    if resumed:
        for key, value in (extra_state or {}).items():
            value.update(copy.deepcopy(resumed[key]))
        which = {"stage1": "stage 1 ", "stage2": "stage 2 "}.get(stage.name, "")  # task distillation's two
        echo(f"resuming {which}from {latest} (step {resumed['step']} of {steps})")
    if on_start is not None:
        on_start()
    train(stage, engine, recipe, run_dir, steps, resume=resumed, extra_state=extra_state, progress=progress)
    return engine


# ---------------------------------------------------------------------------------------------------- the loop


@dataclass
class Stage:
    """One optimisation run of the loop: a module that returns loss terms, weighted and summed here."""

    name: str
    module: nn.Module  # batch -> {term: scalar}; its trainable parameters are what the engine optimises
    weights: dict[str, float]
    dataset: object  # rows indexable by a list of ints (a datasets.Dataset)
    plan: Callable[[int], list[list[int]]]  # epoch -> micro-batches (lists of row indices), deterministic
    collate: Callable[[list[dict]], dict[str, Tensor]]
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None  # held-out metrics, called on the module
    on_eval: Callable[[int, dict[str, float]], None] | None = None  # e.g. keep the best checkpoint


def trim_log(run_dir: RunDir, stage: str, step: int, echo):
    """On --resume, before the loop appends to log.jsonl (rank 0): steps after the checkpoint's `step` are run
    again, so the interrupted run's lines for them go; so does a torn last line (half a line from a run killed while
    writing it), said in one line."""
    if not run_dir.log.is_file():
        return
    try:
        records, torn = read_log(run_dir.log)
    except ValueError as e:
        raise TrainingError(f"--resume: {e}") from None
    if torn:
        echo(f"note: dropped the torn last line of {run_dir.log} (a run killed while writing it)")
    kept = [r for r in records if not (r.get("stage") == stage and r.get("step", 0) > step)]
    write_atomic(run_dir.log, "".join(json.dumps(record) + "\n" for record in kept))


class RunLog:
    """JSONL (one line per optimizer step and per evaluation) and TensorBoard scalars, written by rank 0."""

    def __init__(self, run_dir: RunDir, stage: str):
        self.main, self.stage, self.path, self.tb = world()[0] == 0, stage, run_dir.log, None
        if self.main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir.tensorboard / stage))
            except ImportError:  # tensorboard is a dependency; a stripped environment still trains
                pass

    def write(self, record: dict):
        if not self.main:
            return
        record = {"stage": self.stage, **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = "eval/" if record.get("kind") == "eval" else "train/"
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tb.add_scalar(prefix + key, value, record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def micro_batches_per_epoch(stage: Stage, recipe: Recipe) -> int:
    """Micro-batches each rank runs in one epoch: whole optimizer steps only, the same count on every rank."""
    return len(stage.plan(0)) // (recipe.grad_accum * world()[1]) * recipe.grad_accum


def total_steps(stage: Stage, recipe: Recipe) -> int:
    if (steps_per_epoch := micro_batches_per_epoch(stage, recipe) // recipe.grad_accum) == 0:
        raise TrainingError(f"stage {stage.name}: the data gives less than one optimizer step per epoch; lower "
                            f"batch_size ({recipe.batch_size}) or give more data")
    return recipe.max_steps if recipe.max_steps > 0 else math.ceil(recipe.epochs * steps_per_epoch)


def train(stage: Stage, engine, recipe: Recipe, run_dir: RunDir, steps: int, *, resume: dict | None = None,
          extra_state: dict | None = None, progress: bool = True) -> int:
    """Run `stage` for `steps` optimizer steps, or on from `resume` (a checkpoint's client state).

    Data order: epoch e's micro-batches come from stage.plan(e); rank r takes every world_size-th one.
    A checkpoint records (epoch, micro-batch) so a resumed run sees exactly the batches it had not seen.
    Ctrl-C or SIGTERM: the step under way finishes, a checkpoint is written and Interrupted is raised."""
    from tqdm.auto import tqdm

    rank, world_size = world()
    per_epoch = micro_batches_per_epoch(stage, recipe)
    step, epoch, position = (resume["step"], resume["epoch"], resume["position"]) if resume else (0, 0, 0)
    log = RunLog(run_dir, stage.name)
    bar = tqdm(total=steps, initial=step, desc=stage.name, disable=not progress or rank != 0, dynamic_ncols=True)
    engine.module.train()
    tokens, started, window = 0, time.perf_counter(), {}

    def due(every: int) -> bool:
        """Every `every` optimizer steps (every = 0: at the end of each epoch, as fine-tuning evaluates), and last."""
        return step == steps or (step % every == 0 if every > 0 else epoch_done)

    def checkpoint() -> Path:
        state = {"stage": stage.name, "step": step, "epoch": epoch, "position": position, "recipe": recipe.to_dict(),
                 **(extra_state or {})}
        return save_checkpoint(engine, run_dir, state, recipe.keep_checkpoints)

    with StopSignal() as stop:
        try:
            while step < steps:
                mine = stage.plan(epoch)[: per_epoch * world_size][rank::world_size]
                while position < len(mine) and step < steps:
                    boundary, batch_tokens = _micro_step(stage, engine, recipe, run_dir, step, mine[position], window)
                    position, tokens = position + 1, tokens + batch_tokens
                    if not boundary:
                        continue
                    step += 1
                    elapsed = time.perf_counter() - started
                    tokens_per_s = tokens / elapsed if elapsed > 0 else 0.0
                    log.write({"kind": "train", "step": step, "epoch": epoch,
                               "loss": weighted_sum(window, stage.weights), **window,
                               "lr": engine.optimizer.param_groups[0]["lr"],
                               "grad_norm": engine.get_global_grad_norm(), "tokens_per_s": tokens_per_s})
                    if step % recipe.log_every == 0 or step == steps:
                        bar.set_postfix({k: f"{v:.4g}" for k, v in window.items()} | {"tok/s": f"{tokens_per_s:.0f}"})
                    bar.update(1)
                    window, epoch_done = {}, position == len(mine)
                    if epoch_done:  # the checkpoint below then points at the start of the next epoch
                        epoch, position = epoch + 1, 0
                    if stage.evaluate is not None and due(recipe.eval_every):
                        metrics = stage.evaluate(engine.module)
                        engine.module.train()
                        log.write({"kind": "eval", "step": step, "epoch": epoch, **metrics})
                        if rank == 0:
                            bar.write(f"[{stage.name}] step {step} eval: "
                                      + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
                        if stage.on_eval is not None:
                            stage.on_eval(step, metrics)
                    saved = checkpoint() if due(recipe.save_every) else None
                    if stop.requested(engine.device):
                        raise Interrupted(stop.received or "a signal to another process", step, saved or checkpoint())
                    if epoch_done:
                        break
        finally:  # the progress line ends before any error is printed, so the error is a line of its own
            bar.close()
            log.close()
    return step


class StopSignal:
    """SIGINT (Ctrl-C) and SIGTERM while the loop runs: noted, so the loop stops at the next step boundary once a
    checkpoint is written, instead of dying mid-step. A second signal stops at once (KeyboardInterrupt). Installed
    only in the main thread (the one Python delivers signals to); the previous handlers come back on exit."""

    def __init__(self):
        self.received, self.previous = None, {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        if world()[0] == 0:
            print(f"\n{self.received}: stopping after this step, once its checkpoint is written (a second one "
                  f"stops at once, without it)", file=sys.stderr, flush=True)

    def requested(self, device: torch.device) -> bool:
        """Whether this process, or any other, got a signal: every rank stops after the same step."""
        if world()[1] == 1:
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def _micro_step(stage: Stage, engine, recipe: Recipe, run_dir: RunDir, step: int, indices: list[int],
                window: dict[str, float]) -> tuple[bool, int]:
    """Forward, backward and (at an accumulation boundary) the update on one micro-batch; its terms are added to
    `window`. Returns whether the optimizer stepped, and the batch's tokens over all processes."""
    batch = collate_rows(stage.dataset, indices, stage.collate)
    # Pinned host memory makes the copy to a GPU asynchronous; on the CPU both are no-ops.
    pin = engine.device.type == "cuda"
    batch = {k: (v.pin_memory() if pin else v).to(engine.device, non_blocking=True) for k, v in batch.items()}
    terms = engine(batch)
    loss = weighted_sum(terms, stage.weights)
    if not torch.isfinite(loss):
        raise _non_finite(stage, recipe, run_dir, step, loss, terms, batch)
    boundary = engine.is_gradient_accumulation_boundary()
    engine.backward(loss)
    engine.step()
    for name, value in terms.items():
        window[name] = window.get(name, 0.0) + value.item() / recipe.grad_accum
    return boundary, int(batch["attention_mask"].sum()) * world()[1]


def _non_finite(stage: Stage, recipe: Recipe, run_dir: RunDir, step: int, loss: Tensor, terms: dict,
                batch: dict[str, Tensor]) -> TrainingError:
    """The one line for a NaN/inf loss: which terms, whether the teacher's outputs on this batch were already
    non-finite (then the teacher is the problem, and a lower learning_rate cannot help), where the run can go on."""
    last = run_dir.latest_checkpoint()
    bad = [k for k, v in terms.items() if not torch.isfinite(v)]
    teacher = getattr(stage.module, "teacher", None)  # None when fine-tuning
    broken = _teacher_non_finite(teacher, batch) if teacher is not None else None
    if broken:
        advice = (f"the teacher's outputs on this batch were already non-finite ({broken}), so the student cannot "
                  f"learn from them: check the teacher's weights (tinybert info TEACHER; re-export it)"
                  + (" or run it in precision=fp32" if recipe.precision != "fp32" else ""))
    else:
        who = "the teacher's outputs are finite, so the student" if teacher is not None else "the model"
        advice = (f"{who} diverged: start again (--overwrite, or another --output; --resume keeps the learning "
                  f"rate) with a lower learning_rate" + (" or precision=fp32" if recipe.precision != "fp32" else ""))
    return TrainingError(
        f"stage {stage.name}: loss is {loss.item()} at step {step + 1} (non-finite in {', '.join(bad) or 'the sum'}: "
        f"{', '.join(f'{k}={v.item():.4g}' for k, v in terms.items())}); "
        f"{'the last checkpoint ' + last.name + ' is intact' if last else 'no checkpoint was written'}; {advice}"
    )


@torch.no_grad()
def _teacher_non_finite(teacher: nn.Module, batch: dict[str, Tensor]) -> str | None:
    """Where the teacher's outputs on `batch` are NaN or infinite (its cached logits, a hidden state, a layer's
    attention scores, its logits), or None."""
    if "teacher_logits" in batch and not torch.isfinite(batch["teacher_logits"]).all():
        return "its cached logits"
    layers = set(range(1, teacher.config.num_hidden_layers + 1))
    out = teacher(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), score_layers=layers)
    where = [("its embeddings" if i == 0 else f"its hidden state {i}", h) for i, h in enumerate(out.hidden_states)]
    where += [(f"its layer {i} attention scores", s) for i, s in sorted(out.attention_scores.items())]
    where.append(("its logits", out.logits))
    return next((name for name, t in where if t is not None and not torch.isfinite(t).all()), None)


@torch.no_grad()
def average_terms(module: nn.Module, dataset, batch_size: int, collate, device, precision: str,
                  weights: dict[str, float]) -> dict[str, float]:
    """Held-out loss terms, averaged over examples (in batches of batch_size, in order), in eval mode."""
    module.eval()
    sums = {}
    for start in range(0, len(dataset), batch_size):
        indices = list(range(start, min(start + batch_size, len(dataset))))
        batch = {k: v.to(device) for k, v in collate_rows(dataset, indices, collate).items()}
        with autocast(device, precision):
            terms = module(batch)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.item() * len(indices)
    means = {name: total / max(len(dataset), 1) for name, total in sums.items()}
    return means | {"loss": weighted_sum(means, weights)}


def collate_rows(dataset, indices: list[int], collate: Callable[[list[dict]], dict[str, Tensor]]) -> dict[str, Tensor]:
    """The batch of `dataset`'s rows at `indices` (read in one slice, as columns), through `collate`."""
    rows = dataset[indices]
    return collate([dict(zip(rows, values)) for values in zip(*rows.values())])


def weighted_sum(terms: dict, weights: dict[str, float]):
    """The loss: each term times its weight (1 when the recipe gives none)."""
    return sum(weights.get(name, 1.0) * value for name, value in terms.items())
