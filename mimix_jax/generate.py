"""Generate text from a run: `python -m mimix_jax.generate --checkpoint RUN_OR_STEP --prompt "..." [--chat] [--greedy]`.

One prompt streams token by token; several (`--prompt` repeated, or `--prompt_file`) are batched by length and
decoded on the device (inference/engine.py). Chat runs use the chat template and stop on <|eot_id|>.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from mimix_jax import cli
from mimix_jax.inference import generation


def read_prompts(args: argparse.Namespace) -> list[str]:
  prompts = list(args.prompt or [])
  if args.prompt_file:
    lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
    prompts += [line for line in lines if line.strip()]
  if not prompts:
    raise ValueError("no prompt: give --prompt TEXT or a --prompt_file with one prompt per line")
  return prompts


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mimix_jax.generate", description=__doc__.splitlines()[0])
  parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
  parser.add_argument("--prompt_file", help="a UTF-8 file with one prompt per line (blank lines skipped), batched")
  parser.add_argument("--json", action="store_true", help="one JSON object per prompt: prompt, text, tokens, ...")
  parser.add_argument("--batch_size", type=int, default=8)
  cli.add_inference_args(parser)
  args = parser.parse_args(argv)
  try:
    prompts = read_prompts(args)
    run = cli.open_run(args)
    kwargs = dict(chat=run.chat, system=run.system, sampling=run.sampling, max_new_tokens=run.max_new_tokens,
                  stop_ids=run.stop_ids)
    if len(prompts) == 1 and not args.json:
      for text in generation.stream(run.engine, run.tokenizer, prompts[0], **kwargs):
        print(text, end="", flush=True)
      print()
      return 0
    outs = generation.generate(run.engine, run.tokenizer, prompts, batch_size=args.batch_size, **kwargs)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for i, (prompt, g) in enumerate(zip(prompts, outs)):
    if args.json:
      print(json.dumps(dict(prompt=prompt, text=g.text, tokens=g.tokens, finish_reason=g.finish_reason,
                            prompt_tokens=len(g.prompt_tokens)), ensure_ascii=False))
    else:
      print(("\n" if i else "") + g.text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
