"""Write facts into a LoRA adapter and measure how well it remembers them: the main job.

    python train.py                                    # small PhoneBook run on the built-in model
    python train.py --task longctx --length 200 --noise 1.0 --rank 8 --method sw
    python train.py --model DIR --task phonebook --length 60 --rank 4 --targets q_proj,v_proj --method ot --steps 30
    python train.py --ranks 1,2,4,8 --lengths 50,100,200 --task longctx     # a resumable grid sweep
    torchrun --nproc_per_node 2 train.py ...                               # FSDP2 over 2 processes

Each run writes <out>/<name>.json (results, SPEC §7 keys, with a per-step history) and <out>/<name>/
(the adapter). A killed run started again with the same command resumes from <out>/<name>.ckpt/.
"""

import ctypes
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from data import DataError, load_tokenizer, make_task
from eval import LN2, PrefixCache, answer_losses, evaluate, sampled_recall, teacher_forced
from lora import PRESETS, LoraError, adapter_disabled, add_lora, atomic_dir, lora_parameters, save_adapter
from memft import SlidingState, anchor_positions, curriculum_boundaries, curriculum_size, method_weights, weighted_loss
from model import ModelError, load_model

SCHEMA = 1


@dataclass
class Config:
    model: str = "default"
    task: str = "phonebook"
    length: int = 100
    noise: float | None = None
    data: str | None = None
    text: str | None = None
    samples: int = 100
    rank: int = 8
    preset: str = "paper"
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
    seed: int = 0
    out: str = "runs"
    name: str | None = None
    save_every: int = 0  # 0 -> about 10 checkpoints per run
    activation_checkpointing: bool = False
    compile: bool = False
    stop_when_memorized: bool = False
    eval_every: int = 10
    prefix_cache_mb: float = 4096
    decode: bool = True
    sample_recall: int = 0  # K sampled decodes per example after training (0: off)
    temperature: float = 1.0
    top_p: float = 1.0
    dtype: str | None = None
    device: str | None = None

    def run_name(self) -> str:
        noise = "" if self.task != "longctx" else f"-n{1.0 if self.noise is None else self.noise:g}"
        length = "" if self.task == "linear" else f"-L{self.length}"  # the rule's answers set their own length
        return self.name or f"{self.task}{noise}{length}-r{self.rank}-{self.method}-s{self.seed}"


class RunError(Exception):
    """Bad settings for a run, worded for the user."""


def check(cfg: Config) -> None:
    """Reject impossible settings before anything is loaded or written."""
    positive = dict(rank=cfg.rank, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, samples=cfg.samples,
                    epochs=cfg.epochs, eval_every=cfg.eval_every, length=cfg.length)
    for k, v in positive.items():
        if v is not None and v <= 0:
            raise RunError(f"--{k.replace('_', '-')} must be a positive integer, got {v}")
    if cfg.steps is not None and cfg.steps < 0:  # 0 steps: evaluate the untrained adapter (ΔL = 0)
        raise RunError(f"--steps must be 0 or more, got {cfg.steps}")
    if cfg.ot_fallback not in ("sft", "skip"):
        raise RunError(f"unknown --ot-fallback {cfg.ot_fallback!r}; choose sft or skip")


def resolve_lora(cfg: Config, n_layers: int) -> dict:
    if cfg.preset not in PRESETS:
        raise RunError(f"unknown preset {cfg.preset!r}; choose {', '.join(PRESETS)}")
    p = PRESETS[cfg.preset]
    targets = tuple(t.strip() for t in cfg.targets.split(",")) if cfg.targets else p["targets"]
    if cfg.layers:
        try:
            layers = [int(x) for x in cfg.layers.split(",")]
        except ValueError:
            raise RunError(f"--layers takes comma-separated integers, got {cfg.layers!r}") from None
    else:  # the paper probes one layer at about two-thirds depth (20 of 30, 24 of 36, ...)
        layers = [round(n_layers * 2 / 3)] if cfg.preset == "paper" else None
    dropout = p["dropout"] if cfg.dropout is None else cfg.dropout
    return dict(targets=targets, layers=layers, alpha=cfg.alpha, dropout=dropout, init=p["init"])


