"""Preprocessing on shipped data: every input format, every SFT schema, DPO layouts, bad records, determinism."""

from __future__ import annotations

import csv
import gzip
import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DPO_FILE, SFT_DIR, SMALL_BOOKS, run_preprocess, run_with_umask
from mimix_jax.data import readers
from mimix_jax.data.packing import DocumentPacker
from mimix_jax.data.shards import LAYOUTS, ShardWriter, read_manifest


def load_sequences(shard_dir: Path) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray | None]]:
  """All stored sequences (tokens, segment ids, loss mask or None) in order, straight from the .npy files."""
  m = read_manifest(shard_dir)
  toks, segs, masks = [], [], []
  for shard in m["shards"]:
    load = lambda key: np.load(shard_dir / f"{shard['name']}.{key}.npy")
    t, s, off = load("tokens"), load("segment_ids"), load("offsets")
    mk = load("loss_mask") if m["stage"] != "pretrain" else None
    for a, b in zip(off[:-1], off[1:]):
      toks.append(t[a:b].astype(np.int64))
      segs.append(s[a:b].astype(np.int64))
      masks.append(None if mk is None else mk[a:b])
  return toks, segs, masks


def unpack_documents(tok, rows: list[np.ndarray]) -> list[list[int]]:
  """Inverts pretrain packing: drop padding and each continuation row's repeated first token, split at bos."""
  stream: list[int] = []
  for k, row in enumerate(rows):
    row = row[row != tok.pad_id]
    stream += row[1:].tolist() if k and row[0] != tok.bos_id else row.tolist()
  docs, cur = [], None
  for t in stream:
    if t == tok.bos_id:
      cur = [t]
      docs.append(cur)
    else:
      cur.append(t)
  return docs


def shard_bytes(shard_dir: Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(shard_dir.glob("*.npy"))}


def book_texts() -> list[str]:
  return [gzip.open(p, "rt", encoding="utf-8").read() for p in SMALL_BOOKS]


