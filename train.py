"""Write facts into a LoRA adapter and measure how well it remembers them: the main job.

    python train.py                                    # small PhoneBook run on the built-in model
    python train.py --data myfacts.jsonl --until-recalled --merge-to merged/   # your own facts, certified
    python train.py --data myfacts.jsonl --until-recalled --rank auto          # planned rank, doubled if need be
    python train.py --task longctx --length 200 --noise 1.0 --rank 8 --method sw
    python train.py --model DIR --task phonebook --length 60 --rank 4 --targets q_proj,v_proj --method ot --steps 30
    python train.py --ranks 1,2,4,8 --lengths 50,100,200 --task longctx     # a resumable grid sweep
    torchrun --nproc_per_node 2 train.py ...                               # data parallel, FSDP2 over 2 processes

Each run writes <out>/<name>.json (results, with a per-step history and the settings that produced
them) and <out>/<name>/ (the adapter, with the prompt format training used). A killed run started
again with the same command resumes from <out>/<name>.ckpt/. A finished run is reused only when
every setting that changes its numbers matches; otherwise the run stops and names the settings that
differ. With --data the task follows the file's keys: {"query", "target"[, "system"]} lines are your
own facts (task facts, preset standard, the run named after the file and a hash of its content).

Reading order: `train_step` (one micro-batch, top to bottom), then `train` (the loop) and `run` (one
run, from data and model to results file). `Processes` is the data-parallel layer around the step;
in one process it hands every batch back unchanged.
"""

import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from convert import ConvertError, resolve_model_dir
from data import SYSTEM, DataError, Example, facts, file_sha256, jsonl_task, load_tokenizer, make_task, read_facts
from eval import (CERTIFICATE, LN2, PrefixCache, answer_losses, certify, evaluate, print_certificate, sampled_recall,
                  teacher_forced)
from lora import (PRESETS, TARGETS, LoraError, adapted_width, adapter_config, adapter_disabled, add_lora, atomic_dir,
                  load_adapter, lora_parameters, merge, save_adapter, unwrapped_state_dict)
from memft import (SlidingState, anchor_positions, curriculum_boundaries, curriculum_size, method_weights,
                   paper_schedule, weighted_loss)
from model import ModelArgs, ModelError, default_device_dtype, load_model, read_config

SCHEMA = 2  # 2: results carry `settings` and `processes`


