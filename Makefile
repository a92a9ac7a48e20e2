# monai-mask: `make demo` runs the main job on sample_data/, `make test` runs the test suite.
# Both create the virtual environment $(VENV) and install everything into it first.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch where one is available; GPU users: make demo TORCH_SPEC="torch>=2.4"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO ?= out/demo
# epochs of each training stage of the demo, and the case kept out of training (holdout.txt)
DEMO_EPOCHS ?= 30
DEMO_CASE := case_007
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
		--out $(DEMO)/prepared --folds 2 --holdout sample_data/ct/holdout.txt
	$(BIN)/monai-mask overview $(DEMO)/prepared --out $(DEMO)/overview.png
	$(BIN)/monai-mask pretrain --prepared $(DEMO)/prepared --out $(DEMO)/pretrain --epochs $(DEMO_EPOCHS) \
		--backbone cnn --masking lesion_aware --prior intensity --set preview_interval=10
	$(BIN)/monai-mask finetune --task segmentation --prepared $(DEMO)/prepared --out $(DEMO)/segmentation \
		--pretrained $(DEMO)/pretrain/models/model.pt --backbone cnn --epochs $(DEMO_EPOCHS) \
		--set val_interval=$(DEMO_EPOCHS)
	$(BIN)/monai-mask segment --input sample_data/ct/imagesTr/$(DEMO_CASE).nii.gz \
		--model $(DEMO)/segmentation/models/model.pt --prepared $(DEMO)/prepared --backbone cnn \
		--out $(DEMO)/segment --formats nifti,seg.nrrd --overlay $(DEMO)/segment/$(DEMO_CASE)_overlay.png
	$(BIN)/monai-mask finetune --task detection --prepared $(DEMO)/prepared --out $(DEMO)/detection \
		--pretrained $(DEMO)/pretrain/models/model.pt --backbone cnn --epochs $(DEMO_EPOCHS) \
		--set val_interval=$(DEMO_EPOCHS)
	$(BIN)/monai-mask detect --input sample_data/ct/imagesTr/$(DEMO_CASE).nii.gz \
		--model $(DEMO)/detection/models/model.pt --prepared $(DEMO)/prepared --backbone cnn \
		--out $(DEMO)/detect
	@echo "demo outputs in $(DEMO)/ (held-out case: $(DEMO_CASE))"

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not integration" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check monai_mask tests benchmarks

clean:
	rm -rf $(DEMO) .pytest_cache