def resolve_method(cfg: Config) -> str:
    if cfg.method not in ("sft", "ot", "sw"):
        raise RunError(f"unknown method {cfg.method!r}; choose sft, ot or sw")
    if cfg.method != "sw":
        return cfg.method
    flavour = cfg.sw_flavour or ("window" if cfg.task == "longctx" else "curriculum")
    if flavour not in ("window", "curriculum"):
        raise RunError(f"unknown --sw-flavour {flavour!r}; choose window or curriculum")
    return f"sw_{flavour}"


def schedule(n: int, cfg: Config, method: str, length: int) -> list[list[int]]:
    """Every optimizer step's batches (lists of example indices), fixed by the seed up front.

    Plain methods reshuffle each epoch. MemFT-SW's curriculum shuffles once and trains the first
    `curriculum_size` samples in fixed batches, so later stages append batches and keep old ones.
    """
    B = min(cfg.batch_size, n)
    rng = random.Random(cfg.seed)
    order = list(range(n))
    rng.shuffle(order)
    bounds = curriculum_boundaries(length)
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


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------- distributed


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Let freed activation buffers go back to the OS at once (glibc; a no-op elsewhere).

    glibc serves big allocations with mmap and unmaps them on free, but each free raises that
    threshold (up to 32 MiB), after which activations come from its own heap, which it keeps: at
    4096 answer tokens that left about 2 GB of freed memory resident. Fixing the threshold turns the
    adjustment off. Returns whether it was set.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return libc.mallopt(-3, threshold) == 1  # -3 = M_MMAP_THRESHOLD


def distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun with several processes."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def shard(model) -> None:
    """FSDP2: shard each decoder layer's frozen weights over the processes. LoRA weights stay whole on every process (they are tiny, fp32, and their
    gradients are summed by hand), and so do embeddings, final norm and head, which the chunked loss
    reads outside forward. Sharding those as FSDP's root would not lower peak memory: FSDP2 keeps
    the root's weights gathered from forward through backward, and a frozen base has no root
    gradients or optimizer state to shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(model.lm_head.weight.device.type, (int(os.environ["WORLD_SIZE"]),))
    lora = set(lora_parameters(model))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, ignored_params=lora & set(block.parameters()))


def allsum(x, world: int):
    """Sum a number or tensor over processes (identity for one process)."""
    if world == 1:
        return x
    import torch.distributed as dist

    t = torch.as_tensor(x, dtype=torch.float64).clone()
    dist.all_reduce(t)
    return t.item() if not torch.is_tensor(x) else t.to(x.dtype)


def allmerge(table: dict, keys: list, world: int) -> None:
    """Data parallel: copy into `table` the entries that the other processes just wrote for their
    `keys`, so that every process holds the whole batch's per-sample state."""
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, {k: table[k] for k in keys})
    for part in parts:
        table.update(part)


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, model, opt, state: dict) -> None:
    """LoRA weights, AdamW moments and RNG in safetensors; the rest in JSON. Never pickled."""
    from safetensors.torch import save_file

    params = lora_parameters(model)
    tensors = {f"p{i}": p.detach().cpu() for i, p in enumerate(params)}
    steps = {}
    for i, p in enumerate(params):
        s = opt.state.get(p)
        if s:
            tensors[f"m{i}"], tensors[f"v{i}"] = s["exp_avg"].cpu(), s["exp_avg_sq"].cpu()
            steps[i] = float(s["step"])
    tensors["rng"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["cuda_rng"] = torch.cuda.get_rng_state()

    def write(d: Path):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "state.safetensors"))
        (d / "state.json").write_text(json.dumps({**state, "adam_steps": steps}))

    atomic_dir(path, write)


