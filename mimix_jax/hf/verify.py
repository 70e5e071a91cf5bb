"""Verifying an export: transformers loads it (no custom code), and its logits and tokenizer agree with ours.

The caller computes our float32 logits on `prompt_batch` (it owns the JAX model); everything here is NumPy,
torch and transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

# Verification passes when every listed bound holds. float32 must match to rounding; bfloat16 weights move the
# logits by ~0.4% relative, so only the distributions are compared.
TOLERANCES = {
    "float32": {"max_abs_diff": 1e-3, "mean_kl": 1e-6, "top1_agreement": 0.999},
    "bfloat16": {"mean_kl": 5e-3, "top1_agreement": 0.98},
}

VERIFY_TEXTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun.",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
]
VERIFY_DIALOG = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the tallest mountain on Earth?"},
    {"role": "assistant", "content": "Mount Everest, at 8,849 metres."},
    {"role": "user", "content": "And the second tallest? <|eot_id|><|start_header_id|>assistant<|end_header_id|>"},
]

PLAIN_DIALOG = [*VERIFY_DIALOG[:-1], {"role": "user", "content": "And the second tallest?"}]


class VerificationError(RuntimeError):
  """The exported model's logits (or tokenizer) disagree with ours beyond the tolerance."""


def transformers_available() -> bool:
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError:
    return False
  return True


def prompt_batch(prompts: Sequence[Sequence[int]], pad_id: int) -> np.ndarray:
  """[N, T] int32, right-padded: causal attention keeps every real position's logits independent of the padding."""
  batch = np.full((len(prompts), max(map(len, prompts))), pad_id, np.int32)
  for row, ids in zip(batch, prompts):
    row[: len(ids)] = ids
  return batch


def verify(export_dir: Path, batch: np.ndarray, lengths: Sequence[int], ours: np.ndarray, text_ids: list[list[int]],
           chat_ids: list[int], dtype: str, dialog: list[dict] = VERIFY_DIALOG) -> dict[str, Any]:
  """Loads the export with transformers (weights upcast to float32) and compares its logits on `batch` with
  `ours` ([N, T, V] float, real positions < lengths[i]); also checks that the exported tokenizer encodes
  VERIFY_TEXTS and `dialog` to `text_ids` / `chat_ids`. Prints a summary; raises VerificationError above
  TOLERANCES[dtype]."""
  import torch
  import transformers

  transformers.utils.logging.disable_progress_bar()
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(export_dir)
  with torch.no_grad():
    theirs = hf_model(torch.from_numpy(batch).long()).logits.double().numpy()
  stats = [logit_stats(ours[i, :n], theirs[i, :n]) for i, n in enumerate(lengths)]
  n = sum(s["positions"] for s in stats)
  result = {
      "transformers": transformers.__version__,
      "prompts": len(lengths),
      "positions": n,
      "max_abs_diff": max(s["max_abs_diff"] for s in stats),
      "mean_kl": sum(s["kl_sum"] for s in stats) / n,
      "top1_agreement": sum(s["top1_same"] for s in stats) / n,
  }
  hf_chat = hf_tok.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True, return_dict=False)
  result["tokenizer_match"] = [hf_tok(t)["input_ids"] for t in VERIFY_TEXTS] == text_ids and list(hf_chat) == chat_ids
  tol = TOLERANCES[dtype]
  # NaN compares False with every bound, so a bound holds only if its number is finite and inside it.
  failed = [f"{k}={result[k]:.3g} {'<' if k == 'top1_agreement' else '>'} {bound}" for k, bound in tol.items()
            if not (result[k] >= bound if k == "top1_agreement" else result[k] <= bound)]
  result["finite"] = all(np.isfinite(ours[i, :n]).all() and np.isfinite(theirs[i, :n]).all()
                         for i, n in enumerate(lengths))
  if not result["finite"]:
    failed.append("non-finite logits")
  if not result["tokenizer_match"]:
    failed.append("tokenizer ids differ")
  result["tolerance"], result["passed"] = tol, not failed
  print(f"verify: transformers {result['transformers']} on {dtype} weights (upcast to float32) vs our float32 "
        f"model, {len(lengths)} prompts / {n} positions")
  print(f"  max |logit diff| {result['max_abs_diff']:.3g}   mean KL {result['mean_kl']:.3g}   "
        f"top-1 agreement {100 * result['top1_agreement']:.2f}%   tolerance {tol}")
  print(f"  tokenizer: AutoTokenizer ids (text and apply_chat_template) equal ours: {result['tokenizer_match']}")
  print(f"  {'PASS' if not failed else 'FAIL: ' + '; '.join(failed)}")
  if failed:
    raise VerificationError(f"export verification failed: {'; '.join(failed)}")
  return result


def logit_stats(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
  """[T, V] logits from both models -> max |diff|, summed KL(ours || theirs) and top-1 matches over T."""
  logp = ours - _logsumexp(ours)
  logq = theirs - _logsumexp(theirs)
  kl = np.sum(np.exp(logp) * (logp - logq), axis=-1)
  return {
      "positions": ours.shape[0],
      "max_abs_diff": float(np.max(np.abs(ours - theirs))),
      "kl_sum": float(np.sum(kl)),
      "top1_same": int(np.sum(ours.argmax(-1) == theirs.argmax(-1))),
  }


def _logsumexp(x: np.ndarray) -> np.ndarray:
  m = x.max(-1, keepdims=True)
  return m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))
