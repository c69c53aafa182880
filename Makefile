# Kiln developer entry points. Every target installs what it needs into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
KILN := $(VENV)/bin/kiln
STAMP := $(VENV)/.installed
# CPU boxes take the CPU PyTorch wheel (constraints-cpu.txt); with an NVIDIA GPU, pip's default torch
# and onnxruntime-gpu instead of onnxruntime.
GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)

.PHONY: install demo test lint proto bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
ifeq ($(GPU),1)
	$(PY) -m pip install -e ".[compiler,dev]"
	$(PY) -m pip uninstall -y onnxruntime
	$(PY) -m pip install -e ".[gpu]"
else
	$(PY) -m pip install -c constraints-cpu.txt -e ".[compiler,dev]"
endif
	touch $(STAMP)

demo: install
	bash scripts/demo.sh

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy runtime model_store quantize
	$(VENV)/bin/hadolint Dockerfile

proto: install
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. proto/kiln/v1/kiln.proto

bench: install
	$(PY) -m bench latency --arch tiny
	$(PY) -m bench latency --arch sd-v1 --steps 4 --no-grpc
	$(PY) -m bench quality --steps 4,8,20 --precision fp32,int8,nf4,int4
	$(PY) -m bench precision --arch sd-v1

clean:
	rm -rf demo bench/work .pytest_cache
