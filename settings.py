"""A run's settings: the Config dataclass, the command line that fills it, and the checks that refuse
impossible settings before anything is loaded.

    from settings import Config, check
    cfg = Config(task="longctx", length=200, rank=8, method="sw").settled()

train.py's `cli` parses the command line here; every other module takes a Config.
"""

import argparse
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from data import file_sha256, jsonl_task, read_facts
from lora import PRESETS, TARGETS
from memft import paper_schedule
from model import ModelError, default_device_dtype


@dataclass
class Config:
    model: str = "default"
    task: str | None = None  # None -> from --data's keys (query/target: facts), else phonebook
    length: int | None = None  # None -> 100; facts and PhoneBook files take theirs from the file
    noise: float | None = None
    data: str | None = None
    text: str | None = None
    samples: int = 100
    rank: int | str | None = None  # None -> FACTS_RANK under the facts preset, 8 otherwise; "auto" (with until_recalled): from
    # the planner, doubled until every fact is recalled
    preset: str | None = None  # None -> facts for facts (q,v on the top third; PEFT loads it, it merges), paper otherwise
    targets: str | None = None  # comma list; None -> the preset's
    layers: str | None = None  # comma list; None -> preset ('paper': 2/3 depth; 'facts': 2/3 depth up) or all
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
    settle: bool | None = None  # once memorized, train as long again, lr annealed to 0; None -> on for facts with the KL term
    max_rank: int | None = None  # --rank auto's cap (None -> MAX_RANK); never above the targets' width
    plan_from: str | None = None  # --rank auto: results files the planner reads (None -> PLAN_FROM)
    stop_at_plateau: float | None = None  # relative change of the training loss that counts as a plateau
    preserve: float | None = None  # facts: λ of λ·KL(base ‖ adapted) on other text; None -> 10 for facts; 0: off
    add_to: str | None = None  # facts: an adapter to train further on its own facts and --data's (facts.adding)
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
        preset = self.preset or ("facts" if task == "facts" else "paper")
        length = self.length if self.length is not None or self.length_from_file(task) else 100
        rank = self.rank if self.rank is not None else FACTS_RANK if preset == "facts" else 8
        memorized = self.stop_when_memorized or self.until_recalled  # recalled implies memorized
        settle = self.settle if self.settle is not None else task == "facts" and memorized and self.preserve != 0
        return replace(self, task=task, preset=preset, length=length, rank=rank, stop_when_memorized=memorized,
                       settle=settle)

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


MAX_RANK = 64  # --rank auto's default cap
FACTS_RANK = 4  # facts runs' rank unless --rank: docs/placement.py's table (it kept more of the model than 8)


PLAN_FROM = "results/**/*.json"  # --rank auto: the results files the planner reads by default


_warned: set[str] = set()  # each warning once per process, though sweeps and --until-recalled check again


