"""`hybrid serve prefill|decode|openai`: run one of the two services, or the
OpenAI-compatible HTTP endpoint in front of them (client/openai_api), in the foreground.

Every option also reads an environment variable (HYBRID_MODEL, HYBRID_PORT, ...), which
is how docker-compose.yml configures the containers.
"""

from __future__ import annotations

import click


def _opt(*names: str, env: str, **kw):
    return click.option(*names, envvar=f"HYBRID_{env}", show_envvar=True, show_default=True, **kw)


@click.command()
@click.argument("role", type=click.Choice(["prefill", "decode", "openai"]))
@_opt("--model", env="MODEL", default="synthetic:gpt2", help="HF dir, hub id or synthetic:<preset>[:seed]")
@_opt("--host", env="HOST", default="127.0.0.1", help="address to bind (0.0.0.0 in containers)")
@_opt("--port", env="PORT", type=int, default=None, help="default 50051 prefill / 50052 decode / 8000 openai")
@_opt("--device", env="DEVICE", default="auto", help="auto | cpu | cuda | cuda:N")
@_opt("--dtype", env="DTYPE", default="auto", help="auto | float16 | bfloat16 | float32")
@_opt("--backend", env="BACKEND", default="gpu", help="decode backend: gpu | fpga-emu | fpga-xrt")
@_opt("--prefill", "prefill_addr", env="PREFILL", default="localhost:50051",
      help="decode, openai: the prefill service(s), comma-separated (A,B; dns:///name:port "
           "for every address a name resolves to); docs/routing.md")
@_opt("--max-batch", env="MAX_BATCH", type=click.IntRange(min=1), default=64,
      help="decode, gpu backend: batch rows of the engine loop (continuous batching; "
           "one CUDA graph per bucket 1, 2, 4, ... up to this)")
@_opt("--region-mb", env="REGION_MB", type=int, default=256, help="prefill: shared KV region size")
@_opt("--max-slots", env="MAX_SLOTS", type=int, default=64, help="prefill: concurrent KV slots")
@_opt("--lease-s", env="LEASE_S", type=float, default=30.0, help="prefill: slot lease")
@_opt("--slot-wait-s", env="SLOT_WAIT_S", type=float, default=5.0,
      help="prefill: how long a request waits in line for a slot when the region is full")
@_opt("--slots-per-client", env="SLOTS_PER_CLIENT", type=click.IntRange(min=0), default=0,
      help="prefill: KV slots one client (peer host) may hold before a decoder claims "
           "them; 0 = half of --max-slots")
@_opt("--checksums/--no-checksums", env="CHECKSUMS", default=True,
      help="prefill: per-layer xxh3 in the slot header (DATA_LOSS on mismatch)")
@_opt("--max-active", env="MAX_ACTIVE", type=int, default=None, help="requests run at once")
@_opt("--max-queue", env="MAX_QUEUE", type=int, default=128, help="requests waiting; more -> RESOURCE_EXHAUSTED")
@_opt("--grace-s", env="GRACE_S", type=float, default=10.0, help="drain time on SIGTERM")
@_opt("--warm-up/--no-warm-up", env="WARM_UP", default=True,
      help="run a short request through the service before reporting SERVING")
