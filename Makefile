# Quick start: `make demo` (set up + run both services on the CPU with a synthetic
# model), then `make test`.
PY ?= .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: setup demo test test-loaded test-cuda lint proto certs csim xclbin clean

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

# The HLS decode kernel (kernels/hls/) in C simulation: a g++ -Wall -Werror build for a
# preset (the tests build each tiny model's own on demand, cached by source hash).
csim: $(VENV_STAMP)
	$(PY) -m kernels.hls_build --preset tiny-gpt2 --dtype float16 --csim
	$(PY) -m kernels.hls_build --preset tiny-llama --dtype float16 --csim

# The U55C bitstream (needs Vitis + the xilinx_u55c_gen3x16_xdma_3_202210_1 platform;
# not runnable on this project's CI): MODEL=<preset> HBM_DTYPE=float16 -> build/hls/.
xclbin: $(VENV_STAMP)
	$(MAKE) -C kernels/hls xclbin PY=$(abspath $(PY)) MODEL=$${MODEL:-gpt2-medium}

lint: $(VENV_STAMP)
	.venv/bin/ruff check .

proto: $(VENV_STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. protos/hybrid.proto

# TLS material for docker-compose.tls.yml and `hybrid serve --tls-*` (README, "Securing the
# services"): a CA, one server certificate for both services (SANs localhost, 127.0.0.1,
# prefill, decode; also a client certificate, since decode presents it to prefill), a
# client certificate and a bearer token. Into ./certs (git-ignored); never overwrites.
CERTS ?= certs
SAN ?= DNS:localhost,IP:127.0.0.1,DNS:prefill,DNS:decode
certs:
	@if [ -e $(CERTS)/ca.pem ]; then echo "$(CERTS)/ already has a CA; remove $(CERTS)/ for new ones"; exit 1; fi
	mkdir -p $(CERTS) && chmod 700 $(CERTS)
	openssl req -x509 -newkey rsa:3072 -nodes -days 3650 -subj "/CN=hybrid-llm CA" \
	  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
	  -keyout $(CERTS)/ca.key -out $(CERTS)/ca.pem
	printf 'subjectAltName=$(SAN)\nextendedKeyUsage=serverAuth,clientAuth\n' > $(CERTS)/server.ext
	printf 'subjectAltName=DNS:hybrid-client\nextendedKeyUsage=clientAuth\n' > $(CERTS)/client.ext
	for n in server client; do \
	  openssl req -newkey rsa:3072 -nodes -subj "/CN=hybrid-llm $$n" \
	    -keyout $(CERTS)/$$n.key -out $(CERTS)/$$n.csr && \
	  openssl x509 -req -in $(CERTS)/$$n.csr -CA $(CERTS)/ca.pem -CAkey $(CERTS)/ca.key \
	    -CAcreateserial -days 825 -sha256 -extfile $(CERTS)/$$n.ext -out $(CERTS)/$$n.pem || exit 1; \
	done
	openssl rand -hex 32 > $(CERTS)/token
	rm -f $(CERTS)/*.csr $(CERTS)/*.ext $(CERTS)/*.srl
	chmod 600 $(CERTS)/*.key $(CERTS)/token
	@echo "$(CERTS)/: ca.pem, server.pem/.key, client.pem/.key, token (keep ca.key offline)"

clean:
	rm -rf .venv .pytest_cache
