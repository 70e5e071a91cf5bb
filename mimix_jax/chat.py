"""Interactive chat (or raw continuation) with a trained run, streaming token by token.

    python -m mimix_jax.chat --checkpoint RUN_OR_STEP [--system TEXT] [--chat | --raw] [sampling flags]

The conversation lives in a one-row KV cache (inference/session.py): each turn prefills only its new tokens;
when the context fills, the oldest turns are dropped and you are told. Raw mode (the default for
pretrained-only runs) continues each input independently.

Commands: /help, /reset, /system [TEXT | -], /params [name=value ...], /exit. Ctrl-C stops the current
reply only; Ctrl-D or /exit leaves. Line editing and history come from readline.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Sequence

from mimix_jax import cli
from mimix_jax.inference.session import ChatSession, format_params, set_params

HELP = """commands:
  /reset                  forget the conversation (the system message stays)
  /system                 show the system message
  /system TEXT            set the system message and start over;  /system -  removes it
  /params                 show the sampling settings
  /params k=v [k=v ...]   change them, e.g. /params temperature=0.7 top_p=0.9 max_new_tokens=128
  /help                   this text
  /exit                   leave (or Ctrl-D); Ctrl-C stops the current reply"""


def turn(session: ChatSession, text: str, out=sys.stdout) -> None:
  """One turn: the reply to `text`, printed as it streams. Ctrl-C (SIGINT) at any moment, the first turn's
  compile included, only stops the reply (a KeyboardInterrupt inside JAX would abort the process): the turn is
  kept with what was generated, and the REPL goes on. Raises ValueError when `text` cannot fit."""
  interrupted = False

  def on_sigint(signum, frame):
    nonlocal interrupted
    interrupted = True

  previous = signal.signal(signal.SIGINT, on_sigint)
  reply = None
  try:
    reply = session.reply(text)  # prefill first: a context-full notice comes before the reply
    if session.chat:
      out.write("assistant> ")
      out.flush()
    for piece in () if interrupted else reply:
      out.write(piece)
      out.flush()
      if interrupted:
        break
  finally:
    if reply is not None:
      reply.close()
    signal.signal(signal.SIGINT, previous)
  out.write(" [stopped]\n" if interrupted else "\n")
  if reply.finish_reason == "context":
    out.write("[the context is full: the next message drops the oldest turns]\n")


def handle_command(session: ChatSession, line: str) -> bool:
  """Runs a /command; returns False when the REPL should exit."""
  cmd, _, arg = line.partition(" ")
  arg = arg.strip()
  if cmd in ("/exit", "/quit"):
    return False
  if cmd == "/help":
    print(HELP)
  elif cmd == "/reset":
    session.reset()
    print("[conversation reset]")
  elif cmd == "/system":
    if not arg:
      print(f"[system message: {session.system!r}]" if session.system else "[no system message]")
    else:
      session.set_system(None if arg == "-" else arg)
      print("[system message removed; conversation reset]" if arg == "-" else "[system message set; conversation reset]")
  elif cmd == "/params":
    if arg:
      set_params(session, arg.split())
    print(format_params(session))
  else:
    print(f"unknown command {cmd}; /help lists them")
  return True


def repl(session: ChatSession, banner: str) -> None:
  try:
    import readline  # noqa: F401  (arrow-key editing and history for input())
  except ImportError:
    pass
  print(banner)
  prompt = "user> " if session.chat else "text> "
  while True:
    try:
      line = input(prompt)
    except EOFError:
      print()
      return
    except KeyboardInterrupt:  # at the prompt: a fresh line, like Python's REPL
      print()
      continue
    if not line.strip():
      continue
    try:
      if line.startswith("/"):
        if not handle_command(session, line.strip()):
          return
        continue
      turn(session, line)
    except ValueError as e:
      print(f"error: {e}")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mimix_jax.chat", description=__doc__.splitlines()[0])
  cli.add_inference_args(parser)
  args = parser.parse_args(argv)
  try:
    run = cli.open_run(args)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  session = ChatSession(run.engine, run.tokenizer, chat=run.chat, system=run.system, sampling=run.sampling,
                        max_new_tokens=run.max_new_tokens, stop_ids=run.stop_ids)
  banner = (f"mimix_jax chat: {run.info.step_dir}, {'chat' if run.chat else 'raw'} mode, context "
            f"{run.engine.cfg.max_len} tokens. /help for commands, Ctrl-D to leave.")
  repl(session, banner)
  return 0


if __name__ == "__main__":
  sys.exit(main())