@dataclass
class Config:
    model: str = "default"
    task: str | None = None  # None -> from --data's keys (query/target: facts), else phonebook
    length: int | None = None  # None -> 100; facts and PhoneBook files take theirs from the file
    noise: float | None = None
    data: str | None = None
    text: str | None = None
    samples: int = 100
    rank: int | str = 8  # "auto" (with until_recalled): from the planner, doubled until every fact is recalled
    preset: str | None = None  # None -> standard for facts (PEFT loads it, it merges), paper otherwise
    targets: str | None = None  # comma list; None -> the preset's
    layers: str | None = None  # comma list; None -> preset ('paper': 2/3 depth) or all
    alpha: float | None = None
    dropout: float | None = None
    method: str = "sft"
    sw_flavour: str | None = None  # window | curriculum; None -> from the task
    ot_fallback: str = "sft"
    lr: float = 1e-2
    epochs: int | None = 200  # the paper's PhoneBook budget
    steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    seed: int = 0  # training: adapter init, dropout and batch order
    data_seed: int | None = None  # names, numbers, random text; None -> seed
    schedule: str = "linear"  # lr: linear decay to 0, or constant
    paper_schedule: str | None = None  # qwen | llama: the authors' PhoneBook lr, batch, accumulation, epochs
    snapshots: str | None = None  # comma list of steps at which to evaluate inside the run
    out: str = "runs"
    name: str | None = None
    merge_to: str | None = None  # after training: a Hugging Face folder with the adapter folded into the weights
    overwrite: bool = False
    save_every: int = 0  # 0 -> about 10 checkpoints per run
    activation_checkpointing: bool = False
    compile: bool = False
    stop_when_memorized: bool = False
    until_recalled: bool = False  # facts: stop once memorized, confirm with the decoder, write certificate.json
    max_rank: int | None = None  # --rank auto's cap (None -> MAX_RANK); never above the targets' width
    plan_from: str | None = None  # --rank auto: results files the planner reads (None -> PLAN_FROM)
    stop_at_plateau: float | None = None  # relative change of the training loss that counts as a plateau
    eval_every: int = 10
    prefix_cache_mb: float = 4096
    decode: bool = True
    sample_recall: int = 0  # K sampled decodes per example after training (0: off)
    temperature: float = 1.0
    top_p: float = 1.0
    dtype: str | None = None
    device: str | None = None

    def settled(self) -> "Config":
        """These settings with what follows from the others filled in: the task, its preset and length."""
        task = self.task or (jsonl_task(self.data) if self.data else "phonebook")
        preset = self.preset or ("standard" if task == "facts" else "paper")
        length = self.length if self.length is not None or self.length_from_file(task) else 100
        memorized = self.stop_when_memorized or self.until_recalled  # recalled implies memorized
        return replace(self, task=task, preset=preset, length=length, stop_when_memorized=memorized)

    def length_from_file(self, task: str) -> bool:
        return task == "facts" or (task == "phonebook" and self.data is not None)

    def run_name(self) -> str:
        if self.name:
            return self.name
        c = self.settled()
        data = "" if c.data_seed in (None, c.seed) else f"-d{c.data_seed}"
        sched = f"-{c.paper_schedule}" if c.paper_schedule else "-const" if c.schedule == "constant" else ""
        tail = f"-r{c.rank}-{c.method}{sched}-s{c.seed}{data}"
        source = f"{Path(c.data).stem}-{file_sha256(c.data)[:6]}" if c.data else ""  # another content, another run
        if c.task == "facts":
            return source + tail
        rho = (0.0 if c.data else 1.0) if c.noise is None else c.noise  # as make_task reads it
        noise = "" if c.task != "longctx" else f"-n{rho:g}"
        length = "" if c.length is None or c.task == "linear" else f"-L{c.length}"  # the rule sets its own
        return f"{c.task}{noise}{length}{'-' + source if source else ''}{tail}"

    @property
    def seed_of_data(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    def snapshot_steps(self) -> list[int]:
        return sorted({int(x) for x in self.snapshots.split(",")}) if self.snapshots else []


class RunError(Exception):
    """Bad settings for a run, or a run that cannot go on, worded for the user."""


class RunInterrupted(RunError):
    """Ctrl-C: the run stopped between two steps after saving a checkpoint."""


# ----------------------------------------------------------------------------- settings

# Settings that change only speed, memory, where files go or how often they are written. Every
# other setting changes the numbers, so a finished run or a checkpoint is reused only when all of
# those match (`identity`).
# --until-recalled changes a run only through --stop-when-memorized, which it sets; --rank auto's options choose
# which runs to make, and each of those runs is named and identified by its own rank.
NOT_IDENTITY = ("out", "name", "overwrite", "save_every", "prefix_cache_mb", "activation_checkpointing", "compile",
                "merge_to", "until_recalled", "max_rank", "plan_from")
MAX_RANK = 64  # --rank auto's default cap
PLAN_FROM = "results/**/*.json"  # --rank auto: the results files the planner reads by default


def identity(cfg: Config, processes: int) -> dict:
    """Everything that determines a run's numbers: the settled settings, the number of processes and
    the data file's content (an edited file is other data under the same name)."""
    data = {"data_sha256": file_sha256(cfg.data)} if cfg.data else {}
    return {k: v for k, v in asdict(cfg).items() if k not in NOT_IDENTITY} | {"processes": processes} | data


def differences(saved: dict, wanted: dict) -> list[str]:
    """'key saved -> wanted' for every setting that differs."""
    missing = object()
    keys = sorted(set(saved) | set(wanted))
    return [f"{k} {saved.get(k)!r} -> {wanted.get(k)!r}" for k in keys
            if saved.get(k, missing) != wanted.get(k, missing)]


def refuse_other_settings(saved: dict | None, wanted: dict, path: Path) -> None:
    """One check for finished results and checkpoints alike: reuse only what the same settings made."""
    way_out = "rerun with --overwrite to replace it, or choose another --name"
    if saved is None:
        raise RunError(f"{path} does not record its settings (an older format); {way_out}")
    diff = differences(saved, wanted)
    if diff:
        raise RunError(f"{path} holds a run with other settings ({'; '.join(diff)}); {way_out}")


def check(cfg: Config) -> None:
    """Reject impossible settings before anything is loaded or written."""
    check_until_recalled(cfg)
    positive = dict(rank=None if cfg.rank == "auto" else cfg.rank, max_rank=cfg.max_rank, batch_size=cfg.batch_size,
                    grad_accum=cfg.grad_accum, samples=cfg.samples, epochs=cfg.epochs, eval_every=cfg.eval_every,
                    length=cfg.length)
    for k, v in positive.items():
        if v is not None and v <= 0:
            raise RunError(f"--{k.replace('_', '-')} must be a positive integer, got {v}")
    at_least_zero = dict(steps=cfg.steps, save_every=cfg.save_every, sample_recall=cfg.sample_recall, seed=cfg.seed,
                         data_seed=cfg.data_seed)
    for k, v in at_least_zero.items():  # 0 steps: evaluate the untrained adapter (ΔL = 0)
        if v is not None and v < 0:
            raise RunError(f"--{k.replace('_', '-')} must be 0 or more, got {v}")
    # Each number's allowed values; nan fails every comparison, so it is refused with the rest.
    numbers = dict(lr=(cfg.lr, lambda v: 0 < v < math.inf, "a finite number above 0"),
                   alpha=(cfg.alpha, lambda v: 0 < v < math.inf, "a finite number above 0"),
                   stop_at_plateau=(cfg.stop_at_plateau, lambda v: 0 < v < math.inf, "a finite number above 0"),
                   temperature=(cfg.temperature, lambda v: 0 <= v < math.inf, "a finite number, 0 or more"),
                   prefix_cache_mb=(cfg.prefix_cache_mb, lambda v: 0 <= v < math.inf, "a finite number, 0 or more"),
                   noise=(cfg.noise, lambda v: 0 <= v <= 1, "in [0, 1]"),
                   dropout=(cfg.dropout, lambda v: 0 <= v < 1, "in [0, 1)"),
                   top_p=(cfg.top_p, lambda v: 0 < v <= 1, "in (0, 1]"))
    for k, (v, ok, words) in numbers.items():
        if v is not None and not ok(v):
            raise RunError(f"--{k.replace('_', '-')} must be {words}, got {v}")
    choices = dict(task=(cfg.task, (None, "phonebook", "longctx", "linear", "facts")),
                   method=(cfg.method, ("sft", "ot", "sw")),
                   preset=(cfg.preset, (None, *PRESETS)), ot_fallback=(cfg.ot_fallback, ("sft", "skip")),
                   sw_flavour=(cfg.sw_flavour, (None, "window", "curriculum")),
                   schedule=(cfg.schedule, ("linear", "constant")), paper_schedule=(cfg.paper_schedule, (None, "qwen", "llama")))
    for k, (v, allowed) in choices.items():
        if v not in allowed:
            raise RunError(f"unknown --{k.replace('_', '-')} {v!r}; choose {', '.join(a for a in allowed if a)}")
    try:
        steps = cfg.snapshot_steps()
    except ValueError:
        raise RunError(f"--snapshots takes comma-separated step numbers, got {cfg.snapshots!r}") from None
    if any(x <= 0 for x in steps):
        raise RunError(f"--snapshots steps must be positive, got {cfg.snapshots!r}")
    for t in [] if cfg.targets is None else [t.strip() for t in cfg.targets.split(",")]:  # "" is refused too
        if t not in TARGETS:
            raise RunError(f"unknown LoRA target {t!r}; choose from {', '.join(TARGETS)}")
    if cfg.layers:
        try:
            [int(x) for x in cfg.layers.split(",")]
        except ValueError:
            raise RunError(f"--layers takes comma-separated integers, got {cfg.layers!r}") from None
    try:
        default_device_dtype(cfg.device or "cpu", cfg.dtype)
    except ModelError as e:
        raise RunError(str(e)) from None
    except RuntimeError:
        raise RunError(f"unknown --device {cfg.device!r}; use cpu, cuda or cuda:N") from None
    for f in (cfg.data, cfg.text):
        if f is not None and not Path(f).is_file():
            raise RunError(f"file not found: {f}")
    check_data(cfg)
    if cfg.merge_to:
        check_merge_to(cfg.settled())


def check_until_recalled(cfg: Config) -> None:
    """--until-recalled and --rank auto: the combinations that make sense, checked before anything loads."""
    auto = cfg.rank == "auto"
    if not isinstance(cfg.rank, int) and not auto:
        raise RunError(f"--rank must be a positive integer or auto, got {cfg.rank!r}")
    if auto and not cfg.until_recalled:
        raise RunError("--rank auto grows the rank until every fact is recalled; add --until-recalled")
    for flag, value in (("--max-rank", cfg.max_rank), ("--plan-from", cfg.plan_from)):
        if value is not None and not auto:
            raise RunError(f"{flag} applies to --rank auto only; drop it or use --rank auto --until-recalled")
    if cfg.plan_from is not None and not cfg.plan_from.strip():
        raise RunError("--plan-from takes a glob of results files, e.g. 'results/**/*.json'")
    if cfg.until_recalled and not cfg.decode:
        raise RunError("--until-recalled confirms recall with the decoder; drop --no-decode")


def check_data(cfg: Config) -> None:
    """The task --data names, and every line of a facts file, checked before the tokenizer loads."""
    c = cfg.settled()  # reads --data's keys: a malformed file stops here, with its line
    if c.paper_schedule and c.task != "phonebook":
        raise RunError("--paper-schedule holds the authors' PhoneBook tables; use it with --task phonebook")
    if c.task == "facts" and c.data is None:
        raise RunError('--task facts needs --data FILE, a jsonl of {"query": ..., "target": ...} lines')
    if c.until_recalled and c.task != "facts":
        raise RunError(f"--until-recalled certifies your own facts: give --data FILE of {{\"query\", \"target\"}} "
                       f"lines (this is task {c.task})")
    if c.length_from_file(c.task):
        if cfg.length is not None:
            raise RunError(f"--length does not apply to --data {c.data} (task {c.task}): the file's targets set the "
                           f"answer length; drop --length")
        read_facts(c.data)


MERGED_MARK = "merged_from.json"  # names the run a merged folder came from; only such folders are replaced


def check_merge_to(cfg: Config) -> None:
    if "mlp" in target_list(cfg.targets, PRESETS[cfg.preset]["targets"]):
        raise RunError("--merge-to needs linear targets: the paper's whole-MLP probe (target mlp, the paper preset) "
                       "cannot be folded into the base weights; use --preset standard (q_proj,v_proj), which merges "
                       "and exports to PEFT")
    out = Path(cfg.merge_to)
    if out.resolve() == RunFiles(Path(cfg.out), cfg.run_name()).adapter.resolve():
        raise RunError(f"--merge-to {out} is where this run's adapter goes; choose another folder")
    if out.exists() and not (out / MERGED_MARK).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"--merge-to {out} exists and is not a merged model written by train.py; choose a new folder")


def target_list(targets: str | None, default: tuple) -> tuple:
    """--targets as a tuple of module names, or `default` (the preset's) when not given."""
    return tuple(t.strip() for t in targets.split(",")) if targets else tuple(default)


def resolve_lora(cfg: Config, n_layers: int) -> dict:
    p = PRESETS[cfg.preset]
    targets = target_list(cfg.targets, p["targets"])
    if cfg.layers:
        layers = [int(x) for x in cfg.layers.split(",")]
    else:  # the paper probes one layer at about two-thirds depth (20 of 30, 24 of 36, ...)
        layers = [round(n_layers * 2 / 3)] if cfg.preset == "paper" else None
    dropout = p["dropout"] if cfg.dropout is None else cfg.dropout
    return dict(targets=targets, layers=layers, alpha=cfg.alpha, dropout=dropout, init=p["init"])


def resolve_method(cfg: Config) -> str:
    """sft | ot | sw_window | sw_curriculum (MemFT-SW's flavour follows the task unless given)."""
    if cfg.method != "sw":
        return cfg.method
    return f"sw_{cfg.sw_flavour or ('window' if cfg.task == 'longctx' else 'curriculum')}"


