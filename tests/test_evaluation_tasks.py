"""Benchmark task definitions against lm-evaluation-harness itself, without a model: the prompts of every task
(0-shot and few-shot, default and other seeds) equal the requests lm-eval builds from the same files, our
metrics equal its process_results, our request encoding equals its TemplateLM's with our tokenizer; task files
are read from jsonl and parquet and bad rows stop with one line naming file, row and field."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lm_eval.api.model import TemplateLM

from bench import lm_eval_harness as harness
from mimix_jax.evaluation import encoding, metrics, prompts, runner, sample_tasks, taskdata
from mimix_jax.evaluation.tasks import TASKS


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
  return sample_tasks.write(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def task_dir(task_files):
  return next(iter(task_files["arc_easy"].values())).parent


@pytest.fixture(scope="module")
def lm_eval_task(task_files, tmp_path_factory):
  """lm_eval_task(name, num_fewshot, seed) -> the lm-eval task object, its requests built (lm-eval's own API)."""
  from lm_eval.tasks import TaskManager, get_task_dict
  configs = tmp_path_factory.mktemp("configs")
  harness.write_configs(task_files, configs, cache_dir=tmp_path_factory.mktemp("datasets_cache"))
  manager = TaskManager(include_path=str(configs), include_defaults=False)

  def build(name, num_fewshot, seed=1234):
    task = get_task_dict([harness.PREFIX + name], manager)[harness.PREFIX + name]
    task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed=seed)  # what simple_evaluate does with its fewshot_random_seed (default 1234)
    task.build_all_requests()
    return task
  return build


def lm_eval_requests(task) -> dict[int, list[tuple[str, str]]]:
  out: dict[int, list] = {}
  for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
    out.setdefault(inst.doc_id, []).append(tuple(inst.arguments))
  return out


@pytest.mark.parametrize("name", list(TASKS))
def test_prompts_equal_lm_evals_at_zero_and_two_shots_and_another_seed(name, task_dir, lm_eval_task):
  for num_fewshot, seed in ((0, 1234), (2, 1234), (3, 7)):
    ours = runner.load_examples(TASKS[name], task_dir, num_fewshot, seed=seed)
    theirs = lm_eval_requests(lm_eval_task(name, num_fewshot, seed))
    assert len(ours) == len(theirs) == 24
    for ex in ours:
      assert ex.requests == theirs[ex.doc_id], (name, num_fewshot, ex.doc_id)


def test_few_shot_prompts_are_a_function_of_the_seed(task_dir):
  """Same seed, same prompts (also under --limit, which keeps the first docs' contexts); another seed, others."""
  def contexts(seed, limit=None):
    return [ex.requests[0][0] for ex in runner.load_examples(TASKS["hellaswag"], task_dir, 3, limit, seed)]
  assert contexts(1234) == contexts(1234)
  assert contexts(1234, limit=5) == contexts(1234)[:5]
  assert contexts(1234) != contexts(99)
  # A doc never serves as its own example when lm-eval excludes it (hellaswag has no test split).
  docs = taskdata.load_docs(TASKS["hellaswag"], "train", task_dir)
  sampler = prompts.FewshotSampler(docs, seed=0)
  assert all(docs[i] not in sampler.sample(9, docs[i]) for i in range(len(docs)))


@pytest.mark.parametrize("name", ["arc_easy", "hellaswag", "winogrande", "lambada_openai", "boolq"])
def test_metrics_equal_lm_evals_process_results(name, task_dir, lm_eval_task):
  task = lm_eval_task(name, 0)
  docs = list(task.eval_docs)
  rng = np.random.default_rng(0)
  for ex in runner.load_examples(TASKS[name], task_dir, 0):
    n = len(ex.requests)
    # Tied and near-tied values too: np.argmax's first-wins rule must be the same on both sides.
    lls = [float(x) for x in rng.choice([-3.0, -3.0, -7.5, -1.25], n)] if ex.doc_id % 2 else \
        [float(x) for x in rng.normal(-20, 5, n)]
    greedy = [bool(g) for g in rng.integers(0, 2, n)]
    ours = metrics.score_example(TASKS[name], ex, lls, greedy)
    theirs = task.process_results(docs[ex.doc_id], list(zip(lls, greedy)))
    assert {k: ours[k] for k in theirs if k != "perplexity"} == {k: v for k, v in theirs.items() if k != "perplexity"}
    assert set(theirs) - {"perplexity"} == {k for k in ("acc", "acc_norm") if k in ours}