def check(cfg: Config) -> None:
    """Reject impossible settings before anything is loaded or written; warn about implausible ones."""
    check_until_recalled(cfg)
    positive = dict(rank=None if cfg.rank == "auto" else cfg.rank, max_rank=cfg.max_rank, batch_size=cfg.batch_size,
                    grad_accum=cfg.grad_accum, samples=cfg.samples, epochs=cfg.epochs, eval_every=cfg.eval_every,
                    length=cfg.length)
    for k, v in positive.items():
        if v is not None and v <= 0:
            raise RunError(f"--{k.replace('_', '-')} must be a positive integer, got {v}")
    at_least_zero = dict(steps=cfg.steps, save_every=cfg.save_every, sample_recall=cfg.sample_recall, seed=cfg.seed,
                         data_seed=cfg.data_seed)
    for k, v in at_least_zero.items():  # 0 steps: evaluate the untrained adapter (ΔL = 0); typed, refused by parse
        if v is not None and v < 0:
            raise RunError(f"--{k.replace('_', '-')} must be 0 or more, got {v}")
    # Each number's allowed values; nan fails every comparison, so it is refused with the rest.
    numbers = dict(lr=(cfg.lr, lambda v: 0 < v < math.inf, "a finite number above 0"),
                   alpha=(cfg.alpha, lambda v: 0 < v < math.inf, "a finite number above 0"),
                   stop_at_plateau=(cfg.stop_at_plateau, lambda v: 0 < v < math.inf, "a finite number above 0"),
                   preserve=(cfg.preserve, lambda v: 0 <= v < math.inf, "a finite number, 0 or more"),
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
    if not 1e-6 <= cfg.lr <= 1 and not cfg.paper_schedule:  # --paper-schedule sets its own lr
        warn(f"warning: --lr {cfg.lr:g} is far outside 1e-6..1; the study trained at 1e-2 (docs/facts.md's "
             f"examples at 2e-2). Training goes on, but expect a worse loss, or none at all")


def warn(line: str) -> None:
    """One line on stderr, once per process, and under torchrun from the first process only."""
    if line not in _warned and int(os.environ.get("RANK", 0)) == 0:
        print(line, file=sys.stderr, flush=True)
    _warned.add(line)


def check_until_recalled(cfg: Config) -> None:
    """--until-recalled and --rank auto: the combinations that make sense, checked before anything loads."""
    auto = cfg.rank == "auto"
    if not isinstance(cfg.rank, int) and not auto and cfg.rank is not None:
        raise RunError(f"--rank must be a positive integer or auto, got {cfg.rank!r}")
    if auto and not cfg.until_recalled:
        raise RunError("--rank auto grows the rank until every fact is recalled; add --until-recalled")
    for flag, value in (("--max-rank", cfg.max_rank), ("--plan-from", cfg.plan_from)):
        if value is not None and not auto:
            raise RunError(f"{flag} applies to --rank auto only; drop it or use --rank auto --until-recalled")
    if cfg.plan_from is not None and not cfg.plan_from.strip():
        raise RunError("--plan-from takes a glob of results files, e.g. 'results/**/*.json'")
    if cfg.settle and not (cfg.until_recalled or cfg.stop_when_memorized):
        raise RunError("--settle trains on after every answer is memorized; add --until-recalled (facts) or "
                       "--stop-when-memorized")
    if cfg.until_recalled and not cfg.decode:
        raise RunError("--until-recalled confirms recall with the decoder; drop --no-decode")


def check_data(cfg: Config) -> None:
    """The task --data names, and every line of a facts file, checked before the tokenizer loads."""
    c = cfg.settled()  # reads --data's keys: a malformed file stops here, with its line
    if c.paper_schedule and c.task != "phonebook":
        raise RunError("--paper-schedule holds the authors' PhoneBook tables; use it with --task phonebook")
    if c.task == "facts" and c.data is None:
        raise RunError('--task facts needs --data FILE, a jsonl of {"query": ..., "target": ...} lines')
    if c.preserve and c.task != "facts":
        raise RunError(f"--preserve keeps the rest of the model while storing your own facts; it applies to --data "
                       f"FILE of {{\"query\", \"target\"}} lines (this is task {c.task})")
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
    if out.resolve() == (Path(cfg.out) / cfg.run_name()).resolve():
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
    elif cfg.preset == "paper":  # the paper probes one layer at about two-thirds depth (20 of 30, 24 of 36, ...)
        layers = [round(n_layers * 2 / 3)]
    elif cfg.preset == "facts":  # from there to the top: 20..29 of 30, 21..31 of 32, 24..35 of 36
        layers = list(range(round(n_layers * 2 / 3), n_layers))
    else:
        layers = None
    dropout = p["dropout"] if cfg.dropout is None else cfg.dropout
    return dict(targets=targets, layers=layers, alpha=cfg.alpha, dropout=dropout, init=p["init"])


def resolve_method(cfg: Config) -> str:
    """sft | ot | sw_window | sw_curriculum (MemFT-SW's flavour follows the task unless given)."""
    if cfg.method != "sw":
        return cfg.method
    return f"sw_{cfg.sw_flavour or ('window' if cfg.task == 'longctx' else 'curriculum')}"


def with_paper_schedule(cfg: Config, method: str, length: int) -> tuple[Config, list[int] | None]:
    """The authors' PhoneBook lr, batch, accumulation and epochs for this length (with --paper-schedule)."""
    if not cfg.paper_schedule:
        return cfg, None
    p = paper_schedule(cfg.paper_schedule, method, length)
    return replace(cfg, lr=p["lr"], batch_size=p["batch_size"], grad_accum=p["grad_accum"], epochs=p["epochs"]), \
        p["boundaries"]


def int_list(text: str) -> list[int]:
    """argparse type of the tools' comma lists of integers (docs/placement.py --seeds, docs/scale.py --sizes, ...)."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers") from None


def parse(argv: list[str] | None, doc: str) -> tuple[Config, dict]:
    """train.py's command line (`doc`: its docstring, the help's description and examples) -> (settings, sweep lists)."""
    c = Config()
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
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
                   help="LoRA rank r, or auto with --until-recalled: start from the rank that planner.plan_recall "
                        "plans from --plan-from's runs (rank 4 when it cannot plan) and double it while the budget "
                        f"runs out before every fact is recalled (default {FACTS_RANK} under the facts preset, 8 otherwise)")
    g.add_argument("--max-rank", type=int, default=None,
                   help=f"--rank auto: the largest rank to try (default {MAX_RANK}; never above the smallest width "
                        f"of the adapted modules)")
    g.add_argument("--plan-from", default=None, metavar="GLOB",
                   help=f"--rank auto: the results files the planner reads, a glob relative to the current folder "
                        f"(default '{PLAN_FROM}')")
    g.add_argument("--preset", default=None,
                   help="paper (mlp probe, 2/3 depth; our format only) | standard (q,v all layers; exports to PEFT "
                        "and merges) | facts (q,v from 2/3 depth to the top; exports and merges) (default: facts for "
                        "--data facts files, paper otherwise)")
    g.add_argument("--targets", default=None, help="comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,mlp")
    g.add_argument("--layers", default=None, help="comma list of layer indices (default: preset's)")
    g.add_argument("--alpha", type=float, default=None, help="standard and facts presets: s = alpha/r (default alpha = r)")
    g.add_argument("--dropout", type=float, default=None, help="adapter dropout (default: preset's)")
    g = ap.add_argument_group("method and optimisation")
    g.add_argument("--method", default=c.method, help="sft | ot | sw (MemFT) (default %(default)s)")
    g.add_argument("--sw-flavour", default=None, help="window | curriculum (default: window for longctx)")
    g.add_argument("--ot-fallback", default=c.ot_fallback, help="when no token is sub-threshold: sft | skip")
    g.add_argument("--lr", type=float, default=c.lr,
                   help="AdamW learning rate: the peak of a linear decay, or the constant one (see --schedule) "
                        "(default %(default)s)")
    g.add_argument("--epochs", type=int, default=c.epochs, help="passes over the data (default %(default)s; ignored with --steps)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps, 1 or more (overrides --epochs)")
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
    g.add_argument("--settle", action=argparse.BooleanOptionalAction, default=None,
                   help="once every answer token has p > 0.5 (at step S), record S and train as many steps again "
                        "(to 2S, within --steps), the lr going linearly from its value at S to 0, so that the KL term "
                        "pulls the rest of the model back; the answers are checked again at the end (default: on for "
                        "facts runs with --until-recalled and the KL term; --no-settle stops at S)")
    g.add_argument("--preserve", type=float, default=None, metavar="LAMBDA",
                   help="facts: weight λ of the KL(base ‖ adapted) term on general prompts and prose (the "
                        "regularisation part of assets/locality.json, disjoint from the part the certificate "
                        "measures) that keeps the rest of the model (locality.py; default 10 for facts runs, 0 "
                        "turns it off)")
    g.add_argument("--no-preserve", dest="preserve", action="store_const", const=0.0,
                   help="facts: train without the KL term (--preserve 0)")
    g.add_argument("--stop-at-plateau", type=float, nargs="?", const=0.01, default=None, metavar="TOL",
                   help="stop once the mean training loss over the last tenth of the steps differs from the tenth "
                        "before by under TOL (default 0.01 = 1%%); the results record which stop fired")
    g.add_argument("--eval-every", type=int, default=c.eval_every,
                   help="with --stop-when-memorized / --stop-at-plateau: check period in steps (default %(default)s)")
    g = ap.add_argument_group("output")
    g.add_argument("--out", default=c.out, help="results folder (default %(default)s)")
    g.add_argument("--name", default=None,
                   help="run name (default from the settings; with --data, the file's name and a hash of its content)")
    g.add_argument("--add-to", default=None, metavar="ADAPTER",
                   help="facts: add --data's facts to a saved facts adapter (runs/NAME). The run starts from that "
                        "adapter, with its rank, targets and layers, and trains on its facts and the new ones "
                        "together, so the certificate covers both; the joined file is written under "
                        "<out>/added/")
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
    if a["steps"] is not None and a["steps"] < 1:  # Config(steps=0) evaluates the untrained adapter; typed, a slip
        sys.exit(f"error: --steps must be 1 or more, got {a['steps']}; 0 steps would train nothing and write a "
                 f"result with ΔL = 0")
    sweep = {k: a.pop(k) for k in ("ranks", "lengths", "noises", "methods", "seeds")}
    return Config(**a), sweep


def rank_arg(text: str) -> int | str:
    """--rank: an integer, or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None
