# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup demo test soak bench bench-peer learn lint clean

# Bytecode for the package, as pip writes it for an installed one: every agent
# program, CLI command and kernel imports it, and where the environment says
# not to write bytecode (PYTHONDONTWRITEBYTECODE) each would compile it again.
setup: $(STAMP)
	$(BIN)/python -m compileall -q kernel syscalls userland drivers

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/python examples/demo.py

# pytest-xdist workers, whose models run one llama.cpp thread each (tests/conftest.py), so
# none waits on another's; the latency budgets (`latency`) run after, with the machine to
# themselves. `make test N=0`: one process, in order.
N ?= 4
test: setup
	$(BIN)/python -m pytest -q -n $(N) --dist loadgroup -m "not latency and not soak" tests
	$(BIN)/python -m pytest -q -m latency tests

soak: setup
	$(BIN)/python -m pytest -q -m soak tests

bench: setup
	$(BIN)/python bench/run_all.py

# beside llama.cpp's own llama-server, built once under .cache/ (skipped if it cannot be)
bench-peer: setup
	$(BIN)/python bench/bench_peer.py

learn: setup
	$(BIN)/python bench/bench_learn.py

lint: setup
	$(BIN)/ruff check kernel syscalls userland drivers tests bench examples

clean:
	rm -rf $(VENV) build *.egg-info
