"""A local mirror of the gpt_large recipe's hub datasets, made from the shipped data, for the rehearsal.

    python launch/gpt_large/make_mirror.py --output MIRROR [--docs N]

MIRROR/datasets/ORG/NAME/ holds, for every source in sources.json, files at the paths the hub uses, in the
hub's schemas (FineWeb's `text` with its metadata columns; ultrachat's and tulu's `messages`; OpenHermes' and
SlimOrca's `conversations` of from/value; UltraFeedback's `prompt` and `chosen` / `rejected` conversations), plus
files the recipe must NOT fetch (ultrachat's test and generation splits, other FineWeb dumps, another language of
Wikipedia). Built in a temporary folder and renamed: an interrupted build leaves no mirror.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from mimix_jax import io_utils  # noqa: E402

DATA = REPO / "data"


def documents(n: int, seed: int) -> list[str]:
  """n pieces of shipped public-domain text, a few paragraphs each."""
  paragraphs = []
  for path in sorted((DATA / "corpus" / "train").glob("*.txt.gz")):
    paragraphs += [p.strip() for p in gzip.open(path, "rt", encoding="utf-8").read().split("\n\n") if len(p) > 200]
  rng = random.Random(seed)
  return ["\n\n".join(rng.sample(paragraphs, 3)) for _ in range(n)]


def conversations() -> list[list[dict]]:
  rows = []
  for name in ("chatterbot_en", "fastchat_identity", "mt_bench_reference"):
    for line in gzip.open(DATA / "chat" / "sft" / f"{name}.jsonl.gz", "rt", encoding="utf-8"):
      rows.append(json.loads(line)["messages"])
  return rows


def pairs() -> list[dict]:
  return [json.loads(line) for line in gzip.open(DATA / "chat" / "dpo" / "chatterbot_mismatch_pairs.jsonl.gz", "rt")]


def parquet(path: Path, rows: list[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), path)


def web_rows(docs: list[str], dump: str, edu: bool = False) -> list[dict]:
  rows = [{"text": t, "id": f"<urn:uuid:{dump}-{i}>", "dump": dump, "url": f"https://example.org/{dump}/{i}",
           "date": "2024-01-01T00:00:00Z", "file_path": f"s3://commoncrawl/{dump}/{i}.warc.gz", "language": "en",
           "language_score": 0.97, "token_count": len(t.split())} for i, t in enumerate(docs)]
  if edu:
    for r in rows:
      r.update(score=3.1, int_score=3)
  return rows


def as_from_value(messages: list[dict]) -> list[dict]:
  return [{"from": {"user": "human", "assistant": "gpt", "system": "system"}[m["role"]], "value": m["content"]}
          for m in messages]


def build(root: Path, n_docs: int) -> None:
  docs, chats = documents(n_docs, seed=0), conversations()
  half = len(docs) // 2
  ds = root / "datasets"
  parquet(ds / "HuggingFaceFW/fineweb/sample/100BT/000_00000.parquet", web_rows(docs[:half], "CC-MAIN-2024-10"))
  parquet(ds / "HuggingFaceFW/fineweb/sample/100BT/001_00000.parquet", web_rows(docs[half:], "CC-MAIN-2024-18"))
  parquet(ds / "HuggingFaceFW/fineweb/data/CC-MAIN-2013-20/000_00000.parquet", web_rows(docs[:3], "NOT-FETCHED"))
  parquet(ds / "HuggingFaceFW/fineweb-edu/sample/10BT/000_00000.parquet", web_rows(docs[half:], "CC-MAIN-2024-10",
                                                                                  edu=True))
  wiki = [{"id": str(i), "url": f"https://en.wikipedia.org/wiki?curid={i}", "title": t.split()[0], "text": t}
          for i, t in enumerate(docs[:half])]
  parquet(ds / "wikimedia/wikipedia/20231101.en/train-00000-of-00001.parquet", wiki)
  parquet(ds / "wikimedia/wikipedia/20231101.de/train-00000-of-00001.parquet", wiki[:3])
  ultra = [{"prompt": m[0]["content"], "prompt_id": f"{i:08x}", "messages": m} for i, m in enumerate(chats)]
  for split, rows in (("train_sft", ultra), ("test_sft", ultra[:20]), ("train_gen", ultra[:20]), ("test_gen", ultra[:20])):
    parquet(ds / f"HuggingFaceH4/ultrachat_200k/data/{split}-00000-of-00001.parquet", rows)
  hermes = [{"conversations": as_from_value(m), "source": "mirror"} for m in chats[::2]]
  (ds / "teknium/OpenHermes-2.5").mkdir(parents=True)
  io_utils.write_json(ds / "teknium/OpenHermes-2.5/openhermes2_5.json", hermes)
  orca = [{"conversations": [{"from": "system", "value": "You are a helpful assistant."}, *as_from_value(m)]}
          for m in chats[1::2]]
  (ds / "Open-Orca/SlimOrca").mkdir(parents=True)
  io_utils.write_text(ds / "Open-Orca/SlimOrca/oo-labeled_correct.gpt4.sharegpt.jsonl",
                      "".join(json.dumps(r) + "\n" for r in orca))
  tulu = [{"dataset": "mirror", "id": f"mirror_{i}", "messages": m} for i, m in enumerate(chats[::3])]
  parquet(ds / "allenai/tulu-v2-sft-mixture/data/train-00000-of-00001.parquet", tulu)
  feedback = [{"source": "mirror", "prompt": p["prompt"][0]["content"], "chosen": p["prompt"] + p["chosen"],
               "chosen-rating": 5.0, "chosen-model": "a", "rejected": p["prompt"] + p["rejected"],
               "rejected-rating": 1.0, "rejected-model": "b"} for p in pairs()]
  parquet(ds / "argilla/ultrafeedback-binarized-preferences-cleaned/data/train-00000-of-00001.parquet", feedback)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--output", required=True)
  p.add_argument("--docs", type=int, default=600, help="web documents (FineWeb, FineWeb-Edu, Wikipedia)")
  args = p.parse_args(argv)
  if (Path(args.output) / "datasets").is_dir():
    print(f"have the mirror {args.output}")
    return 0
  with io_utils.atomic_output_dir(args.output, overwrite=True) as tmp:
    build(tmp, args.docs)
  print(f"mirror of the recipe's datasets (from the shipped data) -> {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
