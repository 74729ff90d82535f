"""`hybrid generate`: a prompt in, tokens out, streamed to stdout.

`--local` runs the whole model in this process (the engine loop). Without it the request
goes to the prefill and decode services through `client.remote.generate_remote`.
Several prompts (`--local` only) run at once: the engine decodes them in one batch.
"""

from __future__ import annotations

import json
import sys

import click

from client.inputs import GenerateOptions, check_options, fail, parse_prompt_ids
from client.security_opts import build_security, security_options
from engine.errors import HybridError, InvalidArgument, Unavailable

DEFAULT_MODEL = "synthetic:gpt2"


@click.command("generate")
@click.argument("prompts", nargs=-1)
@click.option("--local", is_flag=True, help="Run prefill and decode in this process (no services).")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Local HF directory, hub id (online only) or synthetic:<preset>[:seed]. "
                   "Through the services: checked against the pair's model when given.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--prompt-ids", help="Comma-separated token ids instead of PROMPT, e.g. 1,2,3.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="1 = off.")
@click.option("--seed", type=int, default=None, help="Sampling seed (same seed, same tokens).")
@click.option("--device", default="auto", show_default=True,
              help="--local: auto (cuda when available, else cpu), cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True,
              help="--local: auto (fp32 on CPU, fp16 on CUDA), float32, float16, bfloat16.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--prefill", default="localhost:50051", show_default=True,
              help="Prefill service(s): host:port, comma-separated, or dns:///name:port.")
@click.option("--decode", default="localhost:50052", show_default=True,
              help="Decode service(s), as --prefill: the request goes to the least-loaded "
                   "SERVING pair (docs/routing.md).")
@click.option("--kv-transport", type=click.Choice(["shm", "grpc"]), default="shm", show_default=True,
              help="KV hand-off: shared memory (same host) or gRPC fetch.")
@click.option("--kv-device/--no-kv-device", default=True, show_default=True,
              help="With shm: KV GPU to GPU (CUDA IPC) when the decode mapped its prefill's "
                   "GPU mirror; --no-kv-device: always the host region.")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds per request.")
@click.option("--stop", multiple=True,
              help="Stop string (repeatable): the text ends just before the first one generated.")
@click.option("--stop-id", "stop_ids", type=click.IntRange(min=0), multiple=True,
              help="Stop token id (repeatable): ends after that token, which is kept.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token.")
@security_options
def generate(prompts, local, model, max_new_tokens, prompt_ids, temperature, top_k, top_p, seed,
             device, dtype, as_json, prefill, decode, kv_transport, kv_device, timeout, stop,
             stop_ids, ignore_eos, tls_ca, tls_cert, tls_key, token_file) -> None:
    """Generate text from PROMPTS (or --prompt-ids); several prompts need --local."""
    prompt = prompts[0] if prompts else None  # several: checked like the first
    try:
        opts = GenerateOptions(
            prompt=prompt, prompt_ids=parse_prompt_ids(prompt_ids), model=model,
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, device=device, dtype=dtype, json=as_json, local=local, prefill=prefill,
            decode=decode, kv_transport=kv_transport, kv_device=kv_device, timeout=timeout, stop=tuple(stop),
            stop_ids=tuple(stop_ids), ignore_eos=ignore_eos,
            security=None if local else build_security(tls_ca, tls_cert, tls_key, token_file),
            explicit=_explicit("model", "device", "dtype"))
        check_options(opts)
        if len(prompts) > 1:
            if not local or opts.prompt_ids is not None:
                raise InvalidArgument("several PROMPTS run with --local (and without "
                                      "--prompt-ids); through the services send one per call")
            print_many(run_local_many(opts, list(prompts)), as_json)
            return
        printer = TokenPrinter(as_json)
        result = run_local(opts, printer) if local else run_remote(opts, printer)
    except Unavailable as e:
        if local:
            fail(e)
        # the usual cause: nothing listening at --prefill/--decode
        fail(Unavailable(f"{e} (services at --prefill {prefill} and --decode {decode}: "
                         f"start them with `hybrid serve prefill|decode`, or use --local; "
                         f"TLS services: check --tls-ca, and --tls-cert/--tls-key for "
                         f"mutual TLS)"))
    except (HybridError, OSError) as e:
        fail(e)
    except KeyboardInterrupt:
        sys.exit(130)
    printer.finish(result)


