"""One LoRA training step (forward + backward + AdamW) next to transformers + PEFT, with achieved GFLOP/s.

    python bench/train_step.py                 # built-in SmolLM2-135M, fp32, 2 threads, 256 answer tokens
    python bench/train_step.py --answer-tokens 128 --repeats 3
    OMP_WAIT_POLICY=PASSIVE python bench/train_step.py   # on a CPU shared with other jobs (see below)

The sample is a short chat prompt and `answer_tokens` random ordinary token ids (fixed seed), batch 1,
SFT loss over the answer. Variants, each printed as one JSON line with ratio = peer_s / ours_s
(ratio > 1 means we are faster):
  all_layers_qv   ours: rank-16 q,v LoRA on every layer          peer: PEFT, the same
  paper_probe     ours: rank-16 whole-MLP probe on layer 20, frozen-prefix cache, chunked CE
                  peer: PEFT rank-16 q,v LoRA on layer 20 only (PEFT has no whole-MLP adapter)
  one_layer_qv    ours: rank-16 q,v LoRA on layer 20, no prefix cache   peer: as paper_probe's

GFLOP/s divide the matmul FLOPs each side actually executes (see `step_flops`) by its step time,
and `util` compares that with a 2048x2048 fp32 matmul timed in the same run on the same threads.
`step_shapes_util` is what the step's own matmul shapes reach run bare (`shapes_gflops`): the
ceiling for `util` at this size. `flop_ratio` is peer FLOPs / our FLOPs: the speed-up that doing
less work alone gives, at equal GFLOP/s.

On a CPU shared with other jobs, OpenMP's spinning workers lose their core and every parallel
region then waits for the scheduler: two-thread timings can come out several times slower, on
both sides. OMP_WAIT_POLICY=PASSIVE avoids that.
"""

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import best_seconds, emit, matmul_peak_gflops

LAYER = 20  # the paper probes ~2/3 depth: layer 20 of 30 on the built-in model
RANK = 16


def shapes_gflops(args, T: int, head_tokens: int, repeats: int = 5) -> float:
    """GFLOP/s that the step's own matmul shapes reach when run bare, one after another.

    Times each frozen linear layer's forward (x·Wᵀ) and input-gradient (g·W) product at T tokens,
    and the head's on `head_tokens`: the same shapes a training step runs, without anything else.
    Small products use the cores less well than the square `matmul_peak_gflops`; this is what a
    step made of nothing but its matmuls would reach.
    """
    D, I, V = args.dim, args.intermediate_size, args.vocab_size
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = [(T, D, q), (T, D, kv), (T, D, kv), (T, q, D), (T, D, I), (T, D, I), (T, I, D), (head_tokens, D, V)]
    total_flops, total_s = 0.0, 0.0
    for m, k, n in shapes:
        x, w, g = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
        for fn in (lambda: x @ w.t(), lambda: g @ w):  # forward and input gradient, as autograd runs them
            total_flops, total_s = total_flops + 2 * m * k * n, total_s + best_seconds(fn, repeats)
    return total_flops / total_s / 1e9


def step_flops(args, T: int, first_layer: int, run_from: int, head_tokens: int, lora: int) -> float:
    """Matmul FLOPs of one training step, counted from the shapes.

    Forward: 2·(linear params)·T per layer run (layers run_from..L-1), plus the attention core
    QKᵀ and AV, 2·2·H·hd·T²/2 per layer (causal: half the full square), plus the output head
    2·V·D per token it is applied to (ours: answer tokens only; transformers: all T).
    Backward: the base is frozen, so its linear layers compute only input gradients, 1× their
    forward FLOPs, and only above the lowest adapted layer (first_layer..L-1); the attention core
    needs dQ, dK, dV, dP: 2× its forward; the head's backward is 1× its forward on the same tokens.
    LoRA adapters (`lora` parameters in all) cost 2·lora·T forward and about 2× that backward.
    Elementwise work (norms, RoPE, SiLU, softmax) and the optimizer are left out.
    """
    D, L, I = args.dim, args.n_layers, args.intermediate_size
    kv = args.n_kv_heads * args.head_dim
    linear = D * args.n_heads * args.head_dim * 2 + D * kv * 2 + 3 * D * I  # q, o, k, v, gate, up, down
    attn = 2 * args.n_heads * args.head_dim * T * T  # 2 matmuls × 2 FLOPs × H·hd·T²/2
    fwd = (L - run_from) * (2 * linear * T + attn) + 2 * args.vocab_size * D * head_tokens + 2 * lora * T
    bwd = (L - first_layer) * (2 * linear * T + 2 * attn) + 2 * args.vocab_size * D * head_tokens + 4 * lora * T
    return float(fwd + bwd)


def make_example(tok, n_answer: int, seed: int = 0):
    """A chat prompt and `n_answer` random ordinary token ids: the memorization target."""
    from data import Example, chat_prompt, regular_ids

    pool = regular_ids(tok)
    rng = random.Random(seed)
    answer = [pool[rng.randrange(len(pool))] for _ in range(n_answer)]
    prompt = chat_prompt(tok, "Please recite the sequence.")
    return Example(0, prompt, answer, n_answer)