@_opt("--log-level", env="LOG_LEVEL", default="info",
      type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@_opt("--tls-cert", env="TLS_CERT", default=None,
      help="certificate (PEM) of this service: TLS on; decode also presents it to prefill")
@_opt("--tls-key", env="TLS_KEY", default=None, help="private key (PEM) of --tls-cert")
@_opt("--tls-ca", env="TLS_CA", default=None,
      help="CA (PEM) client certificates must chain to: mutual TLS required; decode also "
           "verifies prefill with it")
@_opt("--token-file", env="TOKEN_FILE", default=None,
      help="accepted bearer tokens, one a line (# comments), re-read when it changes; "
           "or one token in HYBRID_TOKEN. Health needs none. Decode sends the first to prefill")
@_opt("--reflection/--no-reflection", env="REFLECTION", default=False,
      help="serve gRPC server reflection (behind the token when tokens are on)")
@_opt("--metrics-port", env="METRICS_PORT", type=click.IntRange(0, 65535), default=0,
      help="serve Prometheus metrics at http://HOST:PORT/metrics (plaintext, no token); 0 = off")
@_opt("--decode", "decode_addr", env="DECODE", default="localhost:50052",
      help="openai: the decode service(s), comma-separated; requests go to the least "
           "loaded SERVING pair")
@_opt("--model-dir", env="MODEL_DIR", default=None,
      help="openai: HF checkpoint dir whose chat template (tokenizer_config.json) chat uses")
@_opt("--api-key-file", env="API_KEY_FILE", default=None,
      help="openai: accepted API keys, one a line; requests need 'Authorization: Bearer KEY'")
@_opt("--kv-transport", env="KV_TRANSPORT", type=click.Choice(["shm", "grpc"]), default="shm",
      help="openai: KV hand-off the requests ask for (grpc: decode on another host)")
@_opt("--kv-device", env="KV_DEVICE", type=click.Choice(["auto", "off"]), default="auto",
      help="prefill: keep a GPU mirror of the KV region that GPU decoders read through "
           "CUDA IPC; decode (gpu backend): map the prefills' mirrors. auto = when both "
           "sides are CUDA GPUs that can reach each other (docs/transport.md)")
def serve(role: str, model: str, host: str, port: int | None, device: str, dtype: str,
          backend: str, prefill_addr: str, max_batch: int, region_mb: int, max_slots: int,
          lease_s: float, slot_wait_s: float, checksums: bool, max_active: int | None, max_queue: int, grace_s: float,
          warm_up: bool, log_level: str, tls_cert: str | None, tls_key: str | None,
          tls_ca: str | None, token_file: str | None, reflection: bool,
          slots_per_client: int = 0, metrics_port: int = 0, decode_addr: str = "localhost:50052",
          model_dir: str | None = None, api_key_file: str | None = None,
          kv_transport: str = "shm", kv_device: str = "auto") -> None:
    """Serve the prefill (GPU summarization) or decode (FPGA / GPU generation) stage, or
    the OpenAI-compatible endpoint (`openai`; docs/openai.md). For `openai` the TLS
    options act as a client's towards the services: --tls-ca verifies them,
    --tls-cert/--tls-key is its client certificate, --token-file's first token is sent."""
    from engine.errors import HybridError

    try:
        if role == "openai":
            return _serve_openai(host, port, prefill_addr, decode_addr, model_dir, api_key_file,
                                 metrics_port, kv_transport, kv_device, grace_s, log_level,
                                 dict(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                                      token_file=token_file))
        security = _server_security(tls_cert, tls_key, tls_ca, token_file)
        _serve(role, model, host, port, device, dtype, backend, prefill_addr, max_batch,
               region_mb, max_slots, lease_s, slot_wait_s, checksums, max_active, max_queue, grace_s, warm_up,
               log_level, security, reflection, slots_per_client, metrics_port, kv_device)
    except HybridError as e:  # unknown model, no /dev/shm space, ...: one line, no traceback
        raise click.ClickException(f"{role}: {e}") from None


def _server_security(tls_cert, tls_key, tls_ca, token_file):
    """The options (and HYBRID_TOKEN) as a Security, checked before any weights load."""
    from transport.security import Security

    security = Security.from_options(tls_cert, tls_key, tls_ca, token_file)
    if security is not None:
        security.check_server()
    return security


def _serve(role, model, host, port, device, dtype, backend, prefill_addr, max_batch, region_mb,
           max_slots, lease_s, slot_wait_s, checksums, max_active, max_queue, grace_s, warm_up,
           log_level, security=None, reflection=False, slots_per_client=0,
           metrics_port=0, kv_device="auto") -> None:
    common = dict(model=model, host=host, device=device, dtype=dtype, max_queue=max_queue,
                  grace_s=grace_s, warm_up=warm_up, log_level=log_level, security=security,
                  reflection=reflection, metrics_port=metrics_port, kv_device=kv_device)
    if role == "prefill":
        from gpu_service.server import PrefillOptions
        from gpu_service.server import serve as run

        run(PrefillOptions(port=50051 if port is None else port, region_mb=region_mb,
                           max_slots=max_slots, lease_s=lease_s, slot_wait_s=slot_wait_s,
                           slots_per_client=slots_per_client,
                           checksums=checksums,
                           max_active=max_active or 64,
                           **common))
    else:
        from fpga_service.server import DecodeOptions
        from fpga_service.server import serve as run
        from transport.endpoints import split

        prefill_addr = ",".join(split(prefill_addr, "--prefill address"))  # checked now
        run(DecodeOptions(port=50052 if port is None else port, backend=backend,
                          prefill=prefill_addr, max_active=max_active or max(16, 2 * max_batch),
                          max_batch=max_batch, **common))


def _serve_openai(host, port, prefill, decode, model_dir, api_key_file, metrics_port,
                  kv_transport, kv_device, grace_s, log_level, tls) -> None:
    """`hybrid serve openai` (client/openai_api/server.py); imports no torch."""
    from client.openai_api.server import OpenAIOptions
    from client.openai_api.server import serve as run
    from client.security_opts import build_security

    run(OpenAIOptions(prefill=prefill, decode=decode, host=host,
                      port=8000 if port is None else port, model_dir=model_dir,
                      api_key_file=api_key_file, metrics_port=metrics_port or None,
                      security=build_security(**tls), kv_transport=kv_transport,
                      kv_device=kv_device != "off", grace_s=grace_s, log_level=log_level))
