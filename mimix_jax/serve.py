"""Serve a run over HTTP: an OpenAI-compatible API with continuous batching, and a chat page at /.

    python -m mimix_jax.serve --checkpoint RUN [--host 127.0.0.1] [--port 8000] [--max_batch 8] [--api_key KEY]

Endpoints: POST /v1/chat/completions (chat runs), POST /v1/completions, GET /v1/models, GET /health, GET /
(the page). Up to --max_batch requests decode together (inference/batching.py); more wait their turn. The
sampling flags set the defaults for requests that leave a field out (otherwise the run's model.json).
"""

from __future__ import annotations

import argparse
import socket
import sys
from typing import Sequence

from mimix_jax import cli
from mimix_jax.inference.batching import Batcher
from mimix_jax.serving.app import create_app
from mimix_jax.serving.completions import Served


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m mimix_jax.serve", description=__doc__.splitlines()[0])
  parser.add_argument("--host", default="127.0.0.1", help="the address to bind (0.0.0.0: every interface)")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--max_batch", type=int, default=8, help="requests decoded together (slots)")
  parser.add_argument("--api_key", help="require 'Authorization: Bearer KEY' on /v1/*")
  parser.add_argument("--model_name", help="the model id clients name (default: the run directory's name)")
  cli.add_inference_args(parser)
  return parser.parse_args(argv)


def bind(host: str, port: int) -> socket.socket:
  """The listening socket, bound here so a taken port is a one-line error; raises ValueError."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
  return sock


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    if args.max_batch < 1:
      raise ValueError(f"--max_batch must be at least 1, got {args.max_batch}")
    sock = bind(args.host, args.port)
    run = cli.open_run(args)
  except (FileNotFoundError, ValueError) as e:
    print(f"serve: error: {e}", file=sys.stderr)
    return 2
  import uvicorn  # after the checks: a bad flag answers without the import

  batcher = Batcher(run.engine, slots=args.max_batch, stop_ids=run.stop_ids, pad_id=run.tokenizer.pad_id)
  batcher.warm_up()
  served = Served(model_id=args.model_name or run.info.run_dir.name, tokenizer=run.tokenizer, batcher=batcher,
                  chat=run.chat, system=run.system, defaults=run.sampling, max_tokens=run.max_new_tokens,
                  api_key=args.api_key)
  batcher.start()
  print(f"serving {served.model_id!r} ({'chat' if run.chat else 'raw'}, {args.max_batch} slots) on "
        f"http://{args.host}:{sock.getsockname()[1]}", flush=True)
  server = uvicorn.Server(uvicorn.Config(create_app(served), log_level="warning"))
  try:
    server.run(sockets=[sock])
  finally:
    batcher.stop()
  return 0


if __name__ == "__main__":
  sys.exit(main())
