"""Shared fixtures: a small real tokenizer trained on the shipped corpus, and shards made from shipped data.

Session-scoped, so the whole suite trains one tokenizer and preprocesses each stage once.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from mimix_jax import tokenizer as tokenizer_cmd
from mimix_jax.text.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
CORPUS_TRAIN = DATA / "corpus" / "train"
SFT_DIR = DATA / "chat" / "sft"
DPO_FILE = DATA / "chat" / "dpo" / "chatterbot_mismatch_pairs.jsonl.gz"
SMALL_BOOKS = [CORPUS_TRAIN / "shakespeare_macbeth.txt.gz", CORPUS_TRAIN / "shakespeare_sonnets.txt.gz"]
TEST_VOCAB = 2000


def train_tokenizer(inputs: list, vocab_size: int, output: Path, *extra: str) -> Path:
  """The tokenizer command, in process; returns the output directory."""
  assert tokenizer_cmd.main(["--input", *map(str, inputs), "--vocab_size", str(vocab_size), "--output", str(output),
                             *extra]) == 0
  return output


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
  """A 2000-id tokenizer trained on a seeded 1.5M-character sample of data/corpus/train."""
  out = tmp_path_factory.mktemp("tokenizer") / "tok"
  return train_tokenizer([CORPUS_TRAIN], TEST_VOCAB, out, "--max_chars", "1500000", "--seed", "0")


@pytest.fixture(scope="session")
def tok(tokenizer_dir) -> Tokenizer:
  return Tokenizer.load(tokenizer_dir)


def run_preprocess(tokenizer_dir: Path, output: Path, stage: str, inputs: list, max_len: int, *extra: str) -> int:
  """preprocess.main with the usual flags; returns its exit status."""
  from mimix_jax import preprocess
  argv = ["--stage", stage, "--tokenizer", str(tokenizer_dir), "--input", *map(str, inputs),
          "--output", str(output), "--max_len", str(max_len), *extra]
  return preprocess.main(argv)


@pytest.fixture(scope="session")
def pretrain_shards(tokenizer_dir, tmp_path_factory) -> Path:
  """Two short books packed into rows of max_len 64 (+1)."""
  out = tmp_path_factory.mktemp("shards") / "pretrain"
  assert run_preprocess(tokenizer_dir, out, "pretrain", SMALL_BOOKS, 64) == 0
  return out


@pytest.fixture(scope="session")
def sft_shards(tokenizer_dir, tmp_path_factory) -> Path:
  """The shipped chatterbot SFT conversations, one per sequence, max_len 128."""
  out = tmp_path_factory.mktemp("shards") / "sft"
  assert run_preprocess(tokenizer_dir, out, "sft", [SFT_DIR / "chatterbot_en.jsonl.gz"], 128) == 0
  return out


@pytest.fixture(scope="session")
def dpo_shards(tokenizer_dir, tmp_path_factory) -> Path:
  """The shipped preference pairs, max_len 128."""
  out = tmp_path_factory.mktemp("shards") / "dpo"
  assert run_preprocess(tokenizer_dir, out, "dpo", [DPO_FILE], 128) == 0
  return out


def run_with_umask(cmd: list, umask: int, **kw) -> subprocess.CompletedProcess:
  """Runs cmd (a child inherits the umask) under `umask`, restoring ours after."""
  old = os.umask(umask)
  try:
    return subprocess.run(cmd, check=True, capture_output=True, timeout=300, **kw)
  finally:
    os.umask(old)
