"""What the inference commands (generate, chat) share: the sampling flags and opening a run for decoding."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from mimix_jax.inference import generation
from mimix_jax.inference.engine import Engine
from mimix_jax.inference.sampling import SamplingConfig
from mimix_jax.text import tokenizer as tokenizer_lib
from mimix_jax.text.tokenizer import Tokenizer
from mimix_jax.training import checkpoints
from mimix_jax.training.run_dir import RunInfo


def add_inference_args(parser: argparse.ArgumentParser) -> None:
  """--checkpoint, --chat / --raw, --system, --dtype and the sampling flags (defaults: the run's model.json)."""
  parser.add_argument("--checkpoint", required=True, help="a run directory (latest checkpoint) or RUN/checkpoints/STEP")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--chat", action="store_true", help="chat template (default: the run's generation mode)")
  mode.add_argument("--raw", action="store_true", help="plain continuation of <|begin_of_text|> + text")
  parser.add_argument("--system", help="chat system message (default: the run's)")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the run's)")
  g = parser.add_argument_group("sampling (default: the run's model.json generation settings)")
  g.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
  g.add_argument("--temperature", type=float)
  g.add_argument("--top_k", type=int, help="keep the k most likely tokens (0 = off)")
  g.add_argument("--top_p", type=float, help="keep the smallest set of most likely tokens reaching p (1 = off)")
  g.add_argument("--min_p", type=float, help="keep tokens with p >= min_p * the top p (0 = off)")
  g.add_argument("--repetition_penalty", type=float, help="> 1 discourages repeating generated tokens (1 = off)")
  g.add_argument("--repetition_window", type=int, help="only the last N generated tokens count (0 = all)")
  g.add_argument("--repetition_decay", type=float, help="an occurrence d tokens back weighs decay**d (1 = count)")
  g.add_argument("--max_repetition_penalty", type=float, help="clamp the compounded penalty factor (0 = off)")
  g.add_argument("--seed", type=int)
  g.add_argument("--max_new_tokens", type=int)


@dataclasses.dataclass
class Inference:
  """A run opened for decoding, with the flags resolved against its defaults."""

  info: RunInfo
  engine: Engine
  tokenizer: Tokenizer
  chat: bool
  system: str | None
  sampling: SamplingConfig
  max_new_tokens: int
  stop_ids: list[int]


def open_run(args: argparse.Namespace) -> Inference:
  """Loads the run's params into an Engine (which keeps only its decode layout); raises FileNotFoundError /
  ValueError for user errors."""
  info = checkpoints.open_checkpoint(args.checkpoint)
  model_cfg = info.model if args.dtype is None else dataclasses.replace(info.model, dtype=args.dtype)
  params = checkpoints.load_params(info, model_cfg)
  checkpoints.check_finite(params, info.step_dir)
  engine = Engine(model_cfg, params)
  del params  # the engine keeps its own decode layout
  tokenizer = Tokenizer.load(info.tokenizer_dir)
  names = [f.name for f in dataclasses.fields(SamplingConfig)]
  overrides: dict[str, Any] = {k: getattr(args, k) for k in names}
  if args.greedy:
    overrides["temperature"] = 0.0
  sampling = generation.sampling_from(info.generation, **overrides)
  return Inference(
      info=info, engine=engine, tokenizer=tokenizer,
      chat=args.chat or (not args.raw and info.generation.get("mode") == "chat"),
      system=args.system if args.system is not None else info.generation.get("system_message"),
      sampling=sampling, max_new_tokens=args.max_new_tokens or info.generation["max_new_tokens"],
      stop_ids=tokenizer_lib.stop_ids(tokenizer, info.generation.get("stop_ids") or []))
