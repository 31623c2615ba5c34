"""KV-cached greedy decoding and exact-recall metrics.

    python eval.py --prompt "What is the capital of France?"          # greedy reply of the built-in model
    python eval.py --model DIR --prompt "Hi" --max-new-tokens 64

    from eval import generate
    new_ids = generate(model, prompt_ids, max_new_tokens=32, eos_id=tok.eos_id)
"""

import sys
import time

import torch

from data import DataError, load_tokenizer
from model import ModelError, load_model


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int, eos_id=None) -> list[int]:
    """Greedy decoding: one prefill over the prompt, then one token per step into a preallocated cache."""
    dev = model.lm_head.weight.device
    idx = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=dev)[None]  # (1, P)
    P = idx.shape[1]
    cache = model.new_cache(batch=1, max_len=P + max_new_tokens)
    logits = model(idx, pos0=0, cache=cache, last_only=True)  # (1, 1, V)
    out = []
    for i in range(max_new_tokens):
        tok = logits[0, -1].argmax()
        out.append(int(tok))
        if out[-1] == eos_id or i == max_new_tokens - 1:
            break
        logits = model(tok.view(1, 1), pos0=P + i, cache=cache)
    return out


def main(model: str, prompt: str, max_new_tokens: int, system: str | None) -> None:
    tok = load_tokenizer(model)
    m = load_model(model)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    t0 = time.perf_counter()
    out = generate(m, ids, max_new_tokens, eos_id=tok.eos_id)
    dt = time.perf_counter() - t0
    print(tok.decode(out, skip_special_tokens=True))
    print(f"[{len(out)} tokens in {dt:.2f}s, {len(out) / dt:.1f} tok/s]", file=sys.stderr)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Greedy (KV-cached) reply of a model to one prompt.")
    ap.add_argument("--model", default="default", help="'default' (built-in SmolLM2-135M), a folder, or a hub id")
    ap.add_argument("--prompt", required=True, help="the user message")
    ap.add_argument("--system", default=None, help="optional system message")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    a = ap.parse_args()
    try:
        main(a.model, a.prompt, a.max_new_tokens, a.system)
    except (ModelError, DataError) as e:
        sys.exit(f"error: {e}")