def _explicit(*names: str) -> frozenset[str]:
    """Which of `names` the command line gave (not left at their defaults)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return frozenset(n for n in names if ctx.get_parameter_source(n) in given)


class TokenPrinter:
    """Streams text to stdout as tokens arrive (not with --json); the tokenizer's stream
    decoder holds back bytes of unfinished UTF-8 characters, and with stop strings the
    text that could still become one (engine.stop_text)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self._stream = None

    def start(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        from engine.stop_text import StopStream

        self._stream = StopStream(tokenizer, stop)

    def on_token(self, token_id: int) -> None:
        if not self.as_json and self._stream is not None:
            self._write(self._stream.push(token_id)[0])

    def _write(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()

    def finish(self, result: dict) -> None:
        if self.as_json:
            click.echo(json.dumps(result))
            return
        if self._stream is not None:
            self._write(self._stream.flush()[0])
        sys.stdout.write("\n")
        sys.stdout.flush()


def run_local(opts: GenerateOptions, printer: TokenPrinter) -> dict:
    from engine.generate import check_request
    from engine.generate import generate as engine_generate
    from engine.loader import load_model

    ids = list(opts.prompt_ids) if opts.prompt_ids is not None else None
    ids = check_before_load(opts, [ids if ids is not None else opts.prompt])[0]
    show_progress = sys.stderr.isatty() and not opts.json
    lm = load_model(opts.model, opts.device, opts.dtype, progress=show_progress)
    check_request(lm.config, ids, opts.max_new_tokens)
    notice(lm)
    printer.start(lm.tokenizer, opts.stop)
    res = engine_generate(lm, ids, opts.max_new_tokens, opts.sampling(), opts.stop_ids,
                          on_token=printer.on_token, ignore_eos=opts.ignore_eos, stop=opts.stop)
    return {
        "model": lm.spec, "weights_fingerprint": lm.fingerprint, "synthetic": lm.synthetic,
        "synthetic_tokenizer": lm.tokenizer.synthetic, "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."), "prompt_ids": ids,
        "token_ids": res.token_ids, "text": res.text, "finish_reason": res.finish_reason,
        "timings": {k: round(v, 3) for k, v in res.timings.items()}, "path": "local",
    }


def check_before_load(opts: GenerateOptions, prompts: list) -> list[list[int]]:
    """What needs the model's config and tokenizer but not its weights, checked before a
    slow load: the model spec names a model (a usage error, exit 2, when it does not:
    an unknown preset, no such directory, a hub id this machine cannot fetch), each
    prompt (text, or a list of ids) encodes, and prompt + --max-new-tokens fits the
    model's positions. Returns the prompts' token ids."""
    from engine.generate import check_request
    from engine.loader import SYNTHETIC, peek_config, resolve_model_dir
    from engine.tokenizer import load_tokenizer

    model_dir = None
    if not opts.model.startswith(SYNTHETIC):
        try:
            model_dir = resolve_model_dir(opts.model)
        except Unavailable as e:  # a hub id while offline: the --model value is the problem
            raise InvalidArgument(str(e)) from None
    cfg = peek_config(opts.model if model_dir is None else str(model_dir))
    tok = load_tokenizer(model_dir, cfg.vocab_size, cfg.eos_token_id)
    out = []
    for p in prompts:
        ids = list(p) if isinstance(p, list) else tok.encode(p)
        check_request(cfg, ids, opts.max_new_tokens)
        out.append(ids)
    return out


def run_local_many(opts: GenerateOptions, prompts: list[str]) -> list[dict]:
    """Every prompt at once through the model's engine loop (one batch), in order."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.generate import check_request
    from engine.generate import generate as engine_generate
    from engine.loader import load_model

    ids = check_before_load(opts, prompts)
    lm = load_model(opts.model, opts.device, opts.dtype)
    for one in ids:
        check_request(lm.config, one, opts.max_new_tokens)
    notice(lm)

    def run(one: list[int]) -> dict:
        res = engine_generate(lm, one, opts.max_new_tokens, opts.sampling(), opts.stop_ids,
                              ignore_eos=opts.ignore_eos, stop=opts.stop)
        return {"model": lm.spec, "prompt_ids": one, "token_ids": res.token_ids,
                "text": res.text, "finish_reason": res.finish_reason,
                "timings": {k: round(v, 3) for k, v in res.timings.items()}, "path": "local"}

    with ThreadPoolExecutor(len(ids)) as pool:
        return list(pool.map(run, ids))


def print_many(results: list[dict], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(results))
        return
    for i, r in enumerate(results):
        click.echo(f"[{i}] {r['text']}")


def notice(lm) -> None:
    """Label synthetic output on stderr, so nobody mistakes it for a real model's."""
    if lm.synthetic:
        click.echo(f"note: {lm.spec}: synthetic weights, byte tokenizer", err=True)
    elif getattr(lm.tokenizer, "ids_only", False):
        click.echo(f"note: {lm.spec} has no tokenizer.json and a vocabulary under 256: no "
                   f"text; output shown as token ids <|id|>", err=True)
    elif lm.tokenizer.synthetic:
        click.echo(f"note: {lm.spec} has no tokenizer.json: byte tokenizer", err=True)


def run_remote(opts: GenerateOptions, printer: TokenPrinter) -> dict:
    """Contract for client.remote: generate_remote(opts, printer) -> the JSON dict
    (same keys as run_local's); it calls printer.start(tokenizer) and
    printer.on_token(id) as tokens arrive."""
    try:
        from client.remote import generate_remote
    except ModuleNotFoundError as e:
        if e.name != "client.remote":
            raise
        raise Unavailable("the service path is not available in this build; use --local") from None
    return generate_remote(opts, printer)