def schedule(n: int, cfg: Config, method: str, length: int,
             boundaries: list[int] | None = None) -> list[list[list[int]]]:
    """Every optimizer step's micro-batches (lists of example indices), fixed by the seed up front.

    Plain methods reshuffle each epoch. MemFT-SW's curriculum shuffles once and trains the first
    `curriculum_size` samples in fixed batches, so later stages append batches and keep old ones.
    """
    B = min(cfg.batch_size, n)
    rng = random.Random(cfg.seed)
    order = list(range(n))
    rng.shuffle(order)
    bounds = boundaries or curriculum_boundaries(length)
    batches, epoch = [], 0
    per_step = cfg.grad_accum
    while True:
        if method == "sw_curriculum":
            active = order[: curriculum_size(n, B, epoch, bounds)]
        else:
            active = order[:]
            random.Random(cfg.seed * 100003 + epoch).shuffle(active)
        batches += [active[i : i + B] for i in range(0, len(active), B)]
        epoch += 1
        n_steps = len(batches) // per_step
        if cfg.steps is not None and n_steps >= cfg.steps:
            break
        if cfg.steps is None and epoch >= (cfg.epochs or 1):
            break
    total = cfg.steps if cfg.steps is not None else max(1, math.ceil(len(batches) / per_step))
    batches += batches[: max(0, total * per_step - len(batches))]  # pad the last step if needed
    return [batches[s * per_step : (s + 1) * per_step] for s in range(total)]


def learning_rate(cfg: Config, step: int, total: int) -> float:
    """AdamW's lr at `step` of `total`: constant, or linear decay to 0 (the paper), no warmup either way."""
    return cfg.lr if cfg.schedule == "constant" else cfg.lr * (1 - step / total)


def with_paper_schedule(cfg: Config, method: str, length: int) -> tuple[Config, list[int] | None]:
    """The authors' PhoneBook lr, batch, accumulation and epochs for this length (with --paper-schedule)."""
    if not cfg.paper_schedule:
        return cfg, None
    p = paper_schedule(cfg.paper_schedule, method, length)
    return replace(cfg, lr=p["lr"], batch_size=p["batch_size"], grad_accum=p["grad_accum"], epochs=p["epochs"]), \
        p["boundaries"]


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------- one training step


@dataclass
class MemState:
    """What training carries from step to step, per sample id: MemFT-SW's window (anchor, how
    long it stayed, expansion E) and whether the sample's last teacher-forced pass was exact."""

    sliding: SlidingState = field(default_factory=SlidingState)
    exact: dict[int, bool] = field(default_factory=dict)

    def state_dict(self) -> dict:
        return dict(sliding=self.sliding.state_dict(), exact={str(k): v for k, v in self.exact.items()})

    def load_state_dict(self, state: dict) -> None:
        self.sliding.load_state_dict(state["sliding"])
        self.exact = {int(k): v for k, v in state["exact"].items()}


def answer_rows(batch: list[Example], width: int, *flat: torch.Tensor) -> list[torch.Tensor]:
    """Flat per-answer-token values (N,) -> zero-padded rows (B, width), one row per example."""
    mask = answer_mask(batch, width).to(flat[0].device)
    rows = []
    for x in flat:
        r = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        r[mask] = x
        rows.append(r)
    return rows


def answer_mask(batch: list[Example], width: int) -> torch.Tensor:
    """(B, width) bool: True on each example's answer tokens."""
    lens = torch.tensor([len(e.answer) for e in batch])
    return torch.arange(width)[None] < lens[:, None]


def memft_weights(method: str, ot_fallback: str, batch: list[Example], losses: torch.Tensor, mask: torch.Tensor,
                  wrong: torch.Tensor, state: MemState) -> tuple[torch.Tensor, dict]:
    """MemFT token weights (B, A) for a whole micro-batch; records each sample's window and exactness."""
    E = 1.0
    if method == "sw_window":  # the window's expansion depends on how long each sample's anchor stayed put
        E = state.sliding.update([e.id for e in batch], anchor_positions(mask, wrong)).to(losses.device)
    w, info = method_weights(method, losses, mask, wrong, E, ot_fallback=ot_fallback)
    for e, exact in zip(batch, (~wrong | ~mask).all(dim=1).tolist()):
        state.exact[e.id] = exact
    return w, info


def train_step(model: torch.nn.Module, batch: list[Example], method: str, ot_fallback: str, pad: int,
               prefix: PrefixCache | None, state: MemState, n_micro: int = 1,
               procs: "Processes | None" = None) -> dict:
    """One micro-batch, top to bottom: forward, per-token loss, MemFT weights, backward.

    Adds this micro-batch's share of the gradient to the LoRA weights' .grad and returns its
    tallies. In one process, with no prefix cache, it is the plain step: `share`, `gather` and
    `mine` hand back the whole batch, and `replicated_scale` is 1. With several processes each runs
    its share of the batch, and `procs.gather` hands every process the whole batch's token losses:
    the weights, and the state they update, are then exactly the single-process ones, computed alike
    on every process (tests/test_scale.py). The prefix cache is a fast path with the same numbers.
    """
    procs = procs or Processes()
    width = max(len(e.answer) for e in batch)                         # A: the longest answer
    mine = procs.share(batch)
    loss_t, pred, y = answer_losses(model, mine, pad, prefix)          # (N,) per answer token, with grad
    losses, wrong = answer_rows(mine, width, loss_t.detach(), pred != y)  # (b, A) this process's rows
    losses, wrong = procs.gather(batch, losses, wrong)                # (B, A) the whole micro-batch
    mask = answer_mask(batch, width).to(losses.device)
    w, info = memft_weights(method, ot_fallback, batch, losses, mask, wrong, state)
    norm = w[mask].sum()                                               # Σw over the whole micro-batch
    my_w = procs.mine(w)                                               # (b, A) this process's rows
    loss = weighted_loss(loss_t, my_w[answer_mask(mine, width).to(w.device)], norm)
    if not info["skipped"]:  # the same on every process: it was decided on the whole batch
        (loss * procs.replicated_scale(len(batch)) / n_micro).backward()
    return dict(loss=float((w * losses)[mask].sum() / norm.clamp(min=1e-8)) / n_micro,
                ce_sum=float(losses[mask].sum()), n_tok=int(mask.sum()), n_sub=info["n_sub"],
                skipped=info["skipped"], max_ce=float(losses[mask].max()))


# ----------------------------------------------------------------------------- data parallelism


@dataclass
class Processes:
    """Data parallelism over torchrun's processes. With one process every method is the identity.

    Every collective a run uses lives here, and each one runs on every process, in the same order,
    whatever that process's data: a process that skipped one would leave the others waiting.
    """

    rank: int = 0
    world: int = 1

    @classmethod
    def start(cls) -> "Processes":
        """Join torchrun's process group when launched with several processes."""
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), world)

    def split(self, n: int) -> bool:
        """A batch of n is split over the processes when each gets a sample; else each runs it all."""
        return self.world > 1 and n >= self.world

    def share(self, batch: list) -> list:
        return batch[self.rank :: self.world] if self.split(len(batch)) else batch

    def mine(self, rows: torch.Tensor) -> torch.Tensor:
        """This process's rows of a whole-batch tensor (B, ...)."""
        return rows[self.rank :: self.world] if self.split(len(rows)) else rows

    def replicated_scale(self, n: int) -> float:
        """1/world when every process runs the whole batch, so that the summed gradients count it once."""
        return 1.0 if self.world == 1 or self.split(n) else 1.0 / self.world

    def gather(self, batch: list, *rows: torch.Tensor) -> list[torch.Tensor]:
        """Each process's rows (b, A) -> the whole batch's (B, A), in batch order, on every process."""
        if not self.split(len(batch)):
            return list(rows)
        import torch.distributed as dist

        B, per = len(batch), math.ceil(len(batch) / self.world)  # shares differ by at most one row
        stacked = torch.stack([r.float() for r in rows], dim=-1)  # (b, A, k)
        buf = stacked.new_zeros((per,) + stacked.shape[1:])
        buf[: len(stacked)] = stacked
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        whole = stacked.new_zeros((B,) + stacked.shape[1:])
        for r, part in enumerate(parts):
            n = len(range(r, B, self.world))
            whole[r :: self.world] = part[:n]
        return [whole[..., i].to(x.dtype) for i, x in enumerate(rows)]

    def sum_grads(self, params: list) -> None:
        """LoRA weights are replicated, not sharded: add up their gradients by hand."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def any(self, flag: bool) -> bool:
        """True on every process if it is True on any (e.g. Ctrl-C reached only some of them)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([float(flag)], device=self.device())
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def all_same(self, ok: bool) -> bool:
        """Whether `ok` holds on every process."""
        return not self.any(not ok)

    def gather_tensor(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every process's copy of a same-shaped tensor, e.g. its RNG state (for checkpoints)."""
        if self.world == 1:
            return [t]
        import torch.distributed as dist

        t = t.to(self.device())
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t)
        return [p.cpu() for p in parts]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def device(self) -> torch.device:
        """Where collectives' tensors live: the GPU under nccl, the CPU under gloo."""
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def shard(model: torch.nn.Module, world: int) -> None:
    """FSDP2: shard each decoder layer's frozen weights over the processes. LoRA weights stay whole on every process (they are tiny, fp32, and their
    gradients are summed by hand), and so do embeddings, final norm and head, which the chunked loss
    reads outside forward. Sharding those as FSDP's root would not lower peak memory: FSDP2 keeps
    the root's weights gathered from forward through backward, and a frozen base has no root
    gradients or optimizer state to shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(model.lm_head.weight.device.type, (world,))
    lora = set(lora_parameters(model))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, ignored_params=lora & set(block.parameters()))


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """CPU runs: let freed activation buffers go back to the OS at once (glibc; a no-op elsewhere).

    glibc serves big allocations with mmap and unmaps them on free, but each free raises that
    threshold (up to 32 MiB), after which activations come from its own heap, which it keeps: at
    4096 answer tokens that left about 2 GB of freed memory resident. Fixing the threshold turns the
    adjustment off. Returns whether it was set.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return libc.mallopt(-3, threshold) == 1  # -3 = M_MMAP_THRESHOLD


