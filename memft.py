"""MemFT token weights and losses: SFT, MemFT-OT and the two MemFT-SW flavours (pure functions).

    python memft.py                              # each method's weights on a small worked example
    python -m pytest -q tests/test_memft.py      # hand-worked checks
    python train.py --method ot ...              # train.py picks the weights via method_weights()

Read after lora.py, top to bottom: the threshold, SFT and OT weights, the long-context sliding
window (SW), PhoneBook's curriculum and the authors' schedules, then `weighted_loss` and
`method_weights`, which train.py's `train_step` calls.

Every method's loss is sum_t w_t * l_t / sum_t w_t, where l_t is the per-token cross-entropy and the
weights w_t are computed from a detached copy of l_t. theta = -ln p* (ln 2 for p* = 0.5): a token
with l_t < theta has p > p*, and for p* = 0.5 that makes it the greedy argmax.
"""
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

METHODS = ("sft", "ot", "sw_window", "sw_curriculum")


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token CE in fp32, (B, T, V) x (B, T) -> (B, T); labels already shifted, 0 where label is -100.

    The plain formula, for tests and benchmarks: training computes the same losses from hidden states
    with model.Transformer.token_losses, without the (B, T, V) logits."""
    B, T, V = logits.shape
    loss = F.cross_entropy(logits.float().reshape(B * T, V), labels.reshape(B * T),
                           ignore_index=-100, reduction="none")
    return loss.view(B, T)


def threshold(p: float = 0.5) -> float:
    """theta = -ln p*: the loss above which a token's target probability is below p*."""
    return -math.log(p)


def sft_weights(mask: torch.Tensor) -> torch.Tensor:
    """SFT: w = v (every answer token counts once)."""
    return mask.float()


