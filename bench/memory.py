"""Peak memory of one LoRA training step at 4096 answer tokens: chunked CE, full logits, transformers + PEFT.

    python bench/memory.py                     # built-in SmolLM2-135M, fp32, rank-16 q,v LoRA on every layer
    python bench/memory.py --answer-tokens 1024

Each variant runs in a fresh child process, which loads the model, adds the adapter, builds the
optimizer and reads every weight once (safetensors maps the file lazily), then records its resident
memory (VmRSS), resets the kernel's high-water mark and runs one step (forward + backward + AdamW). The step's cost is the new high-water mark minus that
baseline. One JSON line per variant, then the ratios ours / PEFT (below 1 means we use less).
  ours_chunked   answer_losses: the head and CE walk the answer in chunks, never holding (T, V) logits
  ours_chunked_ckpt  the same with --activation-checkpointing (each layer recomputed in backward)
  ours_full      model.head(h) on every position, then memft.token_loss: the textbook way
  peft           transformers + PEFT, the standard labels-based loss
  peft_fixed_mmap  the same with glibc's mmap threshold fixed, as train.py sets it for itself
Our variants run as train.py does, with runs.return_freed_memory() (freed buffers go back to the
OS at once); peft_fixed_mmap gives the peer the same setting, so the code's own saving shows apart
from the allocator's.
"""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

VARIANTS = ("ours_chunked", "ours_chunked_ckpt", "ours_full", "peft", "peft_fixed_mmap")
RANK = 16


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since start or the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(variant: str, answer_tokens: int, threads: int) -> dict:
    """Set up one variant, then measure the resident-memory growth of a single training step."""
    torch.set_num_threads(threads)
    from train_step import make_example

    from runs import return_freed_memory

    if variant != "peft":
        return_freed_memory()

    from data import collate, load_tokenizer

    tok = load_tokenizer("default")
    ex = make_example(tok, answer_tokens)
    pad = tok.eos_id
    if variant.startswith("peft"):
        import peft
        from transformers import AutoModelForCausalLM

        from convert import builtin_model_dir

        hf = AutoModelForCausalLM.from_pretrained(builtin_model_dir(), dtype=torch.float32)
        m = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["q_proj", "v_proj"]))
        params = [p for p in m.parameters() if p.requires_grad]
        ids = torch.tensor([ex.prompt + ex.answer])
        labels = torch.tensor([[-100] * len(ex.prompt) + ex.answer])

        def loss_fn():
            return m(input_ids=ids, labels=labels).loss
    else:
        from convert import resolve_model_dir
        from eval import answer_losses
        from lora import add_lora, lora_parameters
        from memft import token_loss, weighted_loss
        from model import load_model

        m = load_model(resolve_model_dir("default"), checkpoint_layers=variant == "ours_chunked_ckpt")
        add_lora(m, RANK, ("q_proj", "v_proj"))
        params = lora_parameters(m)
        ids, labels = collate([ex], pad)

        def loss_fn():
            if variant.startswith("ours_chunked"):
                loss, _, _ = answer_losses(m, [ex], pad)  # (A,) per answer token
                return weighted_loss(loss, torch.ones_like(loss))
            logits = m.head(m.run_layers(m.embed(ids)))  # (1, T, V): the whole vocabulary at every position
            loss = token_loss(logits, labels)  # (1, T)
            return weighted_loss(loss, (labels != -100).float())

    m.train()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    with torch.no_grad():  # page in every weight now: safetensors maps the file, and the step must not pay for that
        for p in m.parameters():
            p.sum()
    import gc

    gc.collect()
    base = rss_mb("VmRSS")
    hwm_reset = reset_peak()
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    loss_fn().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - t0
    # Without a resettable high-water mark, ru_maxrss still holds the loading peak: use it only as a fallback.
    peak = rss_mb("VmHWM") if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(variant=variant, answer_tokens=answer_tokens, seq_tokens=len(ex.prompt) + len(ex.answer),
                baseline_mb=round(base, 1), peak_mb=round(peak, 1), step_mb=round(peak - base, 1),
                step_s=round(step_s, 2), peak_reset=hwm_reset, maxrss_before_mb=round(maxrss0, 1))


def main(answer_tokens: int, threads: int, variants: list[str]) -> None:
    rows = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--child", v, "--answer-tokens", str(answer_tokens), "--threads", str(threads)]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"error: variant {v} failed (exit {r.returncode}): {tail}", file=sys.stderr)
            continue
        rows[v] = json.loads(r.stdout.strip().splitlines()[-1])
        print(json.dumps(dict(bench=f"memory/{v}", **rows[v], threads=threads)), flush=True)
    for peer in ("peft", "peft_fixed_mmap"):
        for v in ("ours_chunked", "ours_chunked_ckpt", "ours_full"):
            if v in rows and peer in rows:
                print(json.dumps(dict(bench=f"memory/{v}_vs_{peer}", answer_tokens=answer_tokens,
                                      ours_mb=rows[v]["step_mb"], peer_mb=rows[peer]["step_mb"],
                                      ratio=round(rows[v]["step_mb"] / rows[peer]["step_mb"], 3),
                                      peer="transformers+peft")), flush=True)
    if len(rows) < len(variants):
        sys.exit(1)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Peak memory of one training step, ours vs transformers+PEFT.")
    ap.add_argument("--answer-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one variant here
    a = ap.parse_args()
    chosen = [v.strip() for v in (a.child or a.variants).split(",") if v.strip()]
    bad = [v for v in chosen if v not in VARIANTS]
    if bad or not chosen:
        sys.exit(f"error: unknown variant {bad[0] if bad else '(none)'!r}; choose from {', '.join(VARIANTS)}")
    if a.answer_tokens <= 0:
        sys.exit("error: --answer-tokens must be positive")
    if a.child:
        print(json.dumps(child(a.child, a.answer_tokens, a.threads)))
    else:
        main(a.answer_tokens, a.threads, chosen)
