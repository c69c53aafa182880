# Kiln developer entry points. Every target installs what it needs into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
KILN := $(VENV)/bin/kiln
STAMP := $(VENV)/.installed
# CPU boxes take the CPU PyTorch wheel (constraints-cpu.txt); with an NVIDIA GPU, pip's default torch
# and onnxruntime-gpu instead of onnxruntime.
GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)

.PHONY: install demo test redis chromium haproxy lint proto bench clean

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

# The Redis ledger and the multi-replica claim are tested against a real redis-server: `make test` installs
# Debian's package when it is missing and then requires it (KILN_REQUIRE_REDIS). Where it cannot be installed (no
# apt-get, or sudo wants a password) the Redis tests skip and the run ends with a banner saying so
# (tests/conftest.py). The web page's tests drive Debian's Chromium (/usr/bin/chromium) with Playwright: installed
# and required the same way (KILN_REQUIRE_CHROMIUM), else they skip saying so. So is Debian's HAProxy
# (KILN_REQUIRE_HAPROXY): tests/deploy runs deploy/haproxy.cfg in front of two replicas. PYTEST_ARGS picks tests:
# make test PYTEST_ARGS=tests/accounts
PYTEST_ARGS ?=
CHROMIUM := /usr/bin/chromium
HAPROXY := /usr/sbin/haproxy

test: install redis chromium haproxy
	KILN_REQUIRE_REDIS=$${KILN_REQUIRE_REDIS:-$$(command -v redis-server >/dev/null && echo 1)} \
	KILN_REQUIRE_CHROMIUM=$${KILN_REQUIRE_CHROMIUM:-$$(test -x $(CHROMIUM) && echo 1)} \
	KILN_REQUIRE_HAPROXY=$${KILN_REQUIRE_HAPROXY:-$$(test -x $(HAPROXY) && echo 1)} \
		$(PY) -m pytest $(PYTEST_ARGS)

# sudo -n: never stop a test run at a password prompt
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
		APT="$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get"; \
		if command -v apt-get >/dev/null 2>&1 && { [ -z "$$SUDO" ] || sudo -n true 2>/dev/null; }; then \
			$$APT install -y -q redis-server || { $$APT update -q && $$APT install -y -q redis-server; } \
				|| echo "make: installing redis-server failed; the Redis tests will skip"; \
		else \
			echo "make: redis-server is missing and cannot be installed here (no apt-get, or sudo wants a password);" \
				"the Redis tests will skip"; \
		fi; }

# Debian's package, not `playwright install` (a download from a CDN that many CI runners cannot reach)
chromium:
	@test -x $(CHROMIUM) || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
		APT="$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get"; \
		if command -v apt-get >/dev/null 2>&1 && { [ -z "$$SUDO" ] || sudo -n true 2>/dev/null; }; then \
			$$APT install -y -q --no-install-recommends chromium \
				|| { $$APT update -q && $$APT install -y -q --no-install-recommends chromium; } \
				|| echo "make: installing chromium failed; the web page's browser tests will skip"; \
		else \
			echo "make: $(CHROMIUM) is missing and cannot be installed here (no apt-get, or sudo wants a password);" \
				"the web page's browser tests will skip"; \
		fi; }

# Debian's package (the load balancer of deploy/compose.yaml, version 2.6 on Debian 12); the package's service is
# not needed: the tests start haproxy themselves
haproxy:
	@test -x $(HAPROXY) || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
		APT="$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get"; \
		if command -v apt-get >/dev/null 2>&1 && { [ -z "$$SUDO" ] || sudo -n true 2>/dev/null; }; then \
			$$APT install -y -q --no-install-recommends haproxy \
				|| { $$APT update -q && $$APT install -y -q --no-install-recommends haproxy; } \
				|| echo "make: installing haproxy failed; the tests of deploy/haproxy.cfg will skip"; \
		else \
			echo "make: $(HAPROXY) is missing and cannot be installed here (no apt-get, or sudo wants a password);" \
				"the tests of deploy/haproxy.cfg will skip"; \
		fi; }

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy runtime model_store quantize gateway
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
