"""`hybrid health` and `hybrid info`: ask a running service how it is."""

from __future__ import annotations

import asyncio
import json

import click

from client.security_opts import pop_security, security_options, security_or_exit
from protos import hybrid_pb2 as pb

_TARGETS = {"prefill": "localhost:50051", "decode": "localhost:50052"}


def _targets(prefill: str, decode: str, which: str) -> list[tuple[str, str, str]]:
    """(label, role, address) of each service asked about; comma-separated lists give
    one each, labelled `role address` (a single one keeps the plain role label)."""
    from engine.errors import InvalidArgument
    from transport.endpoints import split

    out = []
    for role, spec in (("prefill", prefill), ("decode", decode)):
        if which not in ("both", role):
            continue
        try:
            addrs = split(spec, f"--{role} address")
        except InvalidArgument as e:
            raise click.UsageError(str(e)) from None
        out += [(role if len(addrs) == 1 else f"{role} {a}", role, a) for a in addrs]
    return out


_which = click.option("--service", "which", type=click.Choice(["prefill", "decode", "both"]),
                      default="both", show_default=True, help="which service(s) to ask")
_addrs = [click.option("--prefill", default=_TARGETS["prefill"], show_default=True,
                       help="address (host:port) of the prefill service; comma-separated: each"),
          click.option("--decode", default=_TARGETS["decode"], show_default=True,
                       help="address (host:port) of the decode service; comma-separated: each")]


def _with_addrs(f):
    f = security_options(f)  # innermost: listed after the addresses in --help
    for o in reversed(_addrs):
        f = o(f)
    return _which(f)


@click.command()
@_with_addrs
def health(prefill: str, decode: str, which: str, **tls: str | None) -> None:
    """grpc.health.v1 status of each service; exits 1 unless all are SERVING. Needs the
    TLS options of TLS services, but no token (health is exempt). A service that is not
    SERVING is asked why (Info), e.g. "NOT_SERVING (weights differ from ...)"."""
    from client.api import health as check

    security = security_or_exit(**pop_security(tls))
    bad = False
    for _, role, target in _targets(prefill, decode, which):
        try:
            status = asyncio.run(check(target, security=security))
        except Exception as e:
            status = f"UNREACHABLE ({e})"
        bad |= status != "SERVING"
        if status == "NOT_SERVING" and (why := _why(role, target, security)):
            status = f"{status} ({why})"
        click.echo(f"{role:8s} {target:22s} {status}")
    if bad:
        raise SystemExit(1)


@click.command()
@_with_addrs
@click.option("--json", "as_json", is_flag=True,
              help="print one JSON object (service name -> its ServiceInfo fields)")
def info(prefill: str, decode: str, which: str, as_json: bool, **tls: str | None) -> None:
    """Model, weights fingerprint, device, backend, KV layout and counters of each service."""
    from google.protobuf.json_format import MessageToDict

    security = security_or_exit(**pop_security(tls))
    out = {}
    for name, role, target in _targets(prefill, decode, which):
        try:
            msg = asyncio.run(_info(role, target, security))
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


def _why(name: str, target: str, security) -> str:
    """Why a running service is not SERVING, from its Info: the reason it reports
    (ServiceInfo.not_serving), or the UNAVAILABLE its Info answers with (weights still
    loading, the decode backend's device missing); "" when it does not say."""
    from engine.errors import HybridError, Unavailable

    try:
        return asyncio.run(_info(name, target, security, timeout_s=3.0)).not_serving
    except Unavailable as e:
        return str(e).removeprefix("UNAVAILABLE: ")
    except (HybridError, OSError):  # e.g. Info needs a token health did not: no reason
        return ""


async def _info(name: str, target: str, security=None, timeout_s: float = 10.0):
    import grpc

    from client.api import error_from_rpc
    from protos import hybrid_pb2_grpc as pbg
    from transport.security import open_channel

    async with open_channel(target, None, security) as ch:
        stub = (pbg.PrefillServiceStub if name == "prefill" else pbg.DecodeServiceStub)(ch)
        try:
            return await stub.Info(pb.InfoRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from None
