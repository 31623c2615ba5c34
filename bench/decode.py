"""Greedy decoding speed next to transformers, plus model load and first-time conversion times.

    python bench/decode.py                     # built-in SmolLM2-135M, fp32, 2 threads
    python bench/decode.py --new-tokens 32 --repeats 3 --no-convert
    OMP_WAIT_POLICY=PASSIVE python bench/decode.py   # on a CPU shared with other jobs (see below)

Prints one JSON line per measurement: ours, the peer's (transformers), and ratio = peer_s / ours_s
(ratio > 1 means we are faster). Both decoders produce exactly `new_tokens` tokens (EOS disabled:
ours gets no eos_id, transformers gets min_new_tokens), and the tokens must be identical.

At batch 1 each new token reads every weight once (538 MB in fp32), so decoding is bound by memory
bandwidth. The `matvec_floor` line times just those matrix-vector products per token: no decoder
written in eager PyTorch at this dtype can beat it.

On a CPU shared with other jobs, OpenMP's spinning workers lose their core and every parallel
region then waits for the scheduler: two-thread timings can come out several times slower, on
both sides. OMP_WAIT_POLICY=PASSIVE avoids that.
"""

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import emit, timed

PROMPT = "Write a long, detailed essay about the history of Paris."


def main(new_tokens: int, repeats: int, warmup: int, convert: bool, threads: int) -> None:
    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    import convert as conv
    from convert import resolve_model_dir
    from data import load_tokenizer
    from eval import generate
    from model import load_model

    folder = conv.builtin_model_dir()
    folder = resolve_model_dir("default")
    load_model(folder)  # first load warms the page cache, so the timed loads measure our code
    load_s = statistics.median(timed(lambda: load_model(folder))[0] for _ in range(3))
    emit(bench="load_model", ours_s=round(load_s, 3), goal_s=2.0, ok=load_s < 2.0)
    if convert:
        with tempfile.TemporaryDirectory() as tmp:
            conv_s, _ = timed(lambda: conv.convert_gguf(conv.find_gguf(), Path(tmp)))
        emit(bench="convert_gguf", ours_s=round(conv_s, 2), goal_s=30.0, ok=conv_s < 30.0)

    model = load_model(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = load_tokenizer("default")
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    x = torch.tensor([ids])

    def ours():
        return generate(model, ids, new_tokens)  # no eos_id: always new_tokens tokens

    @torch.no_grad()
    def peer():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_id)
        return out[0, len(ids):].tolist()

    linears = [mod.weight for mod in model.modules() if isinstance(mod, torch.nn.Linear)]

    @torch.no_grad()
    def floor():  # one token's matrix-vector products, nothing else, repeated new_tokens times
        xs = {d: torch.randn(1, d) for d in {w.shape[1] for w in linears}}
        for _ in range(new_tokens):
            for w in linears:
                torch.nn.functional.linear(xs[w.shape[1]], w)

    for _ in range(warmup):
        ours(), peer(), floor()
    t_ours, t_peer, t_floor = [], [], []
    for _ in range(repeats):  # alternate so drift in machine load hits both sides alike
        dt, a = timed(ours)
        t_ours.append(dt)
        dt, b = timed(peer)
        t_peer.append(dt)
        t_floor.append(timed(floor)[0])
    # transformers' min_new_tokens masks EOS while ours may still pick it; the prompt asks for a long
    # answer so that neither wants to stop, and eos_in_ours says so if ours did.
    identical = a == b
    ours_s, peer_s = statistics.median(t_ours), statistics.median(t_peer)
    emit(bench="greedy_decode", prompt_tokens=len(ids), new_tokens=new_tokens, identical=identical,
         eos_in_ours=tok.eos_id in a, ours_tok_s=round(new_tokens / ours_s, 2),
         peer_tok_s=round(new_tokens / peer_s, 2), ours_s=round(ours_s, 3), peer_s=round(peer_s, 3),
         ratio=round(peer_s / ours_s, 3), peer="transformers", repeats=repeats, threads=threads)
    floor_s = statistics.median(t_floor)
    weight_mb = sum(w.numel() * w.element_size() for w in linears) / 1e6
    emit(bench="matvec_floor", new_tokens=new_tokens, weight_mb=round(weight_mb),
         floor_tok_s=round(new_tokens / floor_s, 2), ours_tok_s=round(new_tokens / ours_s, 2),
         ours_over_floor=round(ours_s / floor_s, 3), peer_over_floor=round(peer_s / floor_s, 3))
    if not identical:
        first = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
        print(f"tokens differ from position {first}: ours {a[first:first + 5]} vs transformers {b[first:first + 5]}",
              file=sys.stderr)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Greedy decode tokens/s, ours vs transformers; load and convert times.")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-convert", dest="convert", action="store_false", help="skip timing the GGUF conversion")
    a = ap.parse_args()
    if a.new_tokens <= 0 or a.repeats <= 0:
        sys.exit("error: --new-tokens and --repeats must be positive")
    main(a.new_tokens, a.repeats, a.warmup, a.convert, a.threads)