def test_pretrain_loses_no_token_and_packs_full_rows(tok, tokenizer_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(readers, "TXT_PART_BYTES", 8192)  # books arrive in many paragraph-aligned parts
  out = tmp_path / "pt"
  assert run_preprocess(tokenizer_dir, out, "pretrain", SMALL_BOOKS, 100) == 0
  m = read_manifest(out)
  rows, segs, _ = load_sequences(out)
  expected = [tok.encode(t, bos=True, eos=True) for t in book_texts()]
  assert unpack_documents(tok, rows) == expected
  assert m["tokens"] == sum(map(len, expected))
  n_continuations = sum(1 for r in rows[1:] if r[0] != tok.bos_id)
  n_pad = sum(int((s == 0).sum()) for s in segs)
  assert m["tokens_stored"] == m["tokens"] + n_continuations + n_pad == sum(map(len, rows))
  assert all(len(r) == 101 for r in rows[:-1]) and 0 < len(rows[-1]) <= 101
  assert m["records_read"] == m["records_written"] == 2 and m["skipped"] == {}
  assert m["examples"] == len(rows) and m["stage"] == "pretrain" and m["max_len"] == 100
  assert m["tokenizer_sha256"] == tok.sha256()
  for r, s in zip(rows, segs):  # segments count documents within a row, from 1
    starts = np.flatnonzero(r == tok.bos_id)
    assert s[0] == 1 and np.all(np.diff(s) >= 0)
    assert s[-1] == 1 + len(starts) - (r[0] == tok.bos_id)


def test_jsonl_parquet_csv_and_txt_inputs_agree(tok, tokenizer_dir, tmp_path):
  paras = [p for p in book_texts()[0].split("\n\n") if p.strip()][:400]
  (tmp_path / "in").mkdir()
  with gzip.open(tmp_path / "in" / "a.jsonl.gz", "wt", encoding="utf-8") as f:
    for p in paras[:150]:
      f.write(json.dumps({"text": p, "n": 1}) + "\n")
  pq.write_table(pa.table({"text": paras[150:300], "n": list(range(150))}), tmp_path / "in" / "b.parquet", row_group_size=40)
  with open(tmp_path / "in" / "c.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, ["n", "text"])
    w.writeheader()
    w.writerows({"n": 0, "text": p} for p in paras[300:350])
  (tmp_path / "in" / "d.txt").write_text("\n<|endoftext|>\n".join(paras[350:]), encoding="utf-8")
  (tmp_path / "in" / "README.md").write_text("not an input")  # ignored inside a directory
  out = tmp_path / "mixed"
  assert run_preprocess(tokenizer_dir, out, "pretrain", [tmp_path / "in"], 64) == 0
  m = read_manifest(out)
  assert m["records_read"] == m["records_written"] == len(paras) and m["skipped"] == {}
  assert [Path(i["path"]).name for i in m["inputs"]] == ["a.jsonl.gz", "b.parquet", "c.csv", "d.txt"]
  # The txt file's last document has no trailing newline; others as written.
  docs = unpack_documents(tok, load_sequences(out)[0])
  assert docs == [tok.encode(p, bos=True, eos=True) for p in paras[:350]] + \
      [tok.encode(p + "\n", bos=True, eos=True) for p in paras[350:-1]] + [tok.encode(paras[-1], bos=True, eos=True)]


def test_shards_are_deterministic_and_independent_of_workers(tokenizer_dir, tmp_path):
  paras = [p for p in book_texts()[0].split("\n\n") if p.strip()]
  (tmp_path / "paras.jsonl").write_text("".join(json.dumps({"body": p}) + "\n" for p in paras))
  inputs = [*SMALL_BOOKS, tmp_path / "paras.jsonl"]
  for name, workers in (("a", "1"), ("b", "1"), ("c", "2")):
    assert run_preprocess(tokenizer_dir, tmp_path / name, "pretrain", inputs, 50, "--workers", workers,
                          "--text_field", "body") == 0
  a, b, c = (shard_bytes(tmp_path / n) for n in "abc")
  assert a == b == c and len(a) == 3
  ma, mc = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "c")
  assert ma["records_written"] == len(paras) + 2 and ma["skipped"] == {}
  assert {k: v for k, v in ma.items() if k != "command"} == {k: v for k, v in mc.items() if k != "command"}
  assert "--workers 2" in mc["command"]


SCHEMA_RECORDS = [
    {"conversations": [{"from": "human", "value": "Who wrote Hamlet?"}, {"from": "gpt", "value": "Shakespeare."}]},
    {"conversation": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "times 3?"}, {"role": "assistant", "content": "12"}]},
    {"system_prompt": "You answer in French.", "question": "Hello?", "response": "Bonjour."},
    {"question": "No system prompt here?", "response": "None at all."},
]


def test_sft_accepts_every_reference_schema(tok, tokenizer_dir, tmp_path):
  src = tmp_path / "schemas.jsonl"
  src.write_text("".join(json.dumps(r) + "\n" for r in SCHEMA_RECORDS))
  out = tmp_path / "sft"
  assert run_preprocess(tokenizer_dir, out, "sft", [src], 256, "--system_message", "Default system.") == 0
  m = read_manifest(out)
  assert m["records_written"] == 5 and m["skipped"] == {}
  toks, segs, masks = load_sequences(out)
  rendered = [tok.decode(t, skip_special=False) for t in toks]
  H = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"
  assert rendered[0] == f"<|begin_of_text|>{H('system')}Default system.<|eot_id|>{H('user')}Who wrote Hamlet?<|eot_id|>{H('assistant')}Shakespeare.<|eot_id|>"
  assert rendered[1].startswith(f"<|begin_of_text|>{H('system')}Be kind.<|eot_id|>{H('user')}Hi")  # own system kept
  assert rendered[3].startswith(f"<|begin_of_text|>{H('system')}You answer in French.<|eot_id|>{H('user')}Hello?")
  trained = [tok.decode(t[mk == 1], skip_special=False) for t, mk in zip(toks, masks)]
  assert trained == ["Shakespeare.<|eot_id|>", "Hello!<|eot_id|>", "4<|eot_id|>12<|eot_id|>", "Bonjour.<|eot_id|>",
                     "None at all.<|eot_id|>"]
  assert all(np.all(s == 1) for s in segs)


