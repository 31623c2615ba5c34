"""Hand-worked checks of the MemFT token weights and losses.

    python -m pytest -q tests/test_memft.py
"""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import memft  # noqa: E402

LN2 = math.log(2)


def sig(x):
    return 1 / (1 + math.exp(-x))


def close(a, b):
    torch.testing.assert_close(a, torch.tensor(b, dtype=torch.float32), rtol=1e-5, atol=1e-7)


def test_token_loss_matches_cross_entropy_and_ignores_masked():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 3, 0, 6, -100], [1, -100, 2, 2, 5]])
    got = memft.token_loss(logits, labels)
    ref = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # (B, T), 0 at -100
    torch.testing.assert_close(got, ref)
    assert (got[labels == -100] == 0).all() and (got[labels != -100] > 0).all()
    # Uniform logits over V = 4: CE = ln 4 by hand; bf16 input still gives an fp32 loss.
    flat = memft.token_loss(torch.zeros(1, 2, 4, dtype=torch.bfloat16), torch.tensor([[1, -100]]))
    assert flat.dtype == torch.float32
    close(flat, [[math.log(4), 0.0]])


def test_ot_weights_hand_example():
    loss = torch.tensor([[0.1, 0.8, 0.7, 2.0, 0.5, 3.0],
                         [0.9, 0.0, 1.5, 0.2, 0.69, 0.70]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0],
                         [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    # theta = ln 2 = 0.6931: 0.69 is below it, 0.70 above; 3.0 and 0.1 sit outside the mask.
    close(memft.ot_weights(loss, mask), [[0, 1, 1, 1, 0, 0],
                                         [1, 0, 1, 0, 0, 1]])
    # p = 0.8: theta = -ln 0.8 = 0.2231, so 0.5 and 0.69 now count, 0.2 still does not.
    close(memft.ot_weights(loss, mask, p=0.8), [[0, 1, 1, 1, 1, 0],
                                                [1, 0, 1, 0, 1, 1]])
    assert memft.ot_weights(loss, mask.float()).dtype == torch.float32


def _sliding_example():
    # Losses theta + x/100 with scale = 100 give w0 = sigmoid(x) exactly.
    x = torch.tensor([[0, 2, -1, 3, 1, 0.5, -2, 4],
                      [5, 5, -1, -0.5, 1, 2, 5, 5],
                      [0, 0, 0, 0, 0, 0, 0, 0]])
    loss = LN2 + x / 100
    loss[2] = 0.0   # well learned: w0 = sigmoid(-69.3) ~ 1e-30 per token
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1],
                         [0, 0, 1, 1, 1, 1, 0, 0],
                         [0, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    wrong = torch.tensor([[1, 0, 0, 1, 0, 1, 0, 0],     # t=0 is prompt: anchor 3
                          [1, 1, 0, 0, 0, 0, 1, 0],     # errors only outside the answer: none
                          [0, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    return loss, mask, wrong


def test_anchor_positions():
    _, mask, wrong = _sliding_example()
    assert memft.anchor_positions(mask, wrong).tolist() == [3, -1, 2]
    assert memft.anchor_positions(mask, torch.zeros_like(wrong)).tolist() == [-1, -1, -1]
    assert memft.anchor_positions(mask, wrong).dtype == torch.long


def test_sliding_weights_hand_example():
    loss, mask, wrong = _sliding_example()
    kw = dict(window=2, tau=2.0, floor=0.01, scale=100.0)
    e = math.exp
    # Row 0, E = 1.5: W = 3, anchor 3. m = 1 up to the anchor, exp(-d/2) for d = 1, 2, floor for d >= 3.
    row0 = [0.0, sig(2), sig(-1), sig(3), sig(1) * e(-0.5), sig(0.5) * e(-1.0),
            sig(-2) * 0.01, sig(4) * 0.01]
    # Row 1: no error inside the answer, m == 1, so w = w0.
    row1 = [0.0, 0.0, sig(-1), sig(-0.5), sig(1), sig(2), 0.0, 0.0]
    # Row 2: sum w ~ 4e-30 < 1e-8, falls back to SFT (w = mask).
    row2 = [0, 1, 1, 1, 1, 0, 0, 0]
    w = memft.sliding_weights(loss, mask, wrong, expansion=torch.tensor([1.5, 1.0, 1.0]), **kw)
    close(w, [row0, row1, row2])
    # Scalar E = 1: W = 2, so d = 2 (t = 5) drops to the floor as well.
    row0_e1 = row0[:5] + [sig(0.5) * 0.01] + row0[6:]
    close(memft.sliding_weights(loss, mask, wrong, expansion=1.0, **kw), [row0_e1, row1, row2])


def test_sliding_weights_paper_defaults():
    loss = torch.tensor([[0.1, 1.0, 2.0, 0.3, 0.6, 5.0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    wrong = torch.tensor([[0, 0, 1, 0, 1, 0]], dtype=torch.bool)
    # tau = 20, W = 50 covers the row, anchor 2: m = 1, 1, 1, e^-1/20, e^-2/20, e^-3/20.
    m = [1, 1, 1, math.exp(-1 / 20), math.exp(-2 / 20), math.exp(-3 / 20)]
    want = [0.0] + [sig(10 * (l - LN2)) * mt for l, mt in zip([1.0, 2.0, 0.3, 0.6, 5.0], m[1:])]
    close(memft.sliding_weights(loss, mask, wrong), [want])
    lr = loss.clone().requires_grad_()
    assert not memft.sliding_weights(lr, mask, wrong).requires_grad


def test_sliding_state_expansion_per_id_and_json_roundtrip():
    a10 = [5] * 5 + [7] * 10
    e10 = [1, 1, 1, 1.5, 2, 1, 1, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4]
    a11 = [2, 2, 2, 2, 3, 3, 3, 3, 3, 9, 9, 9, 9, 9, 9]
    e11 = [1, 1, 1, 1.5, 1, 1, 1, 1.5, 2, 1, 1, 1, 1.5, 2, 2.5]
    st = memft.SlidingState()
    for k in range(15):
        if k == 7:   # resume from JSON halfway through
            blob = json.loads(json.dumps(st.state_dict()))
            st = memft.SlidingState()
            st.load_state_dict(blob)
        if k % 2:    # the batch slot of each sample changes; state must follow the id
            got = st.update(torch.tensor([11, 10]), torch.tensor([a11[k], a10[k]]))
            assert got.tolist() == [e11[k], e10[k]], k
        else:
            got = st.update([10, 11], [a10[k], a11[k]])
            assert got.tolist() == [e10[k], e11[k]], k
    assert st.samples[10] == [7, 9, 4.0]


@pytest.mark.parametrize("n,b,epoch,want", [
    (100, 8, 0, 16),      # rho 0.2: floor(20 / 8) * 8
    (100, 8, 19, 16),     # last epoch before the first boundary
    (100, 8, 20, 40),     # epoch == boundary moves to the next stage: rho 0.4
    (100, 8, 59, 56),     # rho 0.6: floor(60 / 8) * 8
    (100, 8, 60, 80),     # rho 0.8
    (100, 8, 80, 100),    # rho 1.0: every sample, the partial batch of 4 included (the paper's rule: 96)
    (100, 8, 300, 100),   # past every boundary: the last ratio
    (32, 10, 80, 32),     # stage 8's book at batch 10: the paper's rule gives 30 and never trains 2 numbers
    (32, 10, 79, 20),     # rho 0.8: floor(25.6) = 25, floor(25 / 10) * 10 = 20
    (10, 8, 0, 8),        # floor(2 / 8) * 8 = 0, raised to one batch
    (37, 4, 45, 20),      # rho 0.6: floor(22.2) = 22, floor(22 / 4) * 4 = 20
    (100, 7, 0, 14),      # floor(20 / 7) * 7
    (5, 8, 0, 5),         # N < B: one partial batch (the rule alone would give 0)
])
def test_curriculum_size(n, b, epoch, want):
    assert memft.curriculum_size(n, b, epoch, [20, 40, 60, 80, 300]) == want


def test_curriculum_size_float_rounding_and_boundaries():
    # 100 * 0.29 = 28.999999999999996 in floats; the rule means 29.
    assert memft.curriculum_size(100, 1, 0, [10], ratios=(0.29, 1.0)) == 29
    assert memft.curriculum_boundaries(1000) == [20, 40, 60, 80, 300]
    assert memft.curriculum_boundaries(2000) == [20, 40, 60, 80, 300]
    assert memft.curriculum_boundaries(4000) == [40, 80, 120, 160, 600]
    assert memft.curriculum_boundaries(2500) == [25, 50, 75, 100, 375]


def test_weighted_loss_gradient_is_w_over_sum_w():
    l = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.5, 0.0]], requires_grad=True)
    w = torch.sigmoid(l) * torch.tensor([[1.0, 0, 1], [1, 0, 0]])   # weights that depend on l
    loss = memft.weighted_loss(l, w)
    wd = w.detach()
    s = wd.sum().item()   # sig(1) + sig(3) + sig(4)
    assert abs(s - (sig(1) + sig(3) + sig(4))) < 1e-6
    assert abs(loss.item() - (sig(1) * 1 + sig(3) * 3 + sig(4) * 4) / s) < 1e-6
    loss.backward()
    torch.testing.assert_close(l.grad, wd / s)   # no gradient through w or through sum w
    # Chunked by rows with the global normaliser: the pieces add up to the full loss and gradient.
    l2 = l.detach().clone().requires_grad_()
    parts = [memft.weighted_loss(l2[i], wd[i], norm=s) for i in range(2)]
    sum(parts).backward()
    assert abs(sum(p.item() for p in parts) - loss.item()) < 1e-6
    torch.testing.assert_close(l2.grad, wd / s)
    # All-zero weights: 0, not nan.
    z = memft.weighted_loss(l.detach(), torch.zeros(2, 3))
    assert z.item() == 0.0


def test_method_weights_ot_fallback_sft_vs_skip():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    easy = torch.tensor([[0.1, 0.2, 5.0], [0.5, 0.6, 0.05]], requires_grad=True)  # 5.0 is masked
    w, info = memft.method_weights("ot", easy, mask, ot_fallback="sft")
    close(w, [[1, 1, 0], [1, 1, 1]])
    assert info == {"n_sub": 0, "skipped": False, "sft_fallback": True}
    assert not w.requires_grad
    w, info = memft.method_weights("ot", easy, mask, ot_fallback="skip")
    close(w, [[0, 0, 0], [0, 0, 0]])
    assert info["skipped"] and info["n_sub"] == 0
    # The curriculum flavour always trains with OT zero-bp.
    w, info = memft.method_weights("sw_curriculum", easy, mask, ot_fallback="sft")
    assert info["skipped"] and w.sum() == 0
    # One sub-threshold answer token: every OT flavour keeps only it.
    hard = easy.detach().clone()
    hard[0, 1] = 1.0
    for method, fb in [("ot", "sft"), ("ot", "skip"), ("sw_curriculum", "sft")]:
        w, info = memft.method_weights(method, hard, mask, ot_fallback=fb)
        close(w, [[0, 1, 0], [0, 0, 0]])
        assert info == {"n_sub": 1, "skipped": False, "sft_fallback": False}
    w, info = memft.method_weights("sft", hard, mask)
    close(w, [[1, 1, 0], [1, 1, 1]])
    with pytest.raises(ValueError):
        memft.method_weights("sw_window", hard, mask)
    with pytest.raises(ValueError):
        memft.method_weights("memft", hard, mask)


def test_method_weights_sw_window_matches_sliding_weights():
    loss, mask, wrong = _sliding_example()
    E = torch.tensor([1.5, 1.0, 1.0])
    w, info = memft.method_weights("sw_window", loss, mask, wrong=wrong, expansion=E)
    torch.testing.assert_close(w, memft.sliding_weights(loss, mask, wrong, expansion=E))
    # Answer tokens with x > 0: row 0 has 2, 3, 1, 0.5, 4 and row 1 has 1, 2; row 2 none.
    assert info == {"n_sub": 7, "skipped": False, "sft_fallback": False}
