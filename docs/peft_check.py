"""A facts adapter's recall and locality measured again with transformers + PEFT, not with our code.

    python docs/peft_check.py --adapter results/placement/qv-upper-r8-kl10 --data results/placement/staff.jsonl

transformers loads the built-in model's converted folder (fp32) and PEFT loads the adapter folder as
train.py saved it (adapter_model.safetensors + adapter_config.json). Only the token ids come from our
code (data.facts formats the facts as training did; locality.py gives the held-out prompts in the model's
default chat format and the measured prose span), so the numbers below are transformers' forward passes:
  recall     each fact's greedy reply, as many tokens as its answer (end of turn included), against the answer
  locality   over the 60 held-out prompts of assets/locality.json, adapter on vs off (PEFT's disable_adapter):
             token agreement (the adapted model, teacher-forced on the base's greedy reply, predicts the same
             argmax), replies kept (identical greedy replies of at most 16 tokens, ending at end of turn), and
             prose perplexity drift; the certificate's definitions (locality.DEFINITIONS)
Prints one line per measure and the certificate's numbers beside them when certificate.json is there;
--json writes the same to a file. Exit 1 if some fact is not recalled.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convert import builtin_model_dir  # noqa: E402
from data import facts, load_tokenizer  # noqa: E402
from locality import REPLY_TOKENS, load_set, measure_prompts, prose_ids  # noqa: E402


@torch.no_grad()
def greedy(m, prompt: list[int], n: int, eos: int | None) -> list[int]:
    """generate()'s greedy reply of at most n tokens, ending at the first eos (included)."""
    out = m.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
                     max_new_tokens=n, eos_token_id=eos, pad_token_id=eos if eos is not None else 0)[0, len(prompt):].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


@torch.no_grad()
def forced_argmax(m, prompt: list[int], reply: list[int]) -> list[int]:
    logits = m(torch.tensor([prompt + reply[:-1]])).logits[0, len(prompt) - 1 :]
    return logits.argmax(-1).tolist()


@torch.no_grad()
def prose_loss(m, ids: list[int]) -> float:
    x = torch.tensor([ids])
    return float(F.cross_entropy(m(x[:, :-1]).logits[0].float(), x[0, 1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", required=True, type=Path, help="a facts run's adapter folder (runs/NAME)")
    ap.add_argument("--data", required=True, type=Path, help="the facts file it was trained on")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    a = ap.parse_args()
    for p, what in ((a.adapter / "adapter_model.safetensors", "a PEFT adapter file"), (a.data, "a facts file")):
        if not p.is_file():
            sys.exit(f"error: {p} not found ({what}); give a facts run's folder and its --data file")
    import peft
    import transformers as tf

    torch.manual_seed(0)
    folder = builtin_model_dir()
    tok = load_tokenizer(folder)
    base = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    m = peft.PeftModel.from_pretrained(base, str(a.adapter)).eval()
    eos = tok.eos_id

    ex = facts(tok, a.data).train
    got = [greedy(m, e.prompt, len(e.answer), None) for e in ex]
    recalled = sum(g == e.answer for g, e in zip(got, ex))

    s = load_set()
    asked = measure_prompts(tok, s)
    with m.disable_adapter():
        said_off = [greedy(m, p, REPLY_TOKENS, eos) for p in asked]
        loss_off = prose_loss(m, prose_ids(tok, s.measure.prose))
    said_on = [greedy(m, p, REPLY_TOKENS, eos) for p in asked]
    forced = [forced_argmax(m, p, r) for p, r in zip(asked, said_off)]
    loss_on = prose_loss(m, prose_ids(tok, s.measure.prose))
    agree = sum(sum(x == y for x, y in zip(f, r)) for f, r in zip(forced, said_off)) / sum(map(len, said_off))
    res = dict(adapter=str(a.adapter), facts=len(ex), recalled=recalled, prompts=len(asked),
               token_agreement=round(agree, 6), replies_kept=sum(x == y for x, y in zip(said_on, said_off)),
               prose_drift=round(math.exp(loss_on - loss_off) - 1, 6))
    cert_file = a.adapter / "certificate.json"
    cert = json.loads(cert_file.read_text()) if cert_file.is_file() else None
    ours = {}
    if cert:
        loc = cert.get("locality", {})
        ours = dict(recalled=cert["overall"]["facts_stored"], token_agreement=loc.get("token_agreement"),
                    replies_kept=loc.get("replies_kept"), prose_drift=loc.get("prose", {}).get("drift"))
    for k in ("recalled", "token_agreement", "replies_kept", "prose_drift"):
        print(f"{k:16s} transformers + PEFT {res[k]}" + (f"   certificate (our code) {ours[k]}" if ours else ""))
    if a.json:
        a.json.write_text(json.dumps(res | dict(certificate=ours), indent=1) + "\n")
    sys.exit(0 if recalled == len(ex) else 1)


if __name__ == "__main__":
    main()