def test_acc_norm_divides_by_characters_not_bytes():
  """lm-eval's acc_norm uses len(choice): a curly quote is 3 bytes but one character. Per character the
  second choice wins (-2/3 < -3/6); per byte the first would (-2/7 > -3/6)."""
  ex = prompts.Example("arc_easy", 0, [("q", " “a”"), ("q", " abcdef")], ["“a”", "abcdef"], gold=1)
  record = metrics.score_example(TASKS["arc_easy"], ex, [-2.0, -3.0], [False, False])
  assert (record["pred"], record["pred_norm"], record["acc"], record["acc_norm"]) == (0, 1, 0.0, 1.0)


def test_core_centers_on_nanochats_random_baselines():
  chance = {name: t.chance for name, t in TASKS.items()}
  assert chance == {"hellaswag": 0.25, "arc_easy": 0.25, "arc_challenge": 0.25, "piqa": 0.5, "winogrande": 0.5,
                    "openbookqa": 0.25, "boolq": 0.62, "lambada_openai": 0.0}  # DCLM eval_meta_data.csv
  tasks = list(TASKS.values())
  at_chance = {t.name: {"acc": t.chance, "acc_norm": t.chance if "acc_norm" in t.metrics else None} for t in tasks}
  perfect = {t.name: {"acc": 1.0, "acc_norm": 1.0 if "acc_norm" in t.metrics else None} for t in tasks}
  assert metrics.core(tasks, at_chance) == pytest.approx(0.0) and metrics.core(tasks, perfect) == pytest.approx(1.0)
  # acc_norm is what is centered where the task reports it.
  hs = TASKS["hellaswag"]
  assert metrics.centered(hs, {"acc": 1.0, "acc_norm": 0.25}) == pytest.approx(0.0)


class Recorder(TemplateLM):
  """lm-eval's TemplateLM around our tokenizer, with HFLM's tok_encode (its default add_special_tokens: the
  export's bos first), recording the token pairs it hands to _loglikelihood_tokens."""

  def __init__(self, tok):
    super().__init__()
    self.tok, self.pairs = tok, []

  @property
  def eot_token_id(self):
    return self.tok.eos_id

  @property
  def prefix_token_id(self):  # HFLM's: the tokenizer's bos
    return self.tok.bos_id

  def tok_encode(self, string, add_special_tokens=None, **kwargs):
    return self.tok.encode(string, bos=add_special_tokens is not False)

  def _loglikelihood_tokens(self, requests, **kwargs):
    self.pairs = [(c, x) for _, c, x in requests]
    return [(0.0, False)] * len(requests)

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    raise NotImplementedError

  def generate_until(self, requests, disable_tqdm=False):
    raise NotImplementedError


def test_request_encoding_equals_lm_evals_template_lm(tok, task_dir):
  from lm_eval.api.instance import Instance
  requests = [r for name in TASKS for ex in runner.load_examples(TASKS[name], task_dir, 2)[:4] for r in ex.requests]
  requests += [("Answer: ", "x"), ("ends in spaces \n ", " y"), ("", "alone"), ("", " alone")]  # moves, empty
  lm = Recorder(tok)
  lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)], disable_tqdm=True)
  ours = encoding.encode_requests(tok, requests, max_len=10_000)
  for (ctx, cont), (tokens, n_cont) in zip(lm.pairs, ours):
    assert tokens.tolist() == ctx + cont and n_cont == len(cont)
  # Too long for the model: the last max_len + 1 tokens, the continuation whole (HFLM._loglikelihood_tokens).
  (full, n_full), = encoding.encode_requests(tok, [requests[0]], max_len=10_000)
  (cut, n_cut), = encoding.encode_requests(tok, [requests[0]], max_len=16)
  assert len(full) > 17 and cut.tolist() == full[-17:].tolist() and n_cut == n_full


# ----------------------------------------------------------------------------------------------------- files

def test_rows_read_alike_from_jsonl_with_bom_and_from_parquet(tmp_path):
  rows = [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "shout at it", "label": 0},
          {"goal": "Cross “a” river", "sol1": "swim", "sol2": "take a boat", "label": 1, "note": "extra column"}]
  (tmp_path / "piqa.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n\n".join(json.dumps(r, ensure_ascii=False)
                                                                      for r in rows).encode() + b"\n")
  from_jsonl = taskdata.load_docs(TASKS["piqa"], "validation", tmp_path)
  assert from_jsonl[0]["note"] is None and from_jsonl[1]["note"] == "extra column"  # as `datasets` fills them
  (tmp_path / "piqa.jsonl").unlink()
  pq.write_table(pa.Table.from_pylist([{**r, "note": r.get("note")} for r in rows]), tmp_path / "piqa.parquet")
  assert taskdata.load_docs(TASKS["piqa"], "validation", tmp_path) == from_jsonl
  (tmp_path / "piqa.jsonl").write_text(json.dumps(rows[0]) + "\n")
  with pytest.raises(taskdata.TaskDataError, match="both exist"):
    taskdata.load_docs(TASKS["piqa"], "validation", tmp_path)


