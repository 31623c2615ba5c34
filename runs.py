"""Run management around train.py's loop: which settings identify a run, its files, one launch at a
time, checkpoints that resume exactly (under torchrun too), Ctrl-C, results written atomically, and
sweeps.

A finished run is reused only when every setting that changes its numbers matches (`identity`);
otherwise the run stops and names the settings that differ. A killed run started again with the
same command resumes from <out>/<name>.ckpt/.
"""

import json
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from data import file_sha256
from locality import WEIGHT
from lora import atomic_dir, lora_parameters, save_adapter
from parallel import Processes
from settings import Config, RunError, check


# Settings that change only speed, memory, where files go or how often they are written. Every
# other setting changes the numbers, so a finished run or a checkpoint is reused only when all of
# those match (`identity`).
# --until-recalled changes a run only through --stop-when-memorized, which it sets; --rank auto's options choose
# which runs to make, and each of those runs is named and identified by its own rank.
NOT_IDENTITY = ("out", "name", "overwrite", "save_every", "prefix_cache_mb", "activation_checkpointing", "compile",
                "merge_to", "until_recalled", "max_rank", "plan_from")


LATER = {"preserve": None, "add_to": None, "settle": False}  # settings added after the study's results were written:
# left out at their default (settle: as settled, off unless a facts run with the KL term)


def identity(cfg: Config, processes: int) -> dict:
    """Everything that determines a run's numbers: the settled settings, the number of processes and
    the data file's content (an edited file is other data under the same name). Settings added later
    are left out at their default, so that earlier results keep their identity; a facts run records the
    λ it trained with."""
    data = {"data_sha256": file_sha256(cfg.data)} if cfg.data else {}
    if cfg.add_to:  # the adapter it starts from, by content
        data["add_to_sha256"] = file_sha256(Path(cfg.add_to) / "adapter.safetensors")
    same = {k: v for k, v in asdict(cfg).items() if k not in NOT_IDENTITY and not (k in LATER and v in (None, LATER[k]))}
    if cfg.task == "facts":
        same["preserve"] = preserve_weight(cfg)
    return same | {"processes": processes} | data


def preserve_weight(cfg: Config) -> float:
    """λ of the facts runs' KL term: --preserve, else locality.WEIGHT for facts (docs/placement.py's table) and 0
    for every other task."""
    return (WEIGHT if cfg.task == "facts" else 0.0) if cfg.preserve is None else cfg.preserve


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


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


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
    """One launch at a time per run: an exclusive flock on <out>/<name>.lock, which holds the owner's pid and host.

    The OS drops a flock when its process dies, however it dies: a lock file that a killed run left behind
    blocks nothing, and the next launch takes it over (saying whose it was).
    """

    def __init__(self, path: Path) -> None:
        self.path, self.fh = path, None

    def acquire(self) -> None:
        import fcntl

        fh = open(self.path, "a+")
        fh.seek(0)
        left = fh.read().split()  # [pid, host] of a launch that never released the lock; empty after a release
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            owner = fh.read().split()  # again: the holder may have written itself in meanwhile
            fh.close()
            raise RunError(self.held_by(owner)) from None
        if left:
            print(f"note: {self.path} was left by process {left[0]}, which ended without releasing it (killed?); "
                  f"this launch takes the run over", file=sys.stderr, flush=True)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()} {socket.gethostname()}\n")
        fh.flush()
        self.fh = fh

    def held_by(self, owner: list[str]) -> str:
        """Why the lock cannot be taken, naming its holder."""
        pid = owner[0] if owner else "unknown"
        here = len(owner) < 2 or owner[1] == socket.gethostname()
        if here and pid.isdigit() and not alive(int(pid)):
            return (f"this run's lock {self.path} is held, but process {pid}, which took it, has ended: a process it "
                    f"started still holds it (`fuser {self.path}` names it); end that one, or choose another --name")
        where = "" if here else f" on {owner[1]}"
        return (f"this run is already running in process {pid}{where} (lock {self.path}); wait for it to finish, or "
                f"choose another --name")

    def release(self) -> None:
        if self.fh is not None:
            self.path.unlink(missing_ok=True)
            self.fh.close()
            self.fh = None


def alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
          + (f", memorized at step {r['recalled_at']}" if r.get("recalled_at") is not None else "")
          + (f", held-out EM {r['heldout_exact_match']:.3f}" if "heldout_exact_match" in r else "")
          + f" | {r['time_s']:.1f}s -> {files.result}")
    if "mlp" in r["targets"]:
        print(f"note: the whole-MLP probe (target mlp, the paper preset) has no PEFT form: {files.adapter} holds "
              f"our format only (eval.py loads it; PEFT cannot); --preset standard exports to PEFT and merges")
    elif r["task"] == "facts":
        print(f"ask it: python eval.py --adapter {files.adapter} --prompt QUERY (formatted as in training)")


def run_grid(cfg: Config, sweep: dict, run_one: Callable[[Config], dict]) -> None:
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
        run_one(c)
        done_here += 1
    say(f"sweep finished: {len(grid)} runs in {fmt_time(time.perf_counter() - t0)}")


def interrupted_line(cfg: Config) -> str:
    """What a hard Ctrl-C leaves behind, in one line."""
    if cfg.rank == "auto":
        return "interrupted: run the same command to resume (finished attempts are reused, the current one resumes)"
    ckpt = RunFiles(Path(cfg.out), cfg.run_name()).ckpt
    st = find_checkpoint(ckpt) if ckpt.parent.is_dir() else None
    if st is None:
        return "interrupted: nothing was saved for this run; run the same command to start it again"
    return f"interrupted: the checkpoint at step {st['step']} is in {ckpt}; run the same command to resume"
