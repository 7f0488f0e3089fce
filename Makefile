PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-openrlhf demo test test-fast device-wheels

# torch first, pinned to the local CPU wheel when none is installed: a looser requirement pulls a CUDA build.
# constraints.txt: the tested versions of everything else.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[all]"

# OpenRLHF 0.11.2's pins cannot resolve here: it goes in without its dependencies, DeepSpeed without its ops.
install-openrlhf: install
	$(PIP) install -c constraints.txt -e ".[openrlhf]"
	$(PIP) install --no-deps openrlhf==0.11.2
	DS_BUILD_OPS=0 $(PIP) install -c constraints.txt --no-build-isolation deepspeed==0.19.6

demo: install
	$(PYTHON) -m r2m demo --out out/demo

test: install-openrlhf
	$(PYTHON) -m pytest

# The contributor's loop, after one `make test` (or `make install-openrlhf`) has installed everything: all but the
# multi-process and multi-step training tests.
test-fast:
	$(PYTHON) -m pytest -m "not slow and not distributed"

# What a lent GPU machine lacks (its image has torch, triton, transformers; Python 3.12): carried to it by the
# device tool for benchmarks/gpu_session.sh.
device-wheels:
	$(PIP) download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d .device-wheels \
		trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