@torch.no_grad()
def ot_weights(token_loss: torch.Tensor, mask: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """MemFT-OT: w = v * 1[l > theta], 0/1 floats of shape (B, T)."""
    return (mask.bool() & (token_loss.detach() > threshold(p))).float()


@torch.no_grad()
def anchor_positions(mask: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """(B,) long: T-index of the first answer position whose teacher-forced argmax is wrong, -1 if none."""
    B, T = mask.shape
    err = mask.bool() & wrong.bool()                                   # (B, T)
    t = torch.arange(T, device=mask.device).expand(B, T)
    first = torch.where(err, t, torch.full_like(t, T)).min(dim=1).values  # T where no error
    return torch.where(first < T, first, torch.full_like(first, -1))


@torch.no_grad()
def sliding_weights(token_loss: torch.Tensor, mask: torch.Tensor, wrong: torch.Tensor,
                    expansion: float | torch.Tensor = 1.0, window: float = 50.0, tau: float = 20.0, floor: float = 0.01,
                    scale: float = 10.0, p: float = 0.5) -> torch.Tensor:
    """MemFT-SW, long-context flavour (intra-sample sliding window): w = w0 * m, shape (B, T).

    w0_t = sigmoid(scale * (l_t - theta)) * v_t is a soft threshold. The anchor a is the first
    position with mask & wrong (wrong outside the mask is ignored). Distances t - a are taken in
    the same T-index space as a, so prompt tokens between answer tokens would count; they have
    w0 = 0 anyway. m_t = exp(-max(t - a, 0) / tau) while t - a < W = window * E, and `floor`
    beyond; positions before a get m = 1 and a row with no error gets m = 1 everywhere.
    `expansion` E is a float or a (B,) tensor (one E per sample). A row whose weights sum below
    1e-8 (all its answer tokens far past the window or already well learned) falls back to SFT
    weights for that row, so the sample still contributes.
    """
    B, T = mask.shape
    v = mask.float()                                                   # (B, T)
    w0 = torch.sigmoid(scale * (token_loss.detach().float() - threshold(p))) * v
    a = anchor_positions(mask, wrong)                                  # (B,)
    E = torch.as_tensor(expansion, dtype=torch.float32, device=mask.device).expand(B)
    d = torch.arange(T, device=mask.device).view(1, T) - a.view(B, 1)  # (B, T) distance to anchor
    m = torch.where(d < (window * E).view(B, 1),
                    torch.exp(-d.clamp(min=0).float() / tau),
                    torch.full((B, T), floor, device=mask.device))
    m = torch.where((a < 0).view(B, 1), torch.ones_like(m), m)          # no error: m == 1
    w = w0 * m
    dead = w.sum(dim=1, keepdim=True) < 1e-8                           # (B, 1)
    return torch.where(dead, v, w)


@dataclass
class SlidingState:
    """Window expansion E per sample id: grows by `step` per step once the anchor has stayed put
    for `patience` consecutive steps (up to `max_expansion`); any move resets E to 1.

    `samples` maps id -> [last_anchor, still_count, expansion]. still_count is the number of
    consecutive updates whose anchor equalled the previous one: anchors 5,5,5,5,5 give
    still_count 0,1,2,3,4 and E 1, 1, 1, 1.5, 2. A first sighting starts at [a, 0, 1.0].
    """
    patience: int = 3
    step: float = 0.5
    max_expansion: float = 4.0
    samples: dict = field(default_factory=dict)

    def update(self, ids: Sequence[int] | torch.Tensor, anchors: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Record this step's anchors (B,) for sample ids (B,); return the expansions E (B,) to use now."""
        out = []
        for i, a in zip(torch.as_tensor(ids).tolist(), torch.as_tensor(anchors).tolist()):
            last, still, E = self.samples.get(int(i), [None, 0, 1.0])
            if last is None:
                still, E = 0, 1.0
            elif a == last:
                still += 1
                if still >= self.patience:
                    E = min(E + self.step, self.max_expansion)
            else:
                still, E = 0, 1.0
            self.samples[int(i)] = [int(a), still, float(E)]
            out.append(E)
        return torch.tensor(out, dtype=torch.float32)

    def state_dict(self) -> dict:
        """JSON-able copy (ids become string keys)."""
        return {"samples": {str(i): list(s) for i, s in self.samples.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.samples = {int(i): [int(s[0]), int(s[1]), float(s[2])] for i, s in state["samples"].items()}


def curriculum_boundaries(length: int) -> list[int]:
    """Epochs where the curriculum ratio steps up: the paper's [20, 40, 60, 80, 300] for L <= 2000.

    For L > 2000 we scale each boundary by L / 2000 and round (our choice; the paper gives only
    the L <= 2000 schedule).
    """
    base = [20, 40, 60, 80, 300]
    if length <= 2000:
        return base
    return [round(b * length / 2000) for b in base]


# The authors' PhoneBook schedules (zjunlp/ParametricMemoryLaw, script/pb/common.sh), per answer
# length L in digits. MemFT-SW rows: (largest L, lr, batch, grad accumulation, curriculum boundaries in
# epochs; its budget is the last boundary). SFT and OT: lr 1e-2, 200 epochs, no accumulation, and
# the batch of the first row whose L is at least ours.
PAPER_SW = {
    "qwen": [(2000, 1e-2, 10, 1, (20, 40, 60, 80, 300)), (4000, 1e-2, 10, 1, (30, 60, 90, 120, 350)),
             (8000, 7e-3, 20, 2, (30, 60, 90, 120, 350)), (12000, 5e-3, 40, 2, (60, 120, 180, 240, 500)),
             (24000, 5e-3, 40, 2, (80, 160, 240, 320, 600)), (32000, 5e-3, 40, 2, (100, 200, 300, 400, 700))],
    "llama": [(1000, 1e-2, 25, 1, (20, 40, 60, 80, 300)), (2000, 1e-2, 25, 1, (40, 80, 120, 160, 400)),
              (4000, 7e-3, 50, 1, (40, 80, 120, 160, 400)), (8000, 5e-3, 50, 2, (80, 160, 240, 320, 600)),
              (16000, 5e-3, 50, 2, (100, 200, 300, 400, 700)), (24000, 3e-3, 50, 4, (100, 200, 300, 400, 700)),
              (32000, 3e-3, 50, 4, (120, 240, 360, 480, 800))],
}
PAPER_PLAIN_BATCH = {"qwen": [(4000, 4), (24000, 8), (32000, 16)], "llama": [(16000, 10), (32000, 20)]}


def paper_schedule(family: str, method: str, length: int) -> dict:
    """The authors' PhoneBook settings for `family` (qwen | llama), a method and L answer digits.

    Returns lr, batch_size, grad_accum, epochs and the SW curriculum boundaries. Lengths between
    the tabulated ones take the next row up, shorter books the first row, longer ones the last.
    """
    if family not in PAPER_SW:
        raise ValueError(f"unknown schedule family {family!r}; use {' or '.join(PAPER_SW)}")
    row = lambda table: next((r for r in table if length <= r[0]), table[-1])  # noqa: E731
    _, lr, batch, accum, bounds = row(PAPER_SW[family])
    if method.startswith("sw"):
        return dict(lr=lr, batch_size=batch, grad_accum=accum, epochs=bounds[-1], boundaries=list(bounds))
    return dict(lr=1e-2, batch_size=row(PAPER_PLAIN_BATCH[family])[1], grad_accum=1, epochs=200,
                boundaries=list(bounds))


def curriculum_size(n_samples: int, batch_size: int, epoch: int, boundaries: Sequence[int],
                    ratios: Sequence[float] = (0.2, 0.4, 0.6, 0.8, 1.0)) -> int:
    """Active sample count for MemFT-SW PhoneBook (inter-batch temporal curriculum) at `epoch`.

    rho_e = ratios[i] for the first i with epoch < boundaries[i] (the last ratio once past them all).
    active = min(floor(N/B)*B, max(B, floor(floor(N*rho_e)/B)*B)): the paper's rule, so the active
    set is whole batches and never fewer than one batch. N*rho gets a 1e-9 nudge so 0.29*100 floors
    to 29. Two departures, so that every sample is trained: at the last ratio (1.0) every sample is
    active, the trailing partial batch included (the paper's rule never trains the last N mod B
    samples: 2 of 32 at batch 10); with N < B the rule would give 0, and we return N (one batch).
    """
    N, B = n_samples, batch_size
    if N < B:
        return N
    i = next((k for k, b in enumerate(boundaries) if epoch < b), len(ratios) - 1)
    rho = ratios[min(i, len(ratios) - 1)]
    if rho >= 1:
        return N
    want = math.floor(N * rho + 1e-9) // B * B
    return min(N // B * B, max(B, want))


def weighted_loss(token_loss: torch.Tensor, weights: torch.Tensor,
                  norm: float | torch.Tensor | None = None) -> torch.Tensor:
    """sum w*l / sum w with the normaliser detached; 0 when all w are 0.

    Pass `norm` (the whole batch's sum of w) when the loss is computed chunk by chunk: the chunks'
    losses then add up exactly to the full loss, and so do their gradients.
    """
    w = weights.detach().float()
    den = w.sum() if norm is None else torch.as_tensor(norm, dtype=torch.float32)
    return (w * token_loss.float()).sum() / den.clamp(min=1e-8)


@torch.no_grad()
def method_weights(method: str, token_loss: torch.Tensor, mask: torch.Tensor, wrong: torch.Tensor | None = None,
                   expansion: float | torch.Tensor = 1.0, p: float = 0.5,
                   ot_fallback: str = "sft") -> tuple[torch.Tensor, dict]:
    """Weights (B, T) for one step of `method`, plus info {n_sub, skipped, sft_fallback}.

    n_sub counts answer tokens with l > theta over the batch. "ot" with n_sub == 0 falls back to
    SFT weights (ot_fallback="sft", the paper) or to all-zero weights with skipped=True
    (ot_fallback="skip": the trainer skips the update). "sw_curriculum" trains with OT zero-bp,
    i.e. always "skip". "sw_window" needs `wrong` (teacher-forced argmax != label, (B, T)).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if ot_fallback not in ("sft", "skip"):
        raise ValueError(f"unknown ot_fallback {ot_fallback!r}; use 'sft' or 'skip'")
    loss = token_loss.detach()
    n_sub = int((mask.bool() & (loss > threshold(p))).sum())
    info = {"n_sub": n_sub, "skipped": False, "sft_fallback": False}
    if method == "sft":
        return sft_weights(mask), info
    if method == "sw_window":
        if wrong is None:
            raise ValueError("method 'sw_window' needs `wrong` (teacher-forced argmax != label)")
        return sliding_weights(loss, mask, wrong, expansion=expansion, p=p), info
    fallback = "skip" if method == "sw_curriculum" else ot_fallback
    if n_sub > 0:
        return ot_weights(loss, mask, p), info
    if fallback == "sft":
        info["sft_fallback"] = True
        return sft_weights(mask), info
    info["skipped"] = True
    return torch.zeros_like(mask, dtype=torch.float32), info


def main() -> None:
    """Print every method's weights on one worked example: two samples of five answer tokens."""
    torch.set_printoptions(precision=2, sci_mode=False)
    p = torch.tensor([[0.9, 0.6, 0.3, 0.8, 0.2], [0.95, 0.9, 0.7, 0.99, 0.6]])  # target probabilities
    loss = -p.log()                                                              # (B, T) per-token CE
    mask = torch.ones_like(p, dtype=torch.bool)
    wrong = p < 0.5  # here: the target is the argmax exactly when p > 0.5 (the sufficient condition)
    print(f"target probability p:\n{p}\nper-token loss l = -ln p (threshold θ = ln 2 = {threshold():.3f}):\n{loss}")
    for method in METHODS:
        w, info = method_weights(method, loss, mask, wrong)
        print(f"\n{method}: n_sub {info['n_sub']}, skipped {info['skipped']}, loss Σwl/Σw = "
              f"{float(weighted_loss(loss, w)):.3f}\n{w}")
    print("\nsw_curriculum trains with OT's weights on a growing active set of samples: curriculum_size(N=32, B=8) "
          "by epoch with the paper's boundaries [20, 40, 60, 80, 300]: "
          + ", ".join(f"epoch {e}: {curriculum_size(32, 8, e, curriculum_boundaries(100))}" for e in (0, 20, 40, 60, 80)))


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description="MemFT's token weights (SFT, OT, SW) as pure functions; train.py uses them. "
                                        "Run without arguments to print each method's weights on a worked example.",
                            epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
                            ).parse_args()
    main()