def test_sft_shipped_files_truncation_and_packing(tok, tokenizer_dir, tmp_path):
  inputs = sorted(SFT_DIR.glob("*.jsonl.gz"))
  assert run_preprocess(tokenizer_dir, tmp_path / "full", "sft", inputs, 4096) == 0
  full = read_manifest(tmp_path / "full")
  assert full["records_read"] == full["records_written"] == 2026 + 500 + 60 and full["truncated"] == {}
  assert run_preprocess(tokenizer_dir, tmp_path / "short", "sft", inputs, 96) == 0
  short = read_manifest(tmp_path / "short")
  toks, _, masks = load_sequences(tmp_path / "short")
  assert all(len(t) <= 97 and mk.any() for t, mk in zip(toks, masks))
  assert short["truncated"]["at_turn"] > 0 and short["truncated"]["mid_turn"] > 0
  assert short["skipped"] == {"no_target_within_max_len": short["records_read"] - short["records_written"]}
  at_turn = [t for t in toks if t[-1] == tok.eot_id]
  assert len(at_turn) >= short["records_written"] - short["truncated"]["mid_turn"]
  # Packing stores the same conversations, whole, several per sequence.
  assert run_preprocess(tokenizer_dir, tmp_path / "packed", "sft", inputs, 96, "--pack") == 0
  packed = read_manifest(tmp_path / "packed")
  ptoks, psegs, pmasks = load_sequences(tmp_path / "packed")
  assert packed["examples"] < short["examples"] and packed["tokens"] == short["tokens"]
  assert np.array_equal(np.concatenate(ptoks), np.concatenate(toks))
  assert np.array_equal(np.concatenate(pmasks), np.concatenate(masks))
  assert all(len(t) <= 97 for t in ptoks)
  assert sum(int(s.max()) for s in psegs) == short["examples"]


