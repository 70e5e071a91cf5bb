"""The package layout and its import rules, read from the source (README, Contributing)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mimix_jax"
COMMANDS = {"tokenizer", "preprocess", "train", "evaluate", "generate", "chat", "export", "import_hf", "demo",
            "download", "serve"}
SHARED = {"io_utils", "cli"}  # top-level library modules
SUBPACKAGES = {"model", "text", "data", "hf", "training", "inference", "evaluation", "serving"}
JAX = {"jax", "jaxlib", "flax", "optax", "orbax"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

# room -> the rooms it may import from (itself always)
ALLOWED = {
    "model": set(),
    "text": {"io_utils"},
    "data": {"text", "io_utils"},
    "hf": {"model", "text", "io_utils"},
    "evaluation": {"model", "text", "data", "io_utils"},
    "training": {"model", "text", "data", "evaluation", "io_utils"},
    "inference": {"model", "text", "io_utils"},
    "serving": {"inference", "model", "text", "io_utils"},
    "io_utils": set(),
    "cli": {"model", "text", "data", "training", "inference", "evaluation", "hf", "io_utils"},
}
NO_JAX = {"data", "hf", "text"}


def modules() -> dict[str, Path]:
  return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
          for p in sorted(PACKAGE.rglob("*.py"))}


def room(module: str) -> str:
  parts = module.split(".")
  if len(parts) == 1:
    return "package"
  if parts[1] in SUBPACKAGES:
    return parts[1]
  if parts[1] in COMMANDS:
    return "command"
  return parts[1]


def imports(path: Path, module: str) -> set[str]:
  """Every module an `import` or `from` names (at any depth in the file), absolute."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
      out.add(base)
      out.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
  return out


def internal(path: Path, module: str, known: dict) -> set[str]:
  return {m for m in imports(path, module) if m in known and m != module}


def test_every_module_is_in_a_known_room():
  for module in modules():
    assert room(module) in ALLOWED or room(module) in ("command", "package"), module


def test_import_rules():
  known = modules()
  problems = []
  for module, path in known.items():
    mine = room(module)
    for other in internal(path, module, known):
      theirs = room(other)
      if theirs == "package" or theirs == mine and mine != "command":
        continue
      if theirs == "command":
        problems.append(f"{module} imports the command {other}")
      elif mine in ALLOWED and theirs not in ALLOWED[mine]:
        problems.append(f"{module} ({mine}) imports {other} ({theirs})")
  assert not problems, "\n".join(problems)


def test_jax_free_rooms_import_no_jax_even_indirectly():
  known = modules()
  graph = {m: internal(p, m, known) for m, p in known.items()}
  third_party = {m: {i.split(".")[0] for i in imports(p, m)} for m, p in known.items()}
  for module in known:
    if room(module) not in NO_JAX:
      continue
    seen, todo = set(), [module]
    while todo:
      m = todo.pop()
      if m not in seen:
        seen.add(m)
        todo.extend(graph[m] | {".".join(m.split(".")[:k]) for k in range(2, m.count(".") + 1)})  # parent packages
    for m in seen:
      assert not third_party[m] & JAX, f"{module} reaches {m}, which imports {third_party[m] & JAX}"


@pytest.mark.parametrize("module", sorted(modules()))
def test_modules_and_functions_stay_small(module):
  path = modules()[module]
  source = path.read_text()
  assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path}: over {MAX_MODULE_LINES} lines"
  lines = source.splitlines()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      length = node.end_lineno - node.lineno + 1
      says_why = any("long:" in line for line in lines[node.lineno - 1: node.lineno + 3])
      assert length <= MAX_FUNCTION_LINES or says_why, f"{path}:{node.lineno} {node.name} has {length} lines"