# ----------------------------------------------------------------------------- files


@dataclass
class RunFiles:
    """Where one run's files go: results, adapter, checkpoint and lock."""

    out: Path
    name: str

    @property
    def result(self) -> Path:
        return self.out / f"{self.name}.json"

    @property
    def adapter(self) -> Path:
        return self.out / self.name

    @property
    def ckpt(self) -> Path:
        return self.out / f"{self.name}.ckpt"

    @property
    def lock(self) -> Path:
        return self.out / f"{self.name}.lock"

    def check_writable(self) -> None:
        """Fail before anything is loaded, not after hours of training."""
        probe = self.out / f".{self.name}.write-test-{os.getpid()}"
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise RunError(f"cannot write to --out {self.out} ({e.strerror or e}); choose a writable folder") from None

    def remove_all(self) -> None:
        """--overwrite: the old results, adapter and checkpoint go before the new run starts."""
        import shutil

        self.result.unlink(missing_ok=True)
        for d in (self.adapter, self.ckpt, self.ckpt.with_name(self.ckpt.name + ".old")):
            shutil.rmtree(d, ignore_errors=True)


class RunLock:
    """One launch at a time per run: an exclusive flock on <out>/<name>.lock, which holds the owner's pid."""

    def __init__(self, path: Path) -> None:
        self.path, self.fh = path, None

    def acquire(self) -> None:
        import fcntl

        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            owner = fh.read().strip() or "unknown"
            fh.close()
            raise RunError(f"this run is already running in process {owner} (lock {self.path}); wait for it "
                           f"to finish, or choose another --name") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self.fh = fh

    def release(self) -> None:
        if self.fh is not None:
            self.path.unlink(missing_ok=True)
            self.fh.close()
            self.fh = None


def atomic_json(path: Path, obj: dict | list) -> None:
    """Write via a temporary file and a rename; a failed write leaves neither a half file nor the temporary."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def rng_states() -> torch.Tensor:
    """This process's RNG state (CPU, then CUDA when present) as one uint8 tensor."""
    states = [torch.get_rng_state()]
    if torch.cuda.is_available():
        states.append(torch.cuda.get_rng_state())
    return torch.cat(states)


def set_rng_states(t: torch.Tensor) -> None:
    n = torch.get_rng_state().numel()
    torch.set_rng_state(t[:n].clone())
    if torch.cuda.is_available() and t.numel() > n:
        torch.cuda.set_rng_state(t[n:].clone())


def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict,
                    procs: "Processes") -> None:
    """LoRA weights, AdamW moments and every process's RNG in safetensors; the rest in JSON. Never pickled.

    Called on every process (each contributes its RNG state); process 0 writes.
    """
    from safetensors.torch import save_file

    rngs = procs.gather_tensor(rng_states())
    if procs.rank != 0:
        return
    params = lora_parameters(model)
    tensors = {f"p{i}": p.detach().cpu() for i, p in enumerate(params)}
    steps = {}
    for i, p in enumerate(params):
        s = opt.state.get(p)
        if s:
            tensors[f"m{i}"], tensors[f"v{i}"] = s["exp_avg"].cpu(), s["exp_avg_sq"].cpu()
            steps[i] = float(s["step"])
    for r, t in enumerate(rngs):
        tensors[f"rng{r}"] = t

    def write(d: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "state.safetensors"))
        (d / "state.json").write_text(json.dumps({**state, "adam_steps": steps}))

    atomic_dir(path, write)


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, procs: "Processes") -> dict:
    """Restore LoRA weights, AdamW moments and this process's own RNG state; returns the JSON state."""
    from safetensors.torch import load_file

    t = load_file(str(path / "state.safetensors"))
    state = json.loads((path / "state.json").read_text())
    params = lora_parameters(model)
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(t[f"p{i}"])
    for i, s in state.pop("adam_steps").items():
        p = params[int(i)]
        opt.state[p] = {"step": torch.tensor(s), "exp_avg": t[f"m{i}"].to(p.device),
                        "exp_avg_sq": t[f"v{i}"].to(p.device)}
    set_rng_states(t[f"rng{procs.rank}"])
    return state


def find_checkpoint(ckpt: Path) -> dict | None:
    """The checkpoint's JSON state, recovering from a kill between the two renames of a save."""
    old = ckpt.with_name(ckpt.name + ".old")  # such a kill leaves only this one
    if not (ckpt / "state.json").exists() and (old / "state.json").exists():
        os.replace(old, ckpt)
    f = ckpt / "state.json"
    return json.loads(f.read_text()) if f.exists() else None


# ----------------------------------------------------------------------------- Ctrl-C


class StopRequest:
    """The first Ctrl-C asks the run to stop after the current step (with a checkpoint); a second one stops it at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def __enter__(self) -> "StopRequest":
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self.previous = None
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step (press again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> bool:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


# ----------------------------------------------------------------------------- the run


@dataclass
class Trainer:
    """Everything one run's training loop needs."""

    cfg: Config
    model: torch.nn.Module
    examples: list[Example]
    loss_init: list[torch.Tensor]
    plan: list[list[list[int]]]
    method: str
    pad: int
    prefix: PrefixCache | None
    procs: Processes
    files: RunFiles
    settings: dict


