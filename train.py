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
own facts (task facts, preset facts, the run named after the file and a hash of its content).

Reading order: `train_step` (one micro-batch, top to bottom: forward, per-token loss, MemFT weights,
backward), then `train` (the loop) and `run` (one run, from data and model to results file). The
loss is memft.weighted_loss and MemFT's token weights come from memft.method_weights. Beside the
teaching path, each module with one job: settings.py (Config, the command line, its checks), runs.py
(run identity, files, locks, checkpoints, sweeps), parallel.py (data parallelism; in one process it
hands every batch back unchanged), facts.py (--until-recalled, --rank auto, the certificate, merging),
locality.py (what facts cost the rest of the model, and the KL term that keeps it small).
"""

import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from convert import ConvertError, resolve_model_dir
from data import SYSTEM, DataError, Example, file_sha256, load_tokenizer, make_task
from eval import LN2, PrefixCache, answer_losses, evaluate, sampled_recall, teacher_forced
from facts import adding, until_recalled, write_merged
from locality import preserve
from lora import LoraError, adapter_config, adapter_disabled, add_lora, load_adapter, lora_parameters
from memft import (SlidingState, anchor_positions, curriculum_boundaries, curriculum_size, method_weights,
                   weighted_loss)
from model import ModelError, default_device_dtype, load_model
from parallel import Processes, shard
from runs import (RunFiles, StopRequest, base_model_path, find_checkpoint, fmt_time, interrupted_line,
                  load_checkpoint, preserve_weight, refuse_other_settings, return_freed_memory, run_grid, save_checkpoint, start_run,
                  write_results)
from settings import (Config, RunError, RunInterrupted, check, parse, resolve_lora, resolve_method,
                      with_paper_schedule)

SCHEMA = 2  # 2: results carry `settings` and `processes`


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


def learning_rate(cfg: Config, step: int, total: int, recalled_at: int | None = None) -> float:
    """AdamW's lr at `step` of `total`: constant, or linear decay to 0 (the paper), no warmup either way.
    Settling (--settle, from `recalled_at` to settle_end): from the lr at recall linearly down to 0."""
    if cfg.settle and recalled_at is not None:
        end = settle_end(recalled_at, total)
        return learning_rate(cfg, recalled_at, total) * (end - step) / (end - recalled_at)
    return cfg.lr if cfg.schedule == "constant" else cfg.lr * (1 - step / total)


def settle_end(recalled_at: int, total: int) -> int:
    """--settle: as many steps again as it took to memorize, within the budget."""
    return min(total, 2 * recalled_at)


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
                n_off=int((w[mask] < 0.5).sum()),  # answer tokens MemFT took (mostly) out of the loss
                skipped=info["skipped"], max_ce=float(losses[mask].max()))


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
    regulariser: Callable[[torch.nn.Module, int], float] | None = None  # adds its term's gradient; returns its value


def train(t: Trainer) -> dict:
    """The loop: resume if a checkpoint exists, then one optimizer step per planned step. Returns the training record."""
    cfg, model, procs = t.cfg, t.model, t.procs
    say = print if procs.rank == 0 else (lambda *a, **k: None)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    state = MemState()
    total = len(t.plan)
    step, history, elapsed, stopped_at, saved_at, reason, snaps, recalled_at = 0, [], 0.0, None, None, None, [], None
    saved = find_checkpoint(t.files.ckpt)
    if saved is not None:
        refuse_other_settings(saved.get("settings"), t.settings, t.files.ckpt)
        st = load_checkpoint(t.files.ckpt, model, opt, procs)
        step, history, elapsed, stopped_at = st["step"], st["history"], st["elapsed"], st["stopped_at"]
        reason, snaps, recalled_at = st["stop_reason"], st["snapshots"], st.get("recalled_at")
        state.load_state_dict(st["memft"])
        saved_at = step
        say(f"resuming {t.files.name} from step {step}/{total}")
    save_every = cfg.save_every or max(1, total // 10)
    snap_at = set(cfg.snapshot_steps())

    def checkpoint(now: float) -> None:
        save_checkpoint(t.files.ckpt, model, opt, dict(settings=t.settings, step=step, history=history,
                                                       elapsed=now - t0, stopped_at=stopped_at, stop_reason=reason,
                                                       snapshots=snaps, recalled_at=recalled_at,
                                                       memft=state.state_dict()), procs)

    model.train()
    t0 = time.perf_counter() - elapsed
    t_loop, step0 = time.perf_counter(), step
    with StopRequest() as stop:
        while step < total and stopped_at is None:
            if cfg.stop_when_memorized and recalled_at is None and memorized(model, t.examples, t.pad, t.prefix, state,
                                                                             step, cfg.eval_every):
                recalled_at = step
                if not cfg.settle:
                    stopped_at, reason = step, "memorized"
                    break
            if cfg.settle and recalled_at is not None and step == settle_end(recalled_at, total):
                stopped_at, reason = step, "settled"  # the lr annealed to 0: with the KL term, the rest of
                break                                  # the model has been pulled back
            if cfg.stop_at_plateau and plateaued(history, step, cfg.eval_every, cfg.stop_at_plateau):
                stopped_at, reason = step, "plateau"
                break
            lr = learning_rate(cfg, step, total, recalled_at)
            for g in opt.param_groups:
                g["lr"] = lr
            micro = t.plan[step]
            rec = dict(loss=0.0, ce_sum=0.0, n_tok=0, n_sub=0, n_off=0, skipped=0, max_ce=0.0)
            for idx in micro:
                r = train_step(model, [t.examples[i] for i in idx], t.method, cfg.ot_fallback, t.pad, t.prefix,
                               state, len(micro), procs)
                rec = {k: max(rec[k], r[k]) if k == "max_ce" else rec[k] + r[k] for k in rec}
            kl = t.regulariser(model, step) if t.regulariser else None  # facts: KL to the base model on other text
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
                                max_ce=round(rec["max_ce"], 6), n_sub=rec["n_sub"], n_tok=rec["n_tok"],
                                reweighted=round(rec["n_off"] / rec["n_tok"], 4), em=round(em, 4), lr=lr,
                                skipped=rec["skipped"] == len(micro), time_s=round(now - t0, 3),
                                **({} if kl is None else dict(kl=round(kl, 6)))))
            if step in snap_at:  # the same measurements as the end of a run, minus the decoder check
                snaps.append(snapshot(model, t.examples, t.loss_init, t.pad, t.prefix, step))
            per_step = (now - t_loop) / (step - step0)
            if step == total or step % max(1, total // 20) == 0 or step - step0 <= 1:
                say(f"step {step}/{total} | loss {rec['loss']:.4f} | ce {rec['ce_sum'] / rec['n_tok']:.4f} | "
                    f"sub-threshold {rec['n_sub']}/{rec['n_tok']} | em(train) {em:.2f} | lr {lr:.2e} | "
                    + ("" if kl is None else f"kl {kl:.4f} | ") +
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
    return dict(steps=step, stopped_at=stopped_at, stop_reason=reason or "budget", recalled_at=recalled_at,
                snapshots=snaps, history=history, time_s=time.perf_counter() - t0)


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
    if cfg.add_to:  # adding facts (facts.adding): start from the stored facts' adapter
        load_adapter(model, cfg.add_to)
        n_params = sum(p.numel() for p in lora_parameters(model))
    else:
        n_params = add_lora(model, cfg.rank, **lcfg)
    # Saved with the adapter: the base model and its real folder (for PEFT), the prompt format (for eval.py).
    adapter_info = dict(base_model=cfg.model, base_model_path=base_model_path(cfg.model, folder), prompt=dict(
        system=SYSTEM, systems=task.systems, chat_template_kwargs=dict(enable_thinking=False)))
    if cfg.data:  # what eval.py --certify measures again, refused when the file changed
        adapter_info["data"] = dict(path=str(Path(cfg.data).resolve()), sha256=file_sha256(cfg.data))
    if cfg.add_to:  # where its stored facts came from
        adapter_info["added_to"] = dict(path=str(Path(cfg.add_to).resolve()),
                                        sha256=file_sha256(Path(cfg.add_to) / "adapter.safetensors"))
    layers = adapter_config(model)["layers"]
    prefix = PrefixCache(model, min(layers), cfg.prefix_cache_mb) if min(layers) > 0 else None
    if procs.world > 1:
        shard(model, procs.world)
        if prefix is not None and not prefix.fill(ex):  # processes must run layers in lockstep
            prefix = None

    with adapter_disabled(model):  # L_init: the frozen model's loss, computed once
        loss_init = [loss for loss, _ in teacher_forced(model, ex, pad, prefix=prefix)]
    plan = schedule(len(ex), cfg, method, task.length, boundaries)
    # Facts keep the rest of the model: λ·KL(base ‖ adapted) on held-out general prompts and prose (locality.py).
    weight = preserve_weight(cfg)
    reg = preserve(model, tok, folder, pad, min(layers), procs, weight=weight) if weight > 0 else None
    if procs.rank == 0:
        if method == "sw_curriculum" and len(ex) <= cfg.batch_size:
            print(f"note: {len(ex)} samples fit in one batch of {cfg.batch_size}, so the curriculum is active from "
                  f"the start: MemFT-SW here is MemFT-OT (skip fallback) in a fixed order")
        l_init = sum(float(x.sum()) for x in loss_init) / sum(len(x) for x in loss_init)
        print(f"{files.name}: {task.name}, {len(ex)} examples, ℓ = {task.length} answer tokens, rank {cfg.rank} "
              f"{','.join(lcfg['targets'])} @ layers {layer_list(layers, model.args.n_layers)}, {n_params:,} params, "
              f"method {method}, {len(plan)} steps, L_init = {l_init:.3f}"
              + (f", {procs.world} processes" if procs.world > 1 else "")
              + (f", preserve: λ·KL to the base on {len(reg.items)} general prompts and prose pieces, "
                 f"{len(reg.chunks[0])} a step" if reg else ""))
    trained = train(Trainer(cfg, model, ex, loss_init, plan, method, pad, prefix, procs, files, settings, reg))

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
                  stopped_at=trained["stopped_at"], stop_reason=trained["stop_reason"],
                  **({"recalled_at": trained["recalled_at"]} if cfg.settle else {}), schedule=cfg.schedule,
                  paper_schedule=cfg.paper_schedule, targets=list(lcfg["targets"]),
                  layers=layers, preset=cfg.preset, lr=cfg.lr, batch_size=cfg.batch_size,
                  grad_accum=cfg.grad_accum, epochs=None if cfg.steps is not None else cfg.epochs,
                  n_samples=len(ex), data=cfg.data, text=cfg.text,
                  ot_fallback=cfg.ot_fallback, processes=procs.world, settings=settings,
                  preserve=reg.settings() if reg else None,
                  **{k: v for k, v in res.items() if k != "per_sample"}, **extra,
                  time_s=round(trained["time_s"], 2), wall_s=round(time.perf_counter() - t_start, 2),
                  snapshots=trained["snapshots"], history=trained["history"], per_sample=res["per_sample"])
    if procs.rank == 0:
        write_results(files, model, result, adapter_info)
    procs.barrier()  # the files exist before any process moves on (a sweep's next run looks for them)
    return result


def layer_list(layers: list[int], n_layers: int) -> str:
    """The adapted layers, for the run's header: all, a range (20..29) or a list (3,7,11)."""
    if layers == list(range(n_layers)):
        return "all"
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ",".join(map(str, layers))


def cli(argv: list[str] | None = None) -> None:
    cfg, sweep = parse(argv, __doc__)
    first = int(os.environ.get("RANK", 0)) == 0  # under torchrun, one process speaks for all
    try:
        if any(sweep.values()):
            if cfg.until_recalled or cfg.rank == "auto" or cfg.add_to:
                raise RunError("--until-recalled and --add-to make one run (--rank auto makes its own attempts); "
                               "drop the sweep lists")
            run_grid(cfg, sweep, main)
        elif cfg.until_recalled:
            until_recalled(adding(cfg), main)
        else:
            main(adding(cfg))
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