def load_checkpoint(path: Path, model, opt) -> dict:
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
    torch.set_rng_state(t["rng"])
    if "cuda_rng" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["cuda_rng"])
    return state


def atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the run


def main(cfg: Config) -> dict | None:
    out = Path(cfg.out)
    name = cfg.run_name()
    res_path, ckpt = out / f"{name}.json", out / f"{name}.ckpt"
    if res_path.exists():
        print(f"{res_path} exists: run already done (delete it to rerun)")
        return json.loads(res_path.read_text())
    check(cfg)
    method = resolve_method(cfg)
    return_freed_memory()
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rank, world = distributed()
    if cfg.compile and world > 1:  # FSDP's per-layer hooks split the compiled graphs: slower, not faster
        raise RunError("--compile runs in a single process only; drop it under torchrun")
    device = cfg.device
    if device is None and world > 1 and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.current_device()}"
    model = load_model(cfg.model, dtype=cfg.dtype, device=device)
    tok = load_tokenizer(cfg.model)
    task = make_task(tok, cfg.task, cfg.length, cfg.noise, cfg.seed, cfg.data, cfg.text, cfg.samples)
    ex = task.train
    pad = tok.pad_id
    lcfg = resolve_lora(cfg, model.args.n_layers)
    n_params = add_lora(model, cfg.rank, **lcfg)
    params = lora_parameters(model)
    start_layer = min(model.lora_config["layers"])
    prefix = PrefixCache(model, start_layer, cfg.prefix_cache_mb) if start_layer > 0 else None
    if world > 1:
        shard(model)
        if prefix is not None and not prefix.fill(ex):  # processes must run layers in lockstep
            prefix = None
    model.activation_checkpointing = cfg.activation_checkpointing
    model.compile_layers = cfg.compile

    with adapter_disabled(model):  # L_init: the frozen model's loss, computed once
        loss_init = [loss for loss, _ in teacher_forced(model, ex, pad, prefix=prefix)]
    plan = schedule(len(ex), cfg, method, task.length)
    total = len(plan)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    sliding = SlidingState()
    history, step, elapsed, stopped_at = [], 0, 0.0, None
    last_exact: dict[int, bool] = {}
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("out", "name", "decode", "device", "sample_recall", "temperature", "top_p")}
    old = ckpt.with_name(ckpt.name + ".old")  # a kill between the two renames of a save leaves only this
    if not (ckpt / "state.json").exists() and (old / "state.json").exists():
        os.replace(old, ckpt)
    if (ckpt / "state.json").exists():
        st = load_checkpoint(ckpt, model, opt)
        if st["settings"] != settings:
            raise RunError(f"{ckpt} holds a run with other settings; use another --name or delete it")
        step, history, elapsed = st["step"], st["history"], st["elapsed"]
        sliding.load_state_dict(st["sliding"])
        last_exact = {int(k): v for k, v in st["last_exact"].items()}
        print(f"resuming {name} from step {step}/{total}") if rank == 0 else None
    save_every = cfg.save_every or max(1, total // 10)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{name}: {task.name}, {len(ex)} examples, ℓ = {task.length} answer tokens, rank {cfg.rank} "
          f"{','.join(lcfg['targets'])} @ layers {model.lora_config['layers'] if len(model.lora_config['layers']) < 8 else 'all'}, "
          f"{n_params:,} params, method {method}, {total} steps, L_init = "
          f"{sum(float(x.sum()) for x in loss_init) / sum(len(x) for x in loss_init):.3f}")

    model.train()
    t0 = time.perf_counter() - elapsed
    t_loop = time.perf_counter()
    step0 = step
    while step < total:
        if cfg.stop_when_memorized and memorized(model, ex, pad, prefix, last_exact, step, cfg.eval_every, world):
            stopped_at = step
            break
        lr = cfg.lr * (1 - step / total)  # linear decay to 0, no warmup
        for g in opt.param_groups:
            g["lr"] = lr
        rec = dict(loss=0.0, ce=0.0, n_sub=0.0, n_tok=0.0, skipped=0.0)
        max_ce = 0.0  # the worst answer token seen this step (this process's share)
        micro = plan[step]
        for idx in micro:
            r = micro_step(model, [ex[i] for i in idx], method, cfg, pad, prefix, sliding, last_exact,
                           len(micro), rank, world)
            max_ce = max(max_ce, r.pop("max_ce"))
            rec = {k: rec[k] + r[k] for k in rec}
        rec = {k: allsum(v, world) for k, v in rec.items()}
        rec["skipped"] = rec["skipped"] / world
        if rec["skipped"] < len(micro):
            for p in params:  # LoRA weights are replicated: sum their gradients by hand
                p.grad = allsum(p.grad if p.grad is not None else torch.zeros_like(p), world)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        em = sum(last_exact.values()) / len(ex)
        now = time.perf_counter()
        history.append(dict(step=step, loss=round(rec["loss"], 6), ce=round(rec["ce"] / rec["n_tok"], 6),
                            max_ce=round(max_ce, 6), n_sub=round(rec["n_sub"]), em=round(em, 4), lr=lr, skipped=rec["skipped"] == len(micro),
                            time_s=round(now - t0, 3)))
        per_step = (now - t_loop) / (step - step0)
        if rank == 0 and (step == total or step % max(1, total // 20) == 0 or step - step0 <= 1):
            print(f"step {step}/{total} | loss {rec['loss']:.4f} | ce {rec['ce'] / rec['n_tok']:.4f} | "
                  f"sub-threshold {rec['n_sub']:.0f}/{rec['n_tok']:.0f} | em(train) {em:.2f} | lr {lr:.2e} | "
                  f"{per_step:.2f}s/step | ETA {fmt_time(per_step * (total - step))}", flush=True)
        if rank == 0 and step % save_every == 0 and step < total:
            save_checkpoint(ckpt, model, opt, dict(settings=settings, step=step, history=history,
                                                   elapsed=now - t0, sliding=sliding.state_dict(),
                                                   last_exact={str(k): v for k, v in last_exact.items()}))

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
    result = dict(schema=SCHEMA, name=name, model=model.name, task=task.name, method=cfg.method,
                  method_flavour=method, rank=cfg.rank, params=n_params, length=task.length,
                  answer_tokens=sum(len(e.answer) for e in ex), noise=task.noise, seed=cfg.seed,
                  steps=step, stopped_at=stopped_at, targets=list(lcfg["targets"]),
                  layers=model.lora_config["layers"], preset=cfg.preset, lr=cfg.lr, batch_size=cfg.batch_size,
                  grad_accum=cfg.grad_accum, n_samples=len(ex), data=cfg.data, text=cfg.text, ot_fallback=cfg.ot_fallback,
                  **{k: v for k, v in res.items() if k != "per_sample"}, **extra,
                  time_s=round(time.perf_counter() - t0, 2),
                  wall_s=round(time.perf_counter() - t_start, 2), history=history, per_sample=res["per_sample"])
    if rank != 0:
        return result
    out.mkdir(parents=True, exist_ok=True)
    save_adapter(model, out / name)
    atomic_json(res_path, result)
    import shutil

    shutil.rmtree(ckpt, ignore_errors=True)
    print(f"done: ΔL = {result['delta_loss']:.4f} (L_init {result['loss_init']:.4f} -> {result['loss_final']:.4f}), "
          f"token acc {result['token_acc']:.3f}, exact match {result['exact_match']:.3f}, stubborn {result['stubborn']}, "
          f"first failure {result['first_failure']}" + (f", stopped at step {stopped_at}" if stopped_at is not None else "")
          + (f", held-out EM {extra['heldout_exact_match']:.3f}" if "heldout_exact_match" in extra else "")
          + f" | {result['time_s']:.1f}s -> {res_path}")
    return result


def micro_step(model, batch, method, cfg, pad, prefix, sliding, last_exact, n_micro, rank, world) -> dict:
    """Forward, MemFT weights and backward for one micro-batch; returns this process's tallies."""
    # Data parallel: split the batch over processes when it divides evenly; otherwise every
    # process runs the whole batch (FSDP needs them in lockstep) and takes 1/world of it.
    split = world > 1 and len(batch) % world == 0
    share = 1.0 if split or world == 1 else 1.0 / world
    batch = batch[rank::world] if split else batch
    loss_t, pred, y = answer_losses(model, batch, pad, prefix)  # flat over the answer tokens
    dev = loss_t.device
    lens = torch.tensor([len(e.answer) for e in batch])
    mask = (torch.arange(int(lens.max()))[None] < lens[:, None]).to(dev)  # (B, A) answer space
    lba = torch.zeros(mask.shape, device=dev)
    lba[mask] = loss_t.detach()
    wrong = torch.zeros(mask.shape, dtype=torch.bool, device=dev)
    wrong[mask] = pred != y
    E = 1.0
    ids = [e.id for e in batch]
    if method == "sw_window":
        E = sliding.update(ids, anchor_positions(mask, wrong)).to(dev)
        if split:  # a sample may land on another process next time: every process keeps every window
            allmerge(sliding.samples, ids, world)
    w, info = method_weights(method, lba, mask, wrong, E, ot_fallback=cfg.ot_fallback)
    if split and method in ("ot", "sw_curriculum") and info["n_sub"] == 0 and allsum(info["n_sub"], world) > 0:
        w, info["skipped"] = torch.zeros_like(w), False  # the fallback is decided on the whole batch
    for e, row_ok in zip(batch, (~wrong | ~mask).all(dim=1).tolist()):
        last_exact[e.id] = row_ok
    if split:
        allmerge(last_exact, ids, world)
    norm = allsum(w[mask].sum(), world) if split else None  # Σw over the whole batch
    loss = weighted_loss(loss_t, w[mask], norm) * share / n_micro
    if not info["skipped"]:
        loss.backward()
    return dict(loss=float(loss.detach()), ce=float(loss_t.detach().sum()) * share, n_tok=float(mask.sum()) * share,
                n_sub=info["n_sub"] * share, skipped=float(info["skipped"]), max_ce=float(loss_t.detach().max()))


def memorized(model, ex, pad, prefix, last_exact, step, every, world=1) -> bool:
    """Phase boundary: every answer token has p > 0.5 with dropout off (then greedy recall is exact)."""
    due = all(last_exact.get(e.id, False) for e in ex) or (step > 0 and step % every == 0)
    if not allsum(float(due), world):  # every process decides alike
        return False
    model.eval()
    tf = teacher_forced(model, ex, pad, prefix=prefix)
    model.train()
    return all(bool((loss < LN2).all()) for loss, _ in tf)


def run_grid(cfg: Config, sweep: dict) -> None:
    """Run every combination one after another; finished runs are skipped, so a killed sweep resumes.

    Under torchrun each process takes every world-th run (no FSDP then: runs are independent).
    """
    from dataclasses import replace
    from itertools import product

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    axes = dict(rank=(sweep["ranks"], int), length=(sweep["lengths"], int), noise=(sweep["noises"], float),
                method=(sweep["methods"], str))
    values = {k: [conv(x) for x in v.split(",")] if v else [getattr(cfg, k)] for k, (v, conv) in axes.items()}
    grid = [replace(cfg, name=None, **dict(zip(values, combo))) for combo in product(*values.values())]
    mine = grid[rank::world]
    t0, done_here = time.perf_counter(), 0
    for i, c in enumerate(mine):
        if (Path(c.out) / f"{c.run_name()}.json").exists():
            print(f"[{i + 1}/{len(mine)}] {c.run_name()}: done already, skipped")
            continue
        left = len(mine) - i
        eta = "" if not done_here else f", ETA {fmt_time((time.perf_counter() - t0) / done_here * left)}"
        print(f"[{i + 1}/{len(mine)}] {c.run_name()}{eta}", flush=True)
        main(c)
        done_here += 1
    print(f"sweep finished: {len(mine)} runs in {fmt_time(time.perf_counter() - t0)}")


def parse(argv=None) -> tuple[Config, dict]:
    import argparse

    c = Config()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model and data")
    g.add_argument("--model", default=c.model, help="'default' (built-in SmolLM2-135M), a folder, or a hub id")
    g.add_argument("--task", default=c.task, help="phonebook | longctx | linear (default %(default)s)")
    g.add_argument("--length", type=int, default=c.length, help="answer tokens ℓ (PhoneBook: digits) (default %(default)s)")
    g.add_argument("--noise", type=float, default=None, help="longctx: fraction ρ of random tokens (default 1.0)")
    g.add_argument("--data", default=None, help="the paper's jsonl instead of generated data")
    g.add_argument("--text", default=None, help="longctx: a plain-text file of clean prose (default: built-in)")
    g.add_argument("--samples", type=int, default=c.samples, help="linear: train pairs (as many held out)")
    g = ap.add_argument_group("adapter")
    g.add_argument("--rank", type=int, default=c.rank, help="LoRA rank r (default %(default)s)")
    g.add_argument("--preset", default=c.preset, help="paper (mlp probe, 2/3 depth) | standard (q,v all layers)")
    g.add_argument("--targets", default=None, help="comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,mlp")
    g.add_argument("--layers", default=None, help="comma list of layer indices (default: preset's)")
    g.add_argument("--alpha", type=float, default=None, help="standard preset: s = alpha/r (default alpha = r)")
    g.add_argument("--dropout", type=float, default=None, help="adapter dropout (default: preset's)")
    g = ap.add_argument_group("method and optimisation")
    g.add_argument("--method", default=c.method, help="sft | ot | sw (MemFT) (default %(default)s)")
    g.add_argument("--sw-flavour", default=None, help="window | curriculum (default: window for longctx)")
    g.add_argument("--ot-fallback", default=c.ot_fallback, help="when no token is sub-threshold: sft | skip")
    g.add_argument("--lr", type=float, default=c.lr, help="AdamW peak lr, linear decay (default %(default)s)")
    g.add_argument("--epochs", type=int, default=c.epochs, help="passes over the data (default %(default)s; ignored with --steps)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=c.batch_size)
    g.add_argument("--grad-accum", type=int, default=c.grad_accum)
    g.add_argument("--seed", type=int, default=c.seed)
    g.add_argument("--stop-when-memorized", action="store_true", help="stop once every answer token has p > 0.5")
    g.add_argument("--eval-every", type=int, default=c.eval_every, help="with --stop-when-memorized: check period")
    g = ap.add_argument_group("output")
    g.add_argument("--out", default=c.out, help="results folder (default %(default)s)")
    g.add_argument("--name", default=None, help="run name (default from the settings)")
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
    g.add_argument("--device", default=None)
    g = ap.add_argument_group("sweeps")
    g.add_argument("--ranks", default=None, help="comma list: run every rank (skips finished runs)")
    g.add_argument("--lengths", default=None, help="comma list: run every length")
    g.add_argument("--noises", default=None, help="comma list: run every noise ratio")
    g.add_argument("--methods", default=None, help="comma list: run every method")
    a = vars(ap.parse_args(argv))
    sweep = {k: a.pop(k) for k in ("ranks", "lengths", "noises", "methods")}
    return Config(**a), sweep


def cli(argv=None) -> None:
    cfg, sweep = parse(argv)
    try:
        if any(sweep.values()):
            run_grid(cfg, sweep)
        else:
            main(cfg)
    except (RunError, ModelError, DataError, LoraError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
