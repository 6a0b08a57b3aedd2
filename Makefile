# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test lint bench demo weights clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check fusion_cli recipes tests bench examples
	$(BIN)/ruff format --check fusion_cli recipes tests bench examples

bench: $(STAMP)
	$(BIN)/python bench/run.py

demo: $(STAMP)
	$(BIN)/python examples/make_example.py
	mkdir -p demo_out
	# The shipped default model, landsat (weights/landsat.json: its measured quality), then the best
	# classical method on the same scene for comparison.
	$(BIN)/fusion pansharpen examples/landsat8_pan.tif examples/landsat8_ms.tif -o demo_out/landsat8_fused.tif \
	  --overwrite --quicklook
	$(BIN)/fusion pansharpen examples/landsat8_pan.tif examples/landsat8_ms.tif -o demo_out/landsat8_bdsd_pc.tif \
	  --method bdsd-pc --sensor landsat8 --overwrite --quicklook
	@echo "Fused product: demo_out/landsat8_fused.tif (quicklook: demo_out/landsat8_fused.png)"

weights: $(STAMP)
	# every shipped model, retrained with the command its card records
	$(BIN)/python recipes/train_recipes.py shipped

clean:
	rm -rf $(VENV) demo_out .pytest_cache