GOOD_ARC = {"id": "x", "question": "Which?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}


@pytest.mark.parametrize("row, field, problem", [
    ({k: v for k, v in GOOD_ARC.items() if k != "answerKey"}, "answerKey", "is missing"),
    ({**GOOD_ARC, "choices": {"text": ["a", "b"]}}, "choices.label", "is missing"),
    ({**GOOD_ARC, "choices": {"text": ["a", 2], "label": ["A", "B"]}}, "choices.text[1]", "must be str, got int"),
    ({**GOOD_ARC, "question": None}, "question", "must be str, got null"),
    ({**GOOD_ARC, "answerKey": "C"}, "answerKey", "'C' is not one of choices.label ['A', 'B']"),
])
def test_a_bad_row_stops_with_one_line_naming_file_row_and_field(tmp_path, row, field, problem):
  path = tmp_path / "arc_easy.jsonl"
  path.write_text(json.dumps(GOOD_ARC) + "\n" + json.dumps(row) + "\n")
  with pytest.raises(taskdata.TaskDataError) as e:
    taskdata.load_docs(TASKS["arc_easy"], "test", tmp_path)
  message = str(e.value)
  assert message.startswith(f"{path}: row 2: field {field!r} {problem}") and "\n" not in message
  assert "question, choices{text,label}, answerKey" in message  # the schema the row should have


@pytest.mark.parametrize("task, row, expected", [
    ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": True}, "field 'label' must be int, got bool"),
    ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": 2}, "field 'label' must index the 2 choices"),
    ("winogrande", {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}, "has no '_' blank"),
    ("winogrande", {"sentence": "a _ b", "option1": "a", "option2": "b", "answer": 1}, "must be str, got int"),
    ("hellaswag", {"activity_label": "x", "ctx_a": "a", "ctx_b": "b", "endings": ["e"], "label": "1"},
     "must index the 1 choices"),
    ("boolq", "[1, 2]", "a JSON object is needed, got list"),
    ("boolq", '{"question": ', "not valid JSON"),
])
def test_more_bad_rows(tmp_path, task, row, expected):
  path = tmp_path / f"{task}.jsonl"
  path.write_text("\n" + (row if isinstance(row, str) else json.dumps(row)) + "\n")
  with pytest.raises(taskdata.TaskDataError, match=f"^{re.escape(str(path))}: row 2: .*{expected}"):
    taskdata.load_docs(TASKS[task], TASKS[task].eval_split, tmp_path)


def test_a_missing_split_says_which_file_and_how_to_do_without(task_dir, tmp_path):
  (tmp_path / "piqa.jsonl").write_text((task_dir / "piqa.jsonl").read_text())
  assert len(runner.load_examples(TASKS["piqa"], tmp_path, 0)) == 24  # zero-shot needs no train split
  with pytest.raises(taskdata.TaskDataError, match=f"^{re.escape(str(tmp_path))}/piqa.train.jsonl \\(or .parquet\\) not found: .*"
                                                   "few-shot examples from \\(or run with --num_fewshot 0\\)"):
    runner.load_examples(TASKS["piqa"], tmp_path, 1)
  with pytest.raises(taskdata.TaskDataError, match="boolq.jsonl \\(or .parquet\\) not found: write the validation"):
    runner.load_examples(TASKS["boolq"], tmp_path, 0)
  # lambada draws its shots from the evaluated split: no other file, but enough rows.
  (tmp_path / "lambada_openai.jsonl").write_text('{"text": "one two"}\n{"text": "three four"}\n')
  assert runner.load_examples(TASKS["lambada_openai"], tmp_path, 2)[0].requests[0][0].count("\n\n") == 2
  with pytest.raises(taskdata.TaskDataError, match="lambada_openai: --num_fewshot 3 needs at least 3 rows"):
    runner.load_examples(TASKS["lambada_openai"], tmp_path, 3)


def test_sample_task_files_are_a_function_of_the_seed(tmp_path):
  a, b, c = (sample_tasks.write(tmp_path / d, n_eval=6, n_train=4, seed=s) for d, s in (("a", 3), ("b", 3), ("c", 4)))
  assert a.keys() == set(TASKS)
  for name in a:
    for split in a[name]:
      assert a[name][split].read_bytes() == b[name][split].read_bytes() != c[name][split].read_bytes()
