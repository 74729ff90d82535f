"""`hybrid health` and `hybrid info`: ask a running service how it is."""

from __future__ import annotations

import asyncio
import json

import click

from client.security_opts import pop_security, security_options, security_or_exit
from protos import hybrid_pb2 as pb

_TARGETS = {"prefill": "localhost:50051", "decode": "localhost:50052"}


def _targets(prefill: str, decode: str, which: str) -> dict[str, str]:
    t = {"prefill": prefill, "decode": decode}
    return t if which == "both" else {which: t[which]}


_which = click.option("--service", "which", type=click.Choice(["prefill", "decode", "both"]),
                      default="both", show_default=True)
_addrs = [click.option("--prefill", default=_TARGETS["prefill"], show_default=True),
          click.option("--decode", default=_TARGETS["decode"], show_default=True)]


def _with_addrs(f):
    f = security_options(f)  # innermost: listed after the addresses in --help
    for o in reversed(_addrs):
        f = o(f)
    return _which(f)


@click.command()
@_with_addrs
def health(prefill: str, decode: str, which: str, **tls: str | None) -> None:
    """grpc.health.v1 status of each service; exits 1 unless all are SERVING. Needs the
    TLS options of TLS services, but no token (health is exempt)."""
    from client.api import health as check

    security = security_or_exit(**pop_security(tls))
    bad = False
    for name, target in _targets(prefill, decode, which).items():
        try:
            status = asyncio.run(check(target, security=security))
        except Exception as e:
            status = f"UNREACHABLE ({e})"
        bad |= status != "SERVING"
        click.echo(f"{name:8s} {target:22s} {status}")
    if bad:
        raise SystemExit(1)


@click.command()
@_with_addrs
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
def info(prefill: str, decode: str, which: str, as_json: bool, **tls: str | None) -> None:
    """Model, weights fingerprint, device, backend, KV layout and counters of each service."""
    from google.protobuf.json_format import MessageToDict

    security = security_or_exit(**pop_security(tls))
    out = {}
    for name, target in _targets(prefill, decode, which).items():
        try:
            msg = asyncio.run(_info(name, target, security))
        except Exception as e:
            raise click.ClickException(f"{name} at {target}: {e}") from None
        # MessageToDict writes uint64 as strings: keep the counters as numbers, sorted.
        out[name] = MessageToDict(msg, preserving_proto_field_name=True) | {
            "counters": dict(sorted(msg.counters.items()))}
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for name, d in out.items():
        click.echo(f"[{name}]")
        for k, v in d.items():
            click.echo(f"  {k:22s} {v}")


async def _info(name: str, target: str, security=None):
    import grpc

    from client.api import error_from_rpc
    from protos import hybrid_pb2_grpc as pbg
    from transport.security import open_channel

    async with open_channel(target, None, security) as ch:
        stub = (pbg.PrefillServiceStub if name == "prefill" else pbg.DecodeServiceStub)(ch)
        try:
            return await stub.Info(pb.InfoRequest(), timeout=10.0)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from None
