# monai-mask: `make demo` runs the main job on sample_data/, `make test` runs the test suite.
# Both create the virtual environment $(VENV) and install everything into it first.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch where one is available; GPU users: make demo TORCH_SPEC="torch>=2.4"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO := out/demo
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/monai-mask prepare --images sample_data/ct/imagesTr --labels sample_data/ct/labelsTr \
		--out $(DEMO)/prepared --folds 2
	$(BIN)/monai-mask overview $(DEMO)/prepared --out $(DEMO)/overview.png
	$(BIN)/monai-mask pretrain --prepared $(DEMO)/prepared --out $(DEMO)/pretrain --epochs 10 \
		--backbone vit --masking lesion_aware --prior intensity --set preview_interval=10
	@echo "demo outputs in $(DEMO)/"

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not integration" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check monai_mask tests benchmarks

clean:
	rm -rf $(DEMO) .pytest_cache