def ours_step_fn(targets, layers, init, dropout, use_prefix, example, pad, compile_layers=False):
    """A closure running one of our training steps, and its (first adapted layer, layers run, params)."""
    from convert import resolve_model_dir
    from data import collate
    from eval import PrefixCache, answer_losses
    from lora import adapter_config, add_lora, lora_parameters
    from memft import weighted_loss
    from model import load_model

    m = load_model(resolve_model_dir("default"), compile_layers=compile_layers)  # train.py --compile
    n = add_lora(m, RANK, targets, layers=layers, init=init, dropout=dropout)
    m.train()
    opt = torch.optim.AdamW(lora_parameters(m), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    first = min(adapter_config(m)["layers"])
    prefix = PrefixCache(m, first) if use_prefix and first > 0 else None
    if prefix is not None:  # warm it once: training reuses the frozen layers' output every step
        prefix.batch([example], collate([example], pad)[0])

    def step():
        loss, _, _ = answer_losses(m, [example], pad, prefix)  # chunked CE over the answer only
        weighted_loss(loss, torch.ones_like(loss)).backward()  # SFT: w = v
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, first, (first if prefix is not None else 0), n


def peer_step_fn(layers, example):
    """One transformers + PEFT step: full logits, the standard labels-based CE."""
    import peft
    from transformers import AutoModelForCausalLM

    from convert import builtin_model_dir

    hf = AutoModelForCausalLM.from_pretrained(builtin_model_dir(), dtype=torch.float32)
    cfg = peft.LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          layers_to_transform=layers)
    pm = peft.get_peft_model(hf, cfg)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    ids = torch.tensor([example.prompt + example.answer])  # (1, T + 1): transformers shifts labels itself
    labels = torch.tensor([[-100] * len(example.prompt) + example.answer])

    def step():
        pm(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    first = min(layers) if layers else 0
    return step, first, sum(p.numel() for p in params)


def compare(ours, peer, warmup, repeats):
    """Median seconds of each side, alternating ours/peer so machine drift hits both alike."""
    for _ in range(warmup):
        ours(), peer()
    t_ours, t_peer = [], []
    for _ in range(repeats):
        for fn, ts in ((ours, t_ours), (peer, t_peer)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(t_ours), statistics.median(t_peer)


def main(answer_tokens: int, repeats: int, warmup: int, threads: int, variants: list[str]) -> None:
    torch.set_num_threads(threads)
    from convert import resolve_model_dir
    from data import load_tokenizer
    from model import ModelArgs, read_config

    tok = load_tokenizer("default")
    args = ModelArgs.from_config(read_config(resolve_model_dir("default")))
    ex = make_example(tok, answer_tokens)
    pad = tok.eos_id
    T = len(ex.prompt) + len(ex.answer) - 1  # positions our model runs; transformers runs T + 1
    peak = matmul_peak_gflops()
    bare = shapes_gflops(args, T, answer_tokens)
    emit(bench="matmul_peak", n=2048, gflops=round(peak, 1), step_shapes_gflops=round(bare, 1),
         step_shapes_util=round(bare / peak, 3), threads=threads)
    L = args.n_layers
    setups = {
        "all_layers_qv": (("q_proj", "v_proj"), None, "standard", 0.0, False, None),
        "paper_probe": (("mlp",), [LAYER], "paper", 0.1, True, [LAYER]),
        "one_layer_qv": (("q_proj", "v_proj"), [LAYER], "standard", 0.0, False, [LAYER]),
    }
    for name in variants:
        compiled = name.endswith("_compiled")
        targets, layers, init, dropout, use_prefix, peer_layers = setups[name.removesuffix("_compiled")]
        ours, first, run_from, n_ours = ours_step_fn(targets, layers, init, dropout, use_prefix, ex, pad, compiled)
        peer, peer_first, n_peer = peer_step_fn(peer_layers, ex)
        ours_s, peer_s = compare(ours, peer, warmup, repeats)
        f_ours = step_flops(args, T, first, run_from, answer_tokens, n_ours)
        f_peer = step_flops(args, T + 1, peer_first, 0, T + 1, n_peer)
        g_ours, g_peer = f_ours / ours_s / 1e9, f_peer / peer_s / 1e9
        emit(bench=f"train_step/{name}", answer_tokens=answer_tokens, seq_tokens=T + 1,
             ours_s=round(ours_s, 3), peer_s=round(peer_s, 3), ratio=round(peer_s / ours_s, 3),
             ours_params=n_ours, peer_params=n_peer, ours_layers_run=L - run_from,
             ours_gflop=round(f_ours / 1e9, 1), peer_gflop=round(f_peer / 1e9, 1),
             ours_gflops=round(g_ours, 1), peer_gflops=round(g_peer, 1),
             ours_util=round(g_ours / peak, 3), peer_util=round(g_peer / peak, 3),
             flop_ratio=round(f_peer / f_ours, 3),  # the ratio if both sides ran at the same GFLOP/s
             peer="transformers+peft", repeats=repeats, threads=threads)
        del ours, peer


if __name__ == "__main__":
    import argparse

    names = ["all_layers_qv", "paper_probe", "one_layer_qv", "all_layers_qv_compiled", "paper_probe_compiled"]
    ap = argparse.ArgumentParser(description="One LoRA training step, ours vs transformers+PEFT.")
    ap.add_argument("--answer-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(names), help=f"comma list of {', '.join(names)}")
    a = ap.parse_args()
    chosen = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in chosen if v not in names]
    if bad or not chosen:
        sys.exit(f"error: unknown variant {bad[0] if bad else '(none)'!r}; choose from {', '.join(names)}")
    if a.answer_tokens <= 0 or a.repeats <= 0:
        sys.exit("error: --answer-tokens and --repeats must be positive")
    main(a.answer_tokens, a.repeats, a.warmup, a.threads, chosen)
