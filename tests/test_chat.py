"""The chat REPL: history in the KV cache, interruption, context overflow, and the terminal program."""

from __future__ import annotations

import os
import signal
import sys
import time

import pexpect
import pytest

from mimix_jax import chat
from mimix_jax.inference import generation, session
from mimix_jax.inference.engine import Engine, generate_ids
from mimix_jax.inference.sampling import SamplingConfig
from mimix_jax.model import transformer as model_lib
from mimix_jax.model.config import ModelConfig
from mimix_jax.text.tokenizer import stop_ids
from test_generate import SMALL, make_run

GREEDY = SamplingConfig(temperature=0.0)


@pytest.fixture(scope="module")
def engine(tok):
  cfg = ModelConfig(vocab_size=tok.vocab_size, **SMALL)
  return Engine(cfg, model_lib.init_params(cfg, seed=0))


def new_session(engine, tok, notices, chat_mode=True, system="Be brief."):
  return session.ChatSession(engine, tok, chat=chat_mode, system=system, sampling=GREEDY, max_new_tokens=6,
                          stop_ids=stop_ids(tok), notify=notices.append)


def fresh_reply(engine, tok, tokens: list[int]) -> list[int]:
  """What the model says after `tokens` decoded from scratch (no chat state)."""
  [g] = generate_ids(engine, [tokens], stop_ids=stop_ids(tok), pad_id=tok.pad_id, max_new_tokens=6)
  return g.tokens


def say(session, text: str) -> list[int]:
  """Runs a chat turn; returns the reply's tokens as booked in the history."""
  list(session.reply(text))
  return session.turns[-1][len(user_turn(session.tokenizer, text)):-1]


def user_turn(tok, text):
  return tok.encode_dialog_prompt([dict(role="user", content=text)], bos=False)


def test_second_turn_reuses_the_cached_history(engine, tok):
  notices = []
  s = new_session(engine, tok, notices)
  first = say(s, "Hi")
  prefix = tok.encode_dialog_prompt([dict(role="system", content="Be brief."), dict(role="user", content="Hi")])
  assert first == fresh_reply(engine, tok, prefix)
  history = prefix + first + [tok.eot_id] + user_turn(tok, "Who?")
  second = say(s, "Who?")
  assert second == fresh_reply(engine, tok, history)
  # The cache holds the whole conversation but the reply's newest token (and its closing eot): nothing was
  # re-encoded, and the assistant turn is closed with <|eot_id|> as in training.
  assert s.cached + len(s.pending) == len(history) + len(second) + 1 and s.pending[-1] == tok.eot_id
  assert notices == []


def test_an_interrupted_reply_stays_in_the_history(engine, tok):
  s = new_session(engine, tok, [], system=None)
  reply = s.reply("Tell me a story")
  next(iter(reply))  # one text piece, then the user presses Ctrl-C
  reply.close()
  partial = s.turns[-1][len(user_turn(tok, "Tell me a story")):-1]
  assert reply.finish_reason == "interrupted" and 1 <= len(partial) < 6
  history = tok.encode_dialog_prompt([dict(role="user", content="Tell me a story")]) + partial + [tok.eot_id]
  assert say(s, "Go on") == fresh_reply(engine, tok, history + user_turn(tok, "Go on"))


def test_ctrl_c_stops_the_reply_not_the_repl(engine, tok):
  class InterruptingOutput:
    """A terminal whose user presses Ctrl-C as soon as the first text appears."""
    text = ""

    def write(self, s):
      if not self.text:
        os.kill(os.getpid(), signal.SIGINT)
      self.text += s

    def flush(self):
      pass

  s = new_session(engine, tok, [], system=None)
  out = InterruptingOutput()
  handler = signal.getsignal(signal.SIGINT)
  chat.turn(s, "Tell me a story", out)  # a KeyboardInterrupt here would fail the test
  assert out.text.endswith(" [stopped]\n") and len(s.turns) == 1
  assert signal.getsignal(signal.SIGINT) is handler


