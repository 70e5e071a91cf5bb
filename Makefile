# Two commands matter: `make demo` (the whole pipeline on the shipped data) and `make test`.
# Both bootstrap .venv from the pinned lock file; nothing needs to be installed by hand.
PYTHON ?= python3.11
# glibc's malloc on transparent huge pages: XLA:CPU allocates each step's temporaries anew, and faulting them in
# page by page cost a CPU train step 10-15% (BENCHMARKS.md). Older glibc ignores the setting.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test test-slow demo demo-clean bench-cpu venv clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade-strategy only-if-needed -r requirements.lock
	# Put the repository on the venv's path (no build step, no network for setuptools).
	$(PY) -c "import site, pathlib; pathlib.Path(site.getsitepackages()[0], 'mimix_jax.pth').write_text('$(CURDIR)\n')"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Minutes-long end-to-end runs (lm-evaluation-harness equality, the gpt_large rehearsal): CI's second step.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(PY) -m mimix_jax.demo --workdir demo_out

demo-clean:
	rm -rf demo_out

bench-cpu: $(STAMP)
	$(PY) -m bench.run --suite cpu

clean:
	rm -rf $(VENV) demo_out .pytest_cache
