"""Address lists: `--prefill A,B`, `--decode C,D,E` (docs/routing.md).

`split` turns a comma-separated string (or a list of them) into addresses, in order,
without duplicates. `expand` turns one address into the addresses to dial: itself, or,
for `dns:///host:port`, every address the name resolves to now (one channel each, so
each instance's load can be asked and each request paired: gRPC's own resolver does
not tell Python which addresses it found). Torch-free: the client imports it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable

from engine.errors import InvalidArgument

DNS = "dns:///"
MAX_ADDRESSES = 64  # per list; more is a typo or a resolver gone wild


def split(spec: str | Iterable[str], what: str = "address") -> list[str]:
    """'a:1, b:2' or ['a:1', 'b:2,c:3'] -> ['a:1', 'b:2', 'c:3']."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for part in parts:
        for a in str(part).split(","):
            a = a.strip()
            if a and a not in out:
                out.append(a)
    if not out:
        raise InvalidArgument(f"no {what} given: use host:port, or a comma-separated list")
    if len(out) > MAX_ADDRESSES:
        raise InvalidArgument(f"{len(out)} {what}es: at most {MAX_ADDRESSES}")
    for a in out:
        if any(c.isspace() for c in a):
            raise InvalidArgument(f"bad {what} {a!r}: no spaces inside an address")
    return out


def host_port(address: str) -> tuple[str, str]:
    """'h:1' -> ('h', '1'); '[::1]:1' -> ('::1', '1'); a dns:/// prefix is dropped."""
    a = address.removeprefix(DNS)
    if a.startswith("["):
        host, _, rest = a[1:].partition("]")
        return host, rest.removeprefix(":")
    host, sep, port = a.rpartition(":")
    return (host, port) if sep else (a, "")


def is_dns(address: str) -> bool:
    return address.startswith(DNS)


def expand(address: str, resolve: Callable[[str, str], list[str]] | None = None
           ) -> list[str]:
    """The addresses to dial for `address`: `[address]`, or for `dns:///host:port` one
    `ip:port` per address `host` resolves to (IPv4 first; sorted, so the order is stable).
    A name that does not resolve gives [] (the caller keeps what it had)."""
    if not is_dns(address):
        return [address]
    host, port = host_port(address)
    if not host or not port:
        raise InvalidArgument(f"bad address {address!r}: use dns:///host:port")
    ips = (resolve or _resolve)(host, port)
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips][:MAX_ADDRESSES]


def _resolve(host: str, port: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    ips = {info[4][0] for info in infos}
    v4 = sorted(ip for ip in ips if ipaddress.ip_address(ip).version == 4)
    # a name with A records: those (a headless Service); AAAA only when there is no A,
    # or every pod would count twice
    return v4 or sorted(ips)


def tls_name_options(address: str, dialed: str) -> list[tuple[str, object]]:
    """Channel options for dialing `dialed` (an IP) found for `address` (dns:///name):
    TLS checks the certificate against the name, not the IP."""
    if not is_dns(address) or dialed == address:
        return []
    host, port = host_port(address)
    return [("grpc.ssl_target_name_override", host), ("grpc.default_authority", f"{host}:{port}")]