def test_context_overflow_drops_the_oldest_turns(engine, tok):
  notices = []
  s = new_session(engine, tok, notices)
  messages = [f"Question number {i} about the weather today" for i in range(6)]
  for text in messages:
    say(s, text)
    if notices:
      break
  assert notices and "dropped" in notices[0]
  # The last reply is what the model says after the system message, the kept turns and the question.
  kept = [t for turn in s.turns[:-1] for t in turn]
  assert len(s.turns) - 1 < messages.index(text)
  assert s.turns[-1][len(user_turn(tok, text)):-1] == fresh_reply(engine, tok, s.prefix + kept + user_turn(tok, text))


def test_raw_mode_continues_each_input_independently(engine, tok):
  s = new_session(engine, tok, [], chat_mode=False)
  for text in ("The king", "The king"):
    out = "".join(s.reply(text))
    [g] = generation.generate(engine, tok, [text], sampling=GREEDY, max_new_tokens=6)
    assert out == g.text


def test_params_command_validates_and_applies(engine, tok):
  s = new_session(engine, tok, [])
  session.set_params(s, ["temperature=0.5", "top_k=7", "max_new_tokens=9"])
  assert (s.sampling.temperature, s.sampling.top_k, s.max_new_tokens) == (0.5, 7, 9)
  for bad in (["top_p=2"], ["nope=1"], ["top_k=x"], ["temperature"]):
    with pytest.raises(ValueError):
      session.set_params(s, bad)
  assert (s.sampling.top_p, s.sampling.top_k) == (1.0, 7)


# pexpect forks this (multithreaded, JAX) process; the child execs the REPL at once, so the warning is moot.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called")
def test_repl_in_a_terminal(tmp_path, tokenizer_dir, tok):
  run_dir, _ = make_run(tmp_path / "run", tokenizer_dir, tok.vocab_size, dict(mode="chat"))
  repl = pexpect.spawn(sys.executable, ["-m", "mimix_jax.chat", "--checkpoint", str(run_dir), "--greedy",
                                        "--max_new_tokens", "6"],
                       env={**os.environ, "TERM": "dumb"}, encoding="utf-8", timeout=90)

  def send(line: str, expect: str | None = None) -> str:
    repl.sendline(line)
    repl.expect_exact("user> ")
    out = repl.before
    if expect:
      assert expect in out, out
    return out

  repl.expect_exact("chat mode, context 64 tokens")
  repl.expect_exact("user> ")
  first = send("Hello there", "assistant> ")
  send("How are you?", "assistant> ")
  send("/reset", "[conversation reset]")
  assert send("Hello there", "assistant> ").split("assistant> ")[1] == first.split("assistant> ")[1]
  send("/system You are a pirate.", "[system message set; conversation reset]")
  send("/system", "You are a pirate.")
  send("/params top_k=5", "top_k=5")
  outputs = [send(f"Question number {i} about the weather today") for i in range(6)]
  assert any("[context full (64 tokens): dropped the" in out for out in outputs), outputs
  send("/help", "/system TEXT")
  repl.sendline("/exit")
  repl.expect(pexpect.EOF)
  repl.close()
  assert repl.exitstatus == 0


@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called")
def test_ctrl_c_during_the_first_compile_stops_the_reply_and_keeps_the_conversation(tmp_path, tokenizer_dir, tok):
  run_dir, _ = make_run(tmp_path / "run", tokenizer_dir, tok.vocab_size, dict(mode="chat"))
  repl = pexpect.spawn(sys.executable, ["-m", "mimix_jax.chat", "--checkpoint", str(run_dir), "--greedy",
                                        "--max_new_tokens", "6"],
                       env={**os.environ, "TERM": "dumb"}, encoding="utf-8", timeout=120)
  repl.expect_exact("user> ")
  repl.sendline("Hello there")
  time.sleep(0.3)  # the first turn compiles the prefill and the decode step: seconds
  repl.sendintr()
  repl.expect_exact("[stopped]")
  repl.expect_exact("user> ")
  assert "Traceback" not in repl.before
  repl.sendline("And now?")
  repl.expect_exact("assistant> ")
  repl.expect_exact("user> ")
  repl.sendline("/exit")
  repl.expect(pexpect.EOF)
  repl.close()
  assert repl.exitstatus == 0 and repl.signalstatus is None
