PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test

# torch first, pinned to the local CPU wheel when none is installed: a looser requirement pulls a CUDA build.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[all]"

demo: install
	r2m demo --out out/demo

test: install
	$(PYTHON) -m pytest