def train(t: Trainer) -> dict:
    """The loop: resume if a checkpoint exists, then one optimizer step per planned step. Returns the training record."""
    cfg, model, procs = t.cfg, t.model, t.procs
    say = print if procs.rank == 0 else (lambda *a, **k: None)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    state = MemState()
    total = len(t.plan)
    step, history, elapsed, stopped_at, saved_at, reason, snaps = 0, [], 0.0, None, None, None, []
    saved = find_checkpoint(t.files.ckpt)
    if saved is not None:
        refuse_other_settings(saved.get("settings"), t.settings, t.files.ckpt)
        st = load_checkpoint(t.files.ckpt, model, opt, procs)
        step, history, elapsed, stopped_at = st["step"], st["history"], st["elapsed"], st["stopped_at"]
        reason, snaps = st["stop_reason"], st["snapshots"]
        state.load_state_dict(st["memft"])
        saved_at = step
        say(f"resuming {t.files.name} from step {step}/{total}")
    save_every = cfg.save_every or max(1, total // 10)
    snap_at = set(cfg.snapshot_steps())

    def checkpoint(now: float) -> None:
        save_checkpoint(t.files.ckpt, model, opt, dict(settings=t.settings, step=step, history=history,
                                                       elapsed=now - t0, stopped_at=stopped_at, stop_reason=reason,
                                                       snapshots=snaps, memft=state.state_dict()), procs)

    model.train()
    t0 = time.perf_counter() - elapsed
    t_loop, step0 = time.perf_counter(), step
    with StopRequest() as stop:
        while step < total and stopped_at is None:
            if cfg.stop_when_memorized and memorized(model, t.examples, t.pad, t.prefix, state, step, cfg.eval_every):
                stopped_at, reason = step, "memorized"
                break
            if cfg.stop_at_plateau and plateaued(history, step, cfg.eval_every, cfg.stop_at_plateau):
                stopped_at, reason = step, "plateau"
                break
            lr = learning_rate(cfg, step, total)
            for g in opt.param_groups:
                g["lr"] = lr
            micro = t.plan[step]
            rec = dict(loss=0.0, ce_sum=0.0, n_tok=0, n_sub=0, skipped=0, max_ce=0.0)
            for idx in micro:
                r = train_step(model, [t.examples[i] for i in idx], t.method, cfg.ot_fallback, t.pad, t.prefix,
                               state, len(micro), procs)
                rec = {k: max(rec[k], r[k]) if k == "max_ce" else rec[k] + r[k] for k in rec}
            procs.sum_grads(params)  # on every process, every step, even when nothing was trained
            if rec["skipped"] < len(micro):
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
            opt.zero_grad(set_to_none=True)
            if not (math.isfinite(rec["loss"]) and math.isfinite(rec["ce_sum"])):
                raise RunError(f"the loss became non-finite at step {step + 1} (lr {cfg.lr:g}); no result was "
                               f"written. Lower --lr and rerun with --overwrite")
            step += 1
            em = sum(state.exact.get(e.id, False) for e in t.examples) / len(t.examples)
            now = time.perf_counter()
            history.append(dict(step=step, loss=round(rec["loss"], 6), ce=round(rec["ce_sum"] / rec["n_tok"], 6),
                                max_ce=round(rec["max_ce"], 6), n_sub=rec["n_sub"], em=round(em, 4), lr=lr,
                                skipped=rec["skipped"] == len(micro), time_s=round(now - t0, 3)))
            if step in snap_at:  # the same measurements as the end of a run, minus the decoder check
                snaps.append(snapshot(model, t.examples, t.loss_init, t.pad, t.prefix, step))
            per_step = (now - t_loop) / (step - step0)
            if step == total or step % max(1, total // 20) == 0 or step - step0 <= 1:
                say(f"step {step}/{total} | loss {rec['loss']:.4f} | ce {rec['ce_sum'] / rec['n_tok']:.4f} | "
                    f"sub-threshold {rec['n_sub']}/{rec['n_tok']} | em(train) {em:.2f} | lr {lr:.2e} | "
                    f"{per_step:.2f}s/step | ETA {fmt_time(per_step * (total - step))}", flush=True)
            if procs.any(stop.requested):
                checkpoint(now)
                raise RunInterrupted(f"stopped at step {step}/{total}: checkpoint saved in {t.files.ckpt}; "
                                     f"run the same command to resume")
            if step % save_every == 0 and step < total:
                checkpoint(now)
                saved_at = step
    if saved_at != step or stopped_at is not None:  # evaluation can be interrupted too: keep the trained state
        checkpoint(time.perf_counter())
    return dict(steps=step, stopped_at=stopped_at, stop_reason=reason or "budget", snapshots=snaps, history=history,
                time_s=time.perf_counter() - t0)


def plateaued(history: list[dict], step: int, every: int, tol: float) -> bool:
    """Whether the training loss has stopped moving: checked every `every` steps, the mean CE over the
    last tenth of the steps so far (at least `every` steps) differs from the tenth before by under `tol`."""
    w = max(every, step // 10)
    if step == 0 or step % every or step < 2 * w:
        return False
    last = sum(h["ce"] for h in history[-w:]) / w
    before = sum(h["ce"] for h in history[-2 * w : -w]) / w
    return abs(before - last) < tol * abs(before)


SNAPSHOT_SAMPLE_KEYS = ("id", "delta_loss", "token_acc", "exact_match", "first_failure", "earliest_stubborn",
                        "stubborn_positions")


def snapshot(model: torch.nn.Module, ex: list[Example], loss_init: list[torch.Tensor], pad: int,
             prefix: PrefixCache | None, step: int) -> dict:
    """ΔL, token accuracy, exact match, stubborn tokens and first failure (teacher-forced) at `step`."""
    res = evaluate(model, ex, loss_init, pad, prefix, decode=False)
    per = [{k: s[k] for k in SNAPSHOT_SAMPLE_KEYS} for s in res["per_sample"]]
    return dict(step=step, **{k: v for k, v in res.items() if k not in ("per_sample", "sufficient_violations",
                                                                       "em_disagreements")}, per_sample=per)


def memorized(model: torch.nn.Module, ex: list[Example], pad: int, prefix: PrefixCache | None, state: MemState,
              step: int, every: int) -> bool:
    """Phase boundary: every answer token has p > 0.5 with dropout off (then greedy recall is exact).

    Checked every `every` steps, or at once when the last training pass saw every sample exact.
    The decision is the same on every process (the state is), so all of them run the check.
    """
    due = all(state.exact.get(e.id, False) for e in ex) or (step > 0 and step % every == 0)
    if not due:
        return False
    model.eval()
    tf = teacher_forced(model, ex, pad, prefix=prefix)
    model.train()
    return all(bool((loss < LN2).all()) for loss, _ in tf)


def start_run(cfg: Config, procs: Processes) -> tuple[RunFiles, dict, dict | None, RunLock | None]:
    """Claim the run before loading anything: (files, settings, a finished result to reuse or None, lock)."""
    files = RunFiles(Path(cfg.out), cfg.run_name())
    files.check_writable()
    settings = identity(cfg, procs.world)
    lock, error = None, None
    if procs.rank == 0:
        try:
            lock = RunLock(files.lock)
            lock.acquire()
            if cfg.overwrite:
                files.remove_all()
        except RunError as e:
            lock, error = None, e
    if not procs.all_same(error is None):  # a second launch of a running run: every process stops
        raise error or RunError("process 0 could not start this run (see its message)")
    procs.barrier()  # --overwrite's deletions are done before anyone looks for old results
    try:
        if files.result.exists():
            old = json.loads(files.result.read_text())
            refuse_other_settings(old.get("settings"), settings, files.result)
            return files, settings, old, lock
    except BaseException:
        lock and lock.release()
        raise
    return files, settings, None, lock


def main(cfg: Config) -> dict:
    """One run: settings -> data -> model and adapter -> training -> evaluation -> results file."""
    check(cfg)
    cfg = cfg.settled()
    method = resolve_method(cfg)
    procs = Processes.start()
    if cfg.compile and procs.world > 1:  # FSDP's per-layer hooks split the compiled graphs: slower, not faster
        raise RunError("--compile runs in a single process only; drop it under torchrun")
    files, settings, done, lock = start_run(cfg, procs)
    try:
        if done is not None:
            if procs.rank == 0:
                print(f"{files.result} exists with the same settings: run already done (--overwrite reruns it)")
            result = done
        else:
            result = run(cfg, method, procs, files, settings)
        if cfg.merge_to and procs.rank == 0:  # from the saved adapter, so a finished run can be merged later
            write_merged(cfg, files.adapter, Path(cfg.merge_to))
        return result
    finally:
        if lock is not None:
            lock.release()


def run(cfg: Config, method: str, procs: Processes, files: RunFiles, settings: dict) -> dict:
    """Data, model and adapter, L_init, the training loop, the evaluation and the results file."""
    t_start = time.perf_counter()
    folder = resolve_model_dir(cfg.model)  # once: a hub id is fetched (or found in the hub cache) here only
    tok = load_tokenizer(folder)  # data first: its errors come before the slow model load
    task = make_task(tok, cfg.task, cfg.length, cfg.noise, cfg.seed_of_data, cfg.data, cfg.text, cfg.samples)
    ex, pad = task.train, tok.pad_id
    cfg, boundaries = with_paper_schedule(cfg, method, task.length)
    torch.manual_seed(cfg.seed)  # the same adapter init on every process
    device = cfg.device
    if device is None and procs.world > 1 and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.current_device()}"
    if default_device_dtype(device)[0].type == "cpu":
        return_freed_memory()
    model = load_model(folder, dtype=cfg.dtype, device=device,
                       checkpoint_layers=cfg.activation_checkpointing, compile_layers=cfg.compile)
    lcfg = resolve_lora(cfg, model.args.n_layers)
    n_params = add_lora(model, cfg.rank, **lcfg)
    # Saved with the adapter: the base model and its real folder (for PEFT), the prompt format (for eval.py).
    adapter_info = dict(base_model=cfg.model, base_model_path=base_model_path(cfg.model, folder), prompt=dict(
        system=SYSTEM, systems=task.systems, chat_template_kwargs=dict(enable_thinking=False)))
    if cfg.data:  # what eval.py --certify measures again, refused when the file changed
        adapter_info["data"] = dict(path=str(Path(cfg.data).resolve()), sha256=file_sha256(cfg.data))
    layers = adapter_config(model)["layers"]
    prefix = PrefixCache(model, min(layers), cfg.prefix_cache_mb) if min(layers) > 0 else None
    if procs.world > 1:
        shard(model, procs.world)
        if prefix is not None and not prefix.fill(ex):  # processes must run layers in lockstep
            prefix = None

    with adapter_disabled(model):  # L_init: the frozen model's loss, computed once
        loss_init = [loss for loss, _ in teacher_forced(model, ex, pad, prefix=prefix)]
    plan = schedule(len(ex), cfg, method, task.length, boundaries)
    if procs.rank == 0:
        if method == "sw_curriculum" and len(ex) <= cfg.batch_size:
            print(f"note: {len(ex)} samples fit in one batch of {cfg.batch_size}, so the curriculum is active from "
                  f"the start: MemFT-SW here is MemFT-OT (skip fallback) in a fixed order")
        where = layers if len(layers) < 8 else "all"
        l_init = sum(float(x.sum()) for x in loss_init) / sum(len(x) for x in loss_init)
        print(f"{files.name}: {task.name}, {len(ex)} examples, ℓ = {task.length} answer tokens, rank {cfg.rank} "
              f"{','.join(lcfg['targets'])} @ layers {where}, {n_params:,} params, method {method}, "
              f"{len(plan)} steps, L_init = {l_init:.3f}" + (f", {procs.world} processes" if procs.world > 1 else ""))
    trained = train(Trainer(cfg, model, ex, loss_init, plan, method, pad, prefix, procs, files, settings))

    res = evaluate(model, ex, loss_init, pad, prefix, decode=cfg.decode)
    extra = {}
    if cfg.sample_recall:  # the p > 0.5 argument covers greedy decoding only; measure sampling too
        model.eval()
        rec = sampled_recall(model, ex, cfg.sample_recall, cfg.temperature, cfg.top_p, cfg.seed)
        extra["sampled_recall"] = dict(k=cfg.sample_recall, temperature=cfg.temperature, top_p=cfg.top_p,
                                       mean=sum(rec) / len(rec), per_sample=rec)
    if task.heldout:  # linear rule: accuracy on unseen pairs measures generalization
        with adapter_disabled(model):
            held_init = [loss for loss, _ in teacher_forced(model, task.heldout, pad)]
        held = evaluate(model, task.heldout, held_init, pad, None, decode=cfg.decode)
        extra |= dict(heldout_exact_match=held["exact_match"], heldout_token_acc=held["token_acc"],
                      heldout_delta_loss=held["delta_loss"])
    result = dict(schema=SCHEMA, name=files.name, model=cfg.model, task=task.name, method=cfg.method,
                  method_flavour=method, rank=cfg.rank, params=n_params, length=task.length,
                  answer_tokens=sum(len(e.answer) for e in ex), noise=task.noise, seed=cfg.seed,
                  data_seed=cfg.seed_of_data, steps=trained["steps"], budget=len(plan),
                  stopped_at=trained["stopped_at"], stop_reason=trained["stop_reason"], schedule=cfg.schedule,
                  paper_schedule=cfg.paper_schedule, targets=list(lcfg["targets"]),
                  layers=layers, preset=cfg.preset, lr=cfg.lr, batch_size=cfg.batch_size,
                  grad_accum=cfg.grad_accum, n_samples=len(ex), data=cfg.data, text=cfg.text,
                  ot_fallback=cfg.ot_fallback, processes=procs.world, settings=settings,
                  **{k: v for k, v in res.items() if k != "per_sample"}, **extra,
                  time_s=round(trained["time_s"], 2), wall_s=round(time.perf_counter() - t_start, 2),
                  snapshots=trained["snapshots"], history=trained["history"], per_sample=res["per_sample"])
    if procs.rank == 0:
        write_results(files, model, result, adapter_info)
    procs.barrier()  # the files exist before any process moves on (a sweep's next run looks for them)
    return result


def base_model_path(model: str, folder: Path) -> str:
    """What PEFT's base_model_name_or_path should say: the real folder (`folder`, resolve_model_dir's answer)
    for 'default' or a folder, else the hub id."""
    local = model in ("", "default") or Path(model).expanduser().is_dir()
    return str(folder.resolve()) if local else model


def write_results(files: RunFiles, model: torch.nn.Module, result: dict, adapter_info: dict) -> None:
    """The adapter folder, then the results file, then the checkpoint goes; and the summary line."""
    import shutil

    try:
        save_adapter(model, files.adapter, adapter_info)
        atomic_json(files.result, result)
    except OSError as e:
        raise RunError(f"could not write the results to {files.out} ({e.strerror or e}); training is kept in "
                       f"{files.ckpt}: free space and run the same command to write them") from None
    shutil.rmtree(files.ckpt, ignore_errors=True)
    r, stop = result, result["stopped_at"]
    recall = ("every answer recalled exactly" if r["exact_match"] == 1.0
              else f"first failure at position {r['first_failure']}")
    print(f"done: ΔL = {r['delta_loss']:.4f} (L_init {r['loss_init']:.4f} -> {r['loss_final']:.4f}), "
          f"token acc {r['token_acc']:.3f}, exact match {r['exact_match']:.3f}, stubborn {r['stubborn']}, {recall}"
          + (f", stopped at step {stop} ({r['stop_reason']})" if stop is not None else "")
          + (f", held-out EM {r['heldout_exact_match']:.3f}" if "heldout_exact_match" in r else "")
          + f" | {r['time_s']:.1f}s -> {files.result}")
    if "mlp" in r["targets"]:
        print(f"note: the whole-MLP probe (target mlp, the paper preset) has no PEFT form: {files.adapter} holds "
              f"our format only (eval.py loads it; PEFT cannot); --preset standard exports to PEFT and merges")
    elif r["task"] == "facts":
        print(f"ask it: python eval.py --adapter {files.adapter} --prompt QUERY (formatted as in training)")


def write_merged(cfg: Config, adapter: Path, out: Path) -> None:
    """--merge-to: the base model with the saved adapter folded into its weights, as a Hugging Face folder.

    Merged on the CPU in fp32 (base + s·B·A, no rounding) and saved in fp32, whatever the training dtype.
    """
    import shutil

    from safetensors.torch import save_file

    src = resolve_model_dir(cfg.model)
    model = load_model(src, dtype="fp32", device="cpu")
    load_adapter(model, adapter)
    merge(model)
    sd = {k: v.contiguous() for k, v in unwrapped_state_dict(model).items()}
    if model.args.tie_embeddings:
        del sd["lm_head.weight"]  # the same tensor as the embeddings; config.json ties them again
    config = json.loads((src / "config.json").read_text())
    for k in ("torch_dtype", "dtype"):
        if k in config:
            config[k] = "float32"
    tokenizer = [f for f in src.iterdir() if f.name.startswith("tokenizer") or f.name in (
        "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "generation_config.json")]

    def write(d: Path) -> None:
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(config, indent=2))
        for f in tokenizer:
            shutil.copy(f, d / f.name)
        (d / MERGED_MARK).write_text(json.dumps(dict(base_model=base_model_path(cfg.model, src), adapter=str(adapter)),
                                                indent=1))

    try:
        atomic_dir(out, write)
    except OSError as e:
        raise RunError(f"could not write the merged model to {out} ({e.strerror or e})") from None
    print(f"merged: {out} (transformers.AutoModelForCausalLM.from_pretrained loads it)")


# ----------------------------------------------------------------------------- until recalled

FIRST_RANK = 4  # where --rank auto starts when the planner cannot plan


def until_recalled(cfg: Config) -> dict:
    """--until-recalled: one run, or with --rank auto runs at doubling ranks, until every fact is recalled;
    then the certificate of the last run's adapter, measured on it as saved and written beside it.

    Every attempt is a run of its own, named and identified by its rank, so a killed --rank auto
    resumes where it stopped: finished attempts are reused, the current one resumes from its checkpoint.
    """
    check(cfg)
    cfg = cfg.settled()
    procs = Processes.start()
    say = print if procs.rank == 0 else (lambda *a, **k: None)
    plan, ranks = None, [cfg.rank]
    if cfg.rank == "auto":
        width = module_width(cfg.model, target_list(cfg.targets, PRESETS[cfg.preset]["targets"]))
        tokens = sum(len(e.answer) for e in facts(load_tokenizer(cfg.model), cfg.data).train)  # as results count them: with end-of-turn
        plan = planned_rank(cfg, tokens, width)
        ranks = rank_ladder(plan["rank"], min(cfg.max_rank or MAX_RANK, width))
        say(f"rank auto: {plan_line(plan, tokens)}; ranks to try {', '.join(map(str, ranks))} (cap: --max-rank "
            f"{cfg.max_rank or MAX_RANK}, width {width})")
    attempts = []
    for rank in ranks:
        c = attempt(cfg, rank)
        result = main(c)
        n, got = len(result["per_sample"]), recalled(result)
        attempts.append(dict(rank=rank, name=result["name"], steps=result["steps"], budget=result["budget"],
                             facts_recalled=got, facts=n))
        grow = "" if got == n or rank == ranks[-1] else f"; doubling the rank to {ranks[len(attempts)]}"
        say(f"attempt {len(attempts)}: rank {rank}, {result['steps']} of {result['budget']} steps, {got}/{n} facts "
            f"recalled{grow}")
        if got == n:
            break
    adapter = RunFiles(Path(c.out), c.run_name()).adapter
    cert = write_certificate(c, adapter, attempts, plan) if procs.rank == 0 else None
    procs.barrier()
    if got < n:
        more = "raise --steps or --max-rank" if cfg.rank == "auto" else "raise --steps, or try --rank auto"
        raise RunError(f"{got}/{n} facts recalled after {len(attempts)} attempt{'s' * (len(attempts) > 1)} (the last "
                       f"at rank {rank}, {result['steps']} of {result['budget']} steps); the certificate says which; "
                       f"{more}")
    if cfg.merge_to and procs.rank == 0:
        write_merged(c, adapter, Path(cfg.merge_to))
    return cert


def write_certificate(c: Config, adapter: Path, attempts: list[dict], plan: dict | None) -> dict:
    """The certificate of the last attempt's adapter, measured on it as saved (as eval.py --certify does),
    with how training went; written atomically beside the adapter and printed as a table."""
    cert = certify(c.model, adapter, c.data, dtype=c.dtype, device=c.device)
    cert["overall"] |= dict(steps=attempts[-1]["steps"], attempts=attempts)
    if plan is not None:
        cert["plan"] = plan
    atomic_json(adapter / CERTIFICATE, cert)
    print_certificate(cert)
    print(f"certificate: {adapter / CERTIFICATE} (python eval.py --adapter {adapter} --certify checks it again)")
    return cert


def attempt(cfg: Config, rank: int) -> Config:
    """The run of one attempt at `rank`: under --name, --rank auto's attempts get the rank as a suffix."""
    name = f"{cfg.name}-r{rank}" if cfg.name and cfg.rank == "auto" else cfg.name
    return replace(cfg, rank=rank, name=name, max_rank=None, plan_from=None, merge_to=None)


def recalled(result: dict) -> int:
    """How many facts a run recalls: every answer token above p = 0.5, and the decoder's reply exact."""
    return sum(p["exact_match"] and not p["stubborn_positions"] for p in result["per_sample"])


def rank_ladder(start: int, cap: int) -> list[int]:
    """--rank auto's ranks: start, then doubled, up to `cap` (the last one is `cap` itself)."""
    ranks = [max(1, min(start, cap))]
    while ranks[-1] < cap:
        ranks.append(min(2 * ranks[-1], cap))
    return ranks


def module_width(model: str, targets: tuple) -> int:
    """The smallest input or output width among the adapted modules, from config.json (the weights stay unread):
    a rank above it cannot add anything."""
    return adapted_width(ModelArgs.from_config(read_config(resolve_model_dir(model))), targets)


def planned_rank(cfg: Config, tokens: int, width: int) -> dict:
    """Where --rank auto starts: fitlaw.plan_recall's rank for `tokens` answer tokens over the --plan-from
    results, or FIRST_RANK with the reason when it cannot plan."""
    import glob

    import fitlaw

    paths = sorted(glob.glob(cfg.plan_from or PLAN_FROM, recursive=True))
    n_layers = ModelArgs.from_config(read_config(resolve_model_dir(cfg.model))).n_layers
    lcfg = resolve_lora(cfg.settled(), n_layers)
    layers = sorted(set(lcfg["layers"])) if lcfg["layers"] is not None else list(range(n_layers))
    try:  # runs of the same model, modules and layers: another adapter's capacity says nothing about this one
        p = fitlaw.plan_recall(paths, tokens, width, model=cfg.model, targets=lcfg["targets"], layers=layers)
    except fitlaw.PlanError as e:
        return dict(rank=FIRST_RANK, planned=None, reason=str(e))
    return dict(rank=p["rank"], planned=p["rank"], fit=p["fit"], group=p["group"], runs=p["runs"])


def plan_line(plan: dict, tokens: int) -> str:
    """What the planner said, in a few words."""
    if plan["planned"] is None:
        return f"the planner cannot plan ({plan['reason']}); starting from rank {plan['rank']}"
    return f"the planner gives rank {plan['rank']} for {tokens} answer tokens ({plan['fit']}, {len(plan['runs'])} runs)"


def run_grid(cfg: Config, sweep: dict) -> None:
    """Run every combination one after another; finished runs are reused, so a killed sweep resumes.

    Under torchrun every run of the grid uses all the processes, one run after another.
    """
    from itertools import product

    axes = dict(rank=(sweep["ranks"], int), length=(sweep["lengths"], int), noise=(sweep["noises"], float),
                method=(sweep["methods"], str), seed=(sweep.get("seeds"), int))
    try:
        values = {k: [conv(x) for x in v.split(",")] if v else [getattr(cfg, k)] for k, (v, conv) in axes.items()}
    except ValueError as e:
        raise RunError(f"a sweep list has a value of the wrong type ({e})") from None
    if cfg.merge_to:
        raise RunError("--merge-to writes one run's merged model; drop the sweep lists, or merge each run on its own")
    grid = [replace(cfg, name=None, **dict(zip(values, combo))) for combo in product(*values.values())]
    for i, c in enumerate(grid):  # every run's settings, and every finished run's, are checked before the first starts
        check(c)
        grid[i] = c = c.settled()
        f = RunFiles(Path(c.out), c.run_name()).result
        if f.exists() and not c.overwrite:
            refuse_other_settings(json.loads(f.read_text()).get("settings"),
                                  identity(c, int(os.environ.get("WORLD_SIZE", 1))), f)
    say = print if int(os.environ.get("RANK", 0)) == 0 else (lambda *a, **k: None)
    t0, done_here = time.perf_counter(), 0
    for i, c in enumerate(grid):
        if RunFiles(Path(c.out), c.run_name()).result.exists() and not c.overwrite:  # its settings were checked above
            say(f"[{i + 1}/{len(grid)}] {c.run_name()}: done already, reused")
            continue
        left = len(grid) - i
        eta = "" if not done_here else f", ETA {fmt_time((time.perf_counter() - t0) / done_here * left)}"
        say(f"[{i + 1}/{len(grid)}] {c.run_name()}{eta}", flush=True)
        main(c)
        done_here += 1
    say(f"sweep finished: {len(grid)} runs in {fmt_time(time.perf_counter() - t0)}")


def parse(argv: list[str] | None = None) -> tuple[Config, dict]:
    import argparse

    c = Config()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model and data")
    g.add_argument("--model", default=c.model, help="'default' (built-in SmolLM2-135M), a folder, or a hub id")
    g.add_argument("--task", default=None,
                   help="phonebook | longctx | linear | facts (default: from --data's keys, else phonebook)")
    g.add_argument("--length", type=int, default=None,
                   help="answer tokens ℓ (PhoneBook: digits) (default 100); refused with a facts or PhoneBook "
                        "--data file, whose targets set the length")
    g.add_argument("--noise", type=float, default=None, help="longctx: fraction ρ of random tokens (default 1.0)")
    g.add_argument("--data", default=None,
                   help='a jsonl of your own facts, {"query": ..., "target": ...[, "system": ...]} per line (task '
                        "facts), or the paper's PhoneBook / long-context jsonl; the task follows the keys")
    g.add_argument("--text", default=None, help="longctx: a plain-text file of clean prose (default: built-in)")
    g.add_argument("--samples", type=int, default=c.samples, help="linear: train pairs (as many held out)")
    g = ap.add_argument_group("adapter")
    g.add_argument("--rank", type=rank_arg, default=c.rank,
                   help="LoRA rank r, or auto with --until-recalled: start from the rank that fitlaw.plan_recall "
                        "plans from --plan-from's runs (rank 4 when it cannot plan) and double it while the budget "
                        "runs out before every fact is recalled (default %(default)s)")
    g.add_argument("--max-rank", type=int, default=None,
                   help=f"--rank auto: the largest rank to try (default {MAX_RANK}; never above the smallest width "
                        f"of the adapted modules)")
    g.add_argument("--plan-from", default=None, metavar="GLOB",
                   help=f"--rank auto: the results files the planner reads, a glob relative to the current folder "
                        f"(default '{PLAN_FROM}')")
    g.add_argument("--preset", default=None,
                   help="paper (mlp probe, 2/3 depth; our format only) | standard (q,v all layers; exports to PEFT "
                        "and merges) (default: standard for facts, paper otherwise)")
    g.add_argument("--targets", default=None, help="comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,mlp")
    g.add_argument("--layers", default=None, help="comma list of layer indices (default: preset's)")
    g.add_argument("--alpha", type=float, default=None, help="standard preset: s = alpha/r (default alpha = r)")
    g.add_argument("--dropout", type=float, default=None, help="adapter dropout (default: preset's)")
    g = ap.add_argument_group("method and optimisation")
    g.add_argument("--method", default=c.method, help="sft | ot | sw (MemFT) (default %(default)s)")
    g.add_argument("--sw-flavour", default=None, help="window | curriculum (default: window for longctx)")
    g.add_argument("--ot-fallback", default=c.ot_fallback, help="when no token is sub-threshold: sft | skip")
    g.add_argument("--lr", type=float, default=c.lr,
                   help="AdamW learning rate: the peak of a linear decay, or the constant one (see --schedule) "
                        "(default %(default)s)")
    g.add_argument("--epochs", type=int, default=c.epochs, help="passes over the data (default %(default)s; ignored with --steps)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=c.batch_size, help="samples per micro-batch (default %(default)s)")
    g.add_argument("--grad-accum", type=int, default=c.grad_accum, help="micro-batches per optimizer step (default %(default)s)")
    g.add_argument("--seed", type=int, default=c.seed,
                   help="training seed: adapter init, dropout and batch order (default %(default)s)")
    g.add_argument("--data-seed", type=int, default=None,
                   help="data seed: names, numbers, random text (default: --seed); fix it to pair runs on the same data")
    g.add_argument("--schedule", default=c.schedule,
                   help="lr schedule: linear (decay to 0, the paper) | constant (default %(default)s); with constant, "
                        "--snapshots at step T equal a run of budget T")
    g.add_argument("--paper-schedule", default=None, metavar="qwen|llama",
                   help="PhoneBook: the authors' per-length lr, batch, accumulation, epochs and SW curriculum "
                        "boundaries for that model family (overrides --lr --batch-size --grad-accum --epochs)")
    g.add_argument("--snapshots", default=None, metavar="STEPS",
                   help="comma list of steps at which to record ΔL, token acc, EM, stubborn tokens and first "
                        "failure inside the run (teacher-forced)")
    g.add_argument("--stop-when-memorized", action="store_true", help="stop once every answer token has p > 0.5")
    g.add_argument("--until-recalled", action="store_true",
                   help="facts: train until every answer token has p > 0.5 and the decoder confirms every target "
                        "(--steps is the budget of each attempt), then write certificate.json beside the adapter: "
                        "per fact exact or not, smallest p and margin; rank, params, bits; the side effects on "
                        "prose perplexity and general prompts. Exits 1 when some fact is not recalled")
    g.add_argument("--stop-at-plateau", type=float, nargs="?", const=0.01, default=None, metavar="TOL",
                   help="stop once the mean training loss over the last tenth of the steps differs from the tenth "
                        "before by under TOL (default 0.01 = 1%%); the results record which stop fired")
    g.add_argument("--eval-every", type=int, default=c.eval_every,
                   help="with --stop-when-memorized / --stop-at-plateau: check period in steps (default %(default)s)")
    g = ap.add_argument_group("output")
    g.add_argument("--out", default=c.out, help="results folder (default %(default)s)")
    g.add_argument("--name", default=None,
                   help="run name (default from the settings; with --data, the file's name and a hash of its content)")
    g.add_argument("--merge-to", default=None, metavar="DIR",
                   help="after training, write a Hugging Face folder (fp32 weights with the adapter folded in, "
                        "config, tokenizer) that transformers loads alone; linear targets only")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a finished run or checkpoint of this name even if its settings differ")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint period in steps (default: 10 per run)")
    g.add_argument("--no-decode", dest="decode", action="store_false", help="skip the decoder check of EM")
    g.add_argument("--sample-recall", type=int, default=0, metavar="K", help="also decode K samples per example")
    g.add_argument("--temperature", type=float, default=1.0, help="with --sample-recall")
    g.add_argument("--top-p", type=float, default=1.0, help="with --sample-recall")
    g.add_argument("--prefix-cache-mb", type=float, default=c.prefix_cache_mb,
                   help="memory for hidden states below a single-layer probe (default %(default)s)")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute layer activations in backward")
    g.add_argument("--compile", action="store_true",
                   help="fuse each layer's elementwise work with torch.compile (needs a C compiler; compiling "
                        "takes 5-20 s). Pays off for adapters on every layer and long answers (CPU, 256 tokens: "
                        "17%% faster steps); not for the one-layer probe on short answers (the default run is slower)")
    g.add_argument("--dtype", default=None, help="fp32 | bf16 (default: fp32 on CPU, bf16 on GPU)")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    g = ap.add_argument_group("sweeps (under torchrun, every run uses all the processes, one run after another)")
    g.add_argument("--ranks", default=None, help="comma list: run every rank (finished runs are reused)")
    g.add_argument("--lengths", default=None, help="comma list: run every length")
    g.add_argument("--noises", default=None, help="comma list: run every noise ratio")
    g.add_argument("--methods", default=None, help="comma list: run every method")
    g.add_argument("--seeds", default=None, help="comma list: run every training seed")
    a = vars(ap.parse_args(argv))
    sweep = {k: a.pop(k) for k in ("ranks", "lengths", "noises", "methods", "seeds")}
    return Config(**a), sweep


def rank_arg(text: str) -> int | str:
    """--rank: an integer, or 'auto'."""
    import argparse

    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None


def interrupted_line(cfg: Config) -> str:
    """What a hard Ctrl-C leaves behind, in one line."""
    if cfg.rank == "auto":
        return "interrupted: run the same command to resume (finished attempts are reused, the current one resumes)"
    ckpt = RunFiles(Path(cfg.out), cfg.run_name()).ckpt
    st = find_checkpoint(ckpt) if ckpt.parent.is_dir() else None
    if st is None:
        return "interrupted: nothing was saved for this run; run the same command to start it again"
    return f"interrupted: the checkpoint at step {st['step']} is in {ckpt}; run the same command to resume"


def cli(argv: list[str] | None = None) -> None:
    cfg, sweep = parse(argv)
    first = int(os.environ.get("RANK", 0)) == 0  # under torchrun, one process speaks for all
    try:
        if any(sweep.values()):
            if cfg.until_recalled or cfg.rank == "auto":
                raise RunError("--until-recalled certifies one run (--rank auto makes its own attempts); drop the "
                               "sweep lists")
            run_grid(cfg, sweep)
        elif cfg.until_recalled:
            until_recalled(cfg)
        else:
            main(cfg)
    except RunInterrupted as e:
        sys.exit(f"{e}" if first else 130)
    except KeyboardInterrupt:
        sys.exit(interrupted_line(cfg) if first else 130)
    except (RunError, ModelError, DataError, LoraError, ConvertError) as e:
        sys.exit(f"error: {e}" if first else 1)
    finally:
        if "torch.distributed" in sys.modules:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    cli()
