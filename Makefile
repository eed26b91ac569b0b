# The two commands on a fresh machine (only Python 3.11+ and make needed):
#   make run     the default job: fine-tune SmolLM2-135M-Instruct with LoRA
#   make test    the tests (CI runs exactly this)
# The first call of either builds .venv with setup.sh (about 3 minutes); later calls find it
# up to date and start at once. It is rebuilt when setup.sh, pyproject.toml or
# constraints.txt change. Overrides pass through ARGS:
#   make run ARGS="template=alpaca lora.rank=16"
#   make test ARGS='-m "not slow"'
# Inside the environment (source .venv/bin/activate), python -m instruct.run ... as usual.

PYTHON ?= python3
VENV := .venv
READY := $(VENV)/.setup-done

.PHONY: run test setup

run: $(READY)
	$(VENV)/bin/python -m instruct.run $(ARGS)

test: $(READY)
	$(VENV)/bin/python -m pytest $(ARGS)

setup: $(READY)

$(READY): setup.sh pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	PYTHON=$(VENV)/bin/python bash setup.sh
	touch $@
