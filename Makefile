# Quick start: `make demo` (set up + run both services on the CPU with a synthetic
# model), then `make test`.
PY ?= .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: setup demo test test-loaded test-cuda lint proto clean

$(VENV_STAMP): pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	# CPU build from local disk; any other torch spec pulls a multi-GB CUDA build.
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -e ".[dev]"
	touch $(VENV_STAMP)

setup: $(VENV_STAMP)

demo: $(VENV_STAMP)
	.venv/bin/hybrid demo

test: $(VENV_STAMP)
	$(PY) -m pytest -q

# The suite beside 3 busy processes, 3 times (issue 16): run before submitting changes to
# leases, deadlines, threads or processes. BUSY=n ROUNDS=n to change.
test-loaded: $(VENV_STAMP)
	ROUNDS=$${ROUNDS:-3} tests/loaded.sh

# On a GPU machine without this venv: PYTHONPATH=. python3 -m pytest -q -m cuda
test-cuda:
	$(PY) -m pytest -q -m cuda

lint: $(VENV_STAMP)
	.venv/bin/ruff check .

proto: $(VENV_STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. protos/hybrid.proto

clean:
	rm -rf .venv .pytest_cache
