"""The chat page in a real headless Chromium (Debian's, driven by playwright): a reply streams in, Stop stops one.

Skips only when no Chromium is installed and MIMIX_REQUIRE_BROWSER is unset (CI sets it, so CI fails instead).
"""

from __future__ import annotations

import os
import shutil

import httpx2 as httpx
import pytest

from mimix_jax.inference import generation
from mimix_jax.inference.sampling import SamplingConfig
from test_generate import run_engine
from test_serve import QUESTIONS, make_chat_run, serving

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM) and not os.environ.get("MIMIX_REQUIRE_BROWSER"):
  pytest.skip("no chromium installed (apt-get install chromium); MIMIX_REQUIRE_BROWSER=1 makes this a failure",
              allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402 - after the skip


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tokenizer_dir, tok):
  return make_chat_run(tmp_path_factory.mktemp("page"), tokenizer_dir, tok)


@pytest.fixture(scope="module")
def server(chat_run):
  with serving(chat_run, "--max_batch", "2") as url:
    yield url


@pytest.fixture(scope="module")
def page(server):
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
    page = browser.new_page()
    page.goto(server + "/")
    expect(page.locator("#model")).to_have_text("chatrun")
    yield page
    browser.close()


def send(page, text: str, max_tokens: int) -> None:
  page.fill("#temperature", "0")
  page.fill("#max_tokens", str(max_tokens))
  page.fill("#input", text)
  page.click("#send")


def test_a_reply_streams_in_and_equals_the_library(page, chat_run, tok):
  page.fill("#system", "Be brief.")
  send(page, "Who was the king?", 12)
  reply = page.locator(".assistant").last
  expect(reply).not_to_have_attribute("data-streaming", "true", timeout=60_000)
  [want] = generation.generate(run_engine(chat_run), tok, ["Who was the king?"], chat=True, system="Be brief.",
                               sampling=SamplingConfig(temperature=0.0), max_new_tokens=12)
  assert reply.text_content() == want.text
  assert page.locator(".user").last.text_content() == "Who was the king?"


def runs_to_length(server: str, question: str) -> bool:
  body = {"model": "chatrun", "max_tokens": 900, "temperature": 0, "messages": [
      {"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]}
  return httpx.post(server + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0][
      "finish_reason"] == "length"


def test_stop_ends_a_streaming_reply_and_frees_its_slot(page, server):
  question = next(q for q in QUESTIONS if runs_to_length(server, q))  # a reply long enough to be stopped
  page.click("#clear")
  send(page, question, 900)
  # text on the page while the reply is still streaming: it arrives token by token, not at the end
  page.wait_for_function("() => { const m = [...document.querySelectorAll('.assistant')].pop();"
                         " return m.dataset.streaming === 'true' && m.textContent.length > 0; }", timeout=60_000)
  page.click("#stop")
  reply = page.locator(".assistant").last
  expect(reply).to_contain_text("[stopped]")
  expect(page.locator("#send")).to_be_enabled()
  health = httpx.get(server + "/health").json()
  for _ in range(100):
    if health["busy"] == 0:
      break
    page.wait_for_timeout(50)
    health = httpx.get(server + "/health").json()
  assert health["busy"] == 0 and health["finished"].get("cancelled", 0) >= 1


def test_clear_empties_the_conversation(page):
  assert page.locator(".msg").count() > 0
  page.click("#clear")
  assert page.locator(".msg").count() == 0
