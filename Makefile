# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test lint bench demo weights clean constraints

# constraints.txt: the dependency versions the tests last passed with, so that a clean clone (CI)
# installs what was tested, not whatever was released since; pyproject.toml keeps open ranges.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
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

# after upgrading the venv's packages and passing `make test` with them
constraints:
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v -i -e '^torch==' -e '^#' \
	  | sed 's/$$/ ; python_version == "3.11"/'; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) demo_out .pytest_cache
