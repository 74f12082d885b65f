# The two commands of the README: `make serve` and `make test`. Both build .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench vllm-venv

$(STAMP): pyproject.toml constraints.txt requirements.lock scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(VENV)
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/evoq serve

# The vLLM tests run against a real vLLM server (CPU build) from its own venv; the script is a no-op
# when that venv is already built for the current scripts.
vllm-venv:
	bash scripts/build_vllm_venv.sh

test: $(STAMP) vllm-venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) bench/serve.py