def test_dpo_layouts_mask_only_the_completion(tok, tokenizer_dir, tmp_path):
  lines = gzip.open(DPO_FILE, "rt", encoding="utf-8").readlines()[:40]
  shipped40 = tmp_path / "shipped40.jsonl"
  shipped40.write_text("".join(lines))
  pairs = [json.loads(line) for line in lines]
  ultra = tmp_path / "ultra.jsonl"  # UltraFeedback: whole conversations, prompt as a string
  ultra.write_text("".join(json.dumps({"prompt": p["prompt"][0]["content"], "chosen": p["prompt"] + p["chosen"],
                                       "rejected": p["prompt"] + p["rejected"]}) + "\n" for p in pairs))
  plain = tmp_path / "plain.jsonl"  # prompt + chosen + reject as strings
  plain.write_text("".join(json.dumps({"prompt": p["prompt"][0]["content"], "chosen": p["chosen"][0]["content"],
                                       "reject": p["rejected"][0]["content"]}) + "\n" for p in pairs))
  for name, src in (("shipped", shipped40), ("ultra", ultra), ("plain", plain)):
    assert run_preprocess(tokenizer_dir, tmp_path / name, "dpo", [src], 1024) == 0
  assert shard_bytes(tmp_path / "shipped") == shard_bytes(tmp_path / "ultra") == shard_bytes(tmp_path / "plain")
  toks, segs, masks = load_sequences(tmp_path / "shipped")
  assert len(toks) == 80 and all(np.all(s == 1) for s in segs)
  for k, p in enumerate(pairs):
    for j, key in enumerate(("chosen", "rejected")):
      t, mk = toks[2 * k + j], masks[2 * k + j]
      assert tok.decode(t[mk == 1], skip_special=False) == p[key][0]["content"].strip() + "<|eot_id|>"
      assert tok.decode(t[mk == 0], skip_special=False).endswith(
          f"{p['prompt'][0]['content'].strip()}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_dpo_pairs_with_truncated_completions_are_dropped(tokenizer_dir, dpo_shards, tmp_path):
  full = read_manifest(dpo_shards)
  assert full["records_read"] == 2026 and full["examples"] == full["records_written"]
  assert run_preprocess(tokenizer_dir, tmp_path / "short", "dpo", [DPO_FILE], 24) == 0
  short = read_manifest(tmp_path / "short")
  dropped = short["skipped"]["completion_truncated"]
  assert dropped > full["skipped"].get("completion_truncated", 0)
  assert short["records_written"] == short["examples"] == 2026 - dropped
  assert short["truncated"]["completion_cut"] > 0
  _, _, masks = load_sequences(tmp_path / "short")
  assert all(m.any() for m in masks)


def write_bad_inputs(d: Path) -> dict[str, int]:
  """A directory of broken inputs next to 3 good records; returns the expected skip counts."""
  d.mkdir()
  lines = [
      b'{"text": "A good first record."}',
      b'{"text": "unterminated',
      b'{"title": "no text field"}',
      b'{"text": 42}',
      b'{"text": "   "}',
      b'["not", "an", "object"]',
      b'{"text": "bad byte \xff here"}',
      b"",
      b'{"text": "A good last record."}',
  ]
  (d / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  (d / "empty.jsonl").write_bytes(b"")
  (d / "broken.jsonl.gz").write_bytes(b"this is not gzip data")
  (d / "doc.txt").write_bytes(b"A good text document.\nwith a bad \xfe line\nand more.\n")
  (d / "list.json").write_text('[{"text": "fine"}, {"text": ""}]')
  return {"malformed_json": 1, "missing_field": 1, "wrong_type": 2, "empty_text": 2, "invalid_utf8": 2,
          "empty_file": 1, "unreadable_file": 1}


def test_bad_records_are_skipped_counted_and_located(tok, tokenizer_dir, tmp_path, capsys):
  expected = write_bad_inputs(tmp_path / "in")
  out = tmp_path / "out"
  assert run_preprocess(tokenizer_dir, out, "pretrain", [tmp_path / "in"], 32) == 0
  m = read_manifest(out)
  assert m["skipped"] == expected
  assert m["records_written"] == 4  # 2 jsonl, the txt document (minus its bad line), 1 from the .json list
  err = capsys.readouterr().err
  assert f"{tmp_path / 'in' / 'mixed.jsonl'}:2: malformed_json" in err
  assert f"{tmp_path / 'in' / 'doc.txt'}:2: invalid_utf8" in err
  assert f"{tmp_path / 'in' / 'list.json'}#2: empty_text" in err
  docs = [tok.decode(d) for d in unpack_documents(tok, load_sequences(out)[0])]
  # Directory order: broken.jsonl.gz, doc.txt, empty.jsonl, list.json, mixed.jsonl.
  assert docs == ["A good text document.\nand more.\n", "fine", "A good first record.", "A good last record."]


def test_strict_and_all_bad_runs_fail_cleanly_without_output(tokenizer_dir, tmp_path, capsys):
  write_bad_inputs(tmp_path / "in")
  out = tmp_path / "out"
  # Shards of the two books are already written (tiny --shard_tokens) when the bad record arrives.
  inputs = [*SMALL_BOOKS, tmp_path / "in" / "mixed.jsonl"]
  assert run_preprocess(tokenizer_dir, out, "pretrain", inputs, 32, "--strict", "--shard_tokens", "1000") == 1
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and f"{tmp_path / 'in' / 'mixed.jsonl'}:2: malformed_json" in err and "--strict" in err
  assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no temp dir left behind
  assert run_preprocess(tokenizer_dir, out, "sft", [tmp_path / "in"], 32) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("preprocess: error: no valid records") and err.count("\n") == 0
  assert not out.exists()
  assert run_preprocess(tokenizer_dir, out, "pretrain", [tmp_path / "nothing*.jsonl"], 32) == 1
  assert "no such file" in capsys.readouterr().err


def test_existing_output_needs_overwrite(tokenizer_dir, pretrain_shards, tmp_path, capsys):
  out = tmp_path / "pt"
  assert run_preprocess(tokenizer_dir, out, "pretrain", SMALL_BOOKS[:1], 64) == 0
  before = shard_bytes(out)
  assert run_preprocess(tokenizer_dir, out, "pretrain", SMALL_BOOKS, 64) == 1
  assert "--overwrite" in capsys.readouterr().err and shard_bytes(out) == before
  assert run_preprocess(tokenizer_dir, out, "pretrain", SMALL_BOOKS, 64, "--overwrite") == 0
  assert shard_bytes(out) == shard_bytes(pretrain_shards)


def test_sample_ratio_is_seeded(tokenizer_dir, tmp_path):
  src = SFT_DIR / "chatterbot_en.jsonl.gz"
  for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
    assert run_preprocess(tokenizer_dir, tmp_path / name, "sft", [src], 128, "--sample_ratio", "0.25", "--seed", seed) == 0
  a, c = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "c")
  assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b") != shard_bytes(tmp_path / "c")
  for m in (a, c):
    assert m["records_written"] + m["sampled_out"] == 2026 and 400 < m["records_written"] < 620


@pytest.mark.parametrize("bad", ["--max_len=0", "--sample_ratio=0"])
def test_invalid_flags_fail(tokenizer_dir, tmp_path, bad, capsys):
  name, value = bad.split("=")
  argv = ["--stage", "pretrain", "--tokenizer", str(tokenizer_dir), "--input", str(SMALL_BOOKS[0]),
          "--output", str(tmp_path / "o"), "--max_len", "8", name, value]
  from mimix_jax import preprocess

  assert preprocess.main(argv) == 1
  assert name in capsys.readouterr().err


def test_packing_predicts_every_document_token_exactly_once(tmp_path):
  """Random documents cut into random parts, packed into short rows of every size from 2 to 9 (seeded)."""
  rng = np.random.default_rng(0)
  bos, eos, pad = 1, 2, 6
  for trial in range(200):
    row_len = int(rng.integers(2, 10))
    docs = [[bos, *rng.integers(10, 99, rng.integers(0, 20)).tolist(), eos] for _ in range(rng.integers(1, 6))]
    out = tmp_path / str(trial)
    out.mkdir()
    writer = ShardWriter(out, LAYOUTS["pretrain"], vocab_size=100, shard_tokens=1 << 20)
    packer = DocumentPacker(row_len, writer, pad, block_rows=int(rng.integers(1, 4)))
    for d in docs:
      cuts = np.sort(rng.choice(np.arange(1, len(d)), min(len(d) - 1, int(rng.integers(0, 4))), replace=False))
      parts = np.split(np.asarray(d, np.int32), cuts)
      for j, part in enumerate(parts):
        packer.add(part, continues_doc=j > 0, ends_doc=j == len(parts) - 1)
    packer.finish()
    writer.flush()
    tokens, segs, offsets = (np.load(out / f"shard-00000.{k}.npy").astype(np.int64) for k in ("tokens", "segment_ids", "offsets"))
    rows = [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    row_segs = [segs[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    assert all(len(r) == row_len for r in rows[:-1])
    assert all(np.all(r[s == 0] == pad) for r, s in zip(rows, row_segs))
    stream = []
    for k, (r, s) in enumerate(zip(rows, row_segs)):
      r = r[s != 0]
      stream += r[1:].tolist() if k and r[0] != bos else r.tolist()
    assert stream == sum(docs, [])
    # (input, target) pairs inside one segment: every document token but bos is a target once.
    targets = sum(int(np.sum((s[1:] == s[:-1]) & (s[1:] != 0))) for s in row_segs)
    assert targets == sum(len(d) - 1 for d in docs)


# ------------------------------------------------------------------ records no reader may die on

DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON, deeper than Python's parser recurses


def write_hostile_inputs(d: Path) -> None:
  """Every format with a UTF-8 byte-order mark, a lone surrogate escape and a 100k-deep nested value among good
  records."""
  d.mkdir(parents=True)
  bom = b"\xef\xbb\xbf"
  (d / "a.jsonl").write_bytes(bom + b'{"text": "first jsonl"}\n{"text": "\\ud800 x"}\n'
                              + b'{"text": %s}\n{"text": "last jsonl"}\n' % DEEP.encode())
  (d / "b.json").write_bytes(bom + b'[{"text": "first json"}, {"text": %s}, {"text": "x \\udfff"}, {broken},'
                             b' {"text": "last json"}]' % DEEP.encode())
  (d / "c.txt").write_bytes(bom + b"a text file\n")
  (d / "d.csv").write_bytes(bom + b"text\na csv row\n")


HOSTILE_SKIPS = {"invalid_utf8": 2, "malformed_json": 3}
HOSTILE_TEXTS = ["first jsonl", "last jsonl", "first json", "last json", "a text file\n", "a csv row"]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_no_single_record_ends_a_run_and_byte_order_marks_are_stripped(tok, tokenizer_dir, tmp_path, workers):
  write_hostile_inputs(tmp_path / "in")
  out = tmp_path / "out"
  r = subprocess.run([sys.executable, "-m", "mimix_jax.preprocess", "--stage", "pretrain", "--tokenizer",
                      str(tokenizer_dir), "--input", str(tmp_path / "in"), "--output", str(out), "--max_len", "32",
                      "--workers", workers], capture_output=True, text=True, cwd=tmp_path, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert read_manifest(out)["skipped"] == HOSTILE_SKIPS
  assert f"{tmp_path / 'in' / 'a.jsonl'}:2: invalid_utf8" in r.stderr and f"{tmp_path / 'in' / 'a.jsonl'}:3: malformed_json" in r.stderr
  assert f"{tmp_path / 'in' / 'b.json'}#2: malformed_json" in r.stderr
  docs = sorted(tok.decode(d) for d in unpack_documents(tok, load_sequences(out)[0]))
  assert docs == sorted(HOSTILE_TEXTS)  # every good record whole, no U+FEFF in any of them


def test_strict_stops_at_a_hostile_record_in_one_line(tokenizer_dir, tmp_path, capsys):
  write_hostile_inputs(tmp_path / "in")
  assert run_preprocess(tokenizer_dir, tmp_path / "out", "pretrain", [tmp_path / "in" / "a.jsonl"], 32, "--strict") == 1
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "a.jsonl:2: invalid_utf8" in err and not (tmp_path / "out").exists()


def test_tokenizer_training_skips_hostile_records(tmp_path):
  write_hostile_inputs(tmp_path / "in")
  book = tmp_path / "in" / "book.txt"
  book.write_text(gzip.open(SMALL_BOOKS[0], "rt").read())
  r = subprocess.run([sys.executable, "-m", "mimix_jax.tokenizer", "--input", str(tmp_path / "in"), "--vocab_size",
                      "600", "--output", str(tmp_path / "tok"), "--num_special_tokens", "8"],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  report = json.loads((tmp_path / "tok" / "training_report.json").read_text())
  assert report["skipped"] == HOSTILE_SKIPS


def _big_input(d: Path, copies: int) -> Path:
  d.mkdir(parents=True, exist_ok=True)
  text = gzip.open(SMALL_BOOKS[0], "rt").read()
  with open(d / "big.jsonl", "w") as f:
    for i in range(copies):
      f.write(json.dumps({"text": f"{i} {text[:20000]}"}) + "\n")
  return d / "big.jsonl"


def test_a_killed_worker_fails_the_run_at_once_naming_its_file(tokenizer_dir, tmp_path):
  import psutil
  src = _big_input(tmp_path / "in", 3000)
  out = tmp_path / "out"
  proc = subprocess.Popen([sys.executable, "-m", "mimix_jax.preprocess", "--stage", "pretrain", "--tokenizer",
                           str(tokenizer_dir), "--input", str(src), "--output", str(out), "--max_len", "64",
                           "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  workers, deadline = [], time.time() + 120
  while time.time() < deadline and len(workers) < 2:
    workers = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    time.sleep(0.05)
  assert len(workers) == 2, "no worker processes appeared"
  workers[0].kill()  # as the OOM killer would
  killed = time.time()
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 1 and time.time() - killed < 30
  line = err.strip().splitlines()[-1]
  assert line.startswith("preprocess: error: a worker process died") and str(src) in line
  assert not out.exists()


def test_a_killed_run_leaves_nothing_and_the_next_run_cleans_its_temporaries(tokenizer_dir, tmp_path):
  src = _big_input(tmp_path / "in", 2000)
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "mimix_jax.preprocess", "--stage", "pretrain", "--tokenizer", str(tokenizer_dir),
         "--input", str(src), "--output", str(out), "--max_len", "64", "--shard_tokens", "20000"]
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while time.time() < deadline and not list(tmp_path.glob(".out.tmp-*/shard-00001.tokens.npy")):
    time.sleep(0.1)
  proc.kill()
  proc.wait()
  assert not out.exists() and list(tmp_path.glob(".out.tmp-*"))  # a half-made temporary, nothing that looks done
  subprocess.run(cmd, check=True, capture_output=True, timeout=300)
  assert read_manifest(out)["records_written"] == 2000 and not list(tmp_path.glob(".out.tmp-*"))


def test_outputs_respect_the_umask(tokenizer_dir, tmp_path):
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "mimix_jax.preprocess", "--stage", "pretrain", "--tokenizer", str(tokenizer_dir),
         "--input", str(SMALL_BOOKS[0]), "--output", str(out), "--max_len", "64"]
  run_with_umask(cmd, 0o002)
  modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]}
  assert modes.pop("out") == 0o775 and set(modes.values()) == {0o664}, modes
