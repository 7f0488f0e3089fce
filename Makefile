PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-openrlhf install-verl demo test test-fast device-wheels

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

# verl 0.9.1 pins transformers<5.11 (r2m is tested with 5.25): verl goes in without its dependencies, and so do
# tensordict (its pyvers pins packaging<26) and TransferQueue; the rest of what verl imports is the [verl] extra.
install-verl: install
	$(PIP) install -c constraints.txt -e ".[verl]"
	$(PIP) install --no-deps verl==0.9.1 tensordict==0.10.0 pyvers==0.1.0 TransferQueue==0.1.11

demo: install
	$(PYTHON) -m r2m demo --out out/demo

test: install-openrlhf install-verl
	$(PYTHON) -m pytest

# The contributor's loop, once `make test` has installed everything: all but the multi-process and multi-step
# training tests.
test-fast:
	$(PYTHON) -m pytest -m "not slow and not distributed"

# What a lent GPU machine lacks (its image has torch, triton, transformers; Python 3.12): carried to it by the
# device tool for benchmarks/gpu_session.sh.
device-wheels:
	$(PIP) download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d .device-wheels \
		trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
