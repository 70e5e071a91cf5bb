"""SFT: the loss sees only assistant tokens (and their eot); prompt tokens never reach the loss or gradients."""

import jax
import numpy as np
from flax import nnx

from mimix_jax.model import transformer as model_lib
from mimix_jax.model.config import ModelConfig
from mimix_jax.training import losses

CFG = ModelConfig(vocab_size=2000, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, max_len=128)
DIALOG = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is AI?"},
          {"role": "assistant", "content": "Machines that think."}, {"role": "user", "content": "And ML?"},
          {"role": "assistant", "content": "Learning from data."}]


def batch_of(tokens, mask):
  tokens, mask = np.asarray(tokens, np.int32), np.asarray(mask, np.float32)
  n = len(tokens) - 1
  return {"inputs": tokens[None, :-1], "targets": tokens[None, 1:], "loss_mask": mask[None, 1:],
          "segment_ids": np.ones((1, n), np.int32), "positions": np.arange(n, dtype=np.int32)[None]}


def loss_and_grads(model, batch):
  graphdef, params = nnx.split(model, nnx.Param)
  def f(p):
    total, count, _ = losses.lm_loss(nnx.merge(graphdef, p), batch)
    return total / count
  return jax.value_and_grad(f)(nnx.to_pure_dict(params))


def test_changing_prompt_targets_changes_nothing_changing_assistant_targets_does(tok):
  tokens, mask = tok.encode_dialog_and_targets(DIALOG)
  mask = np.asarray(mask)
  assert mask.sum() == len(tok.encode("Machines that think.")) + len(tok.encode("Learning from data.")) + 2  # + eots
  model = model_lib.create(CFG, 0)
  base = batch_of(tokens, mask)
  loss, grads = loss_and_grads(model, base)

  prompt = base["targets"].copy()
  user_positions = np.where(base["loss_mask"][0] == 0)[0]
  prompt[0, user_positions] = (prompt[0, user_positions] + 17) % 1000  # rewrite every non-assistant target
  loss2, grads2 = loss_and_grads(model, {**base, "targets": prompt})
  assert float(loss2) == float(loss)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), grads, grads2)

  answer = base["targets"].copy()
  first_assistant = np.where(base["loss_mask"][0] == 1)[0][0]
  answer[0, first_assistant] = (answer[0, first_assistant] + 17) % 1000
  loss3, _ = loss_and_grads(model, {**base, "targets": answer})
  assert float(loss3) != float(loss)
