"""The prefill services one decode service serves (`--prefill A,B`; docs/routing.md).

One channel and stub per prefill. Each prefill lends this decode ONE region at Attach;
`by_region` maps that region's name to the link that lent it, so a handle's RenewLease,
Release and FetchKv go to the prefill that owns its slot, and a handle naming any other
(region, epoch) is refused before a file is opened. `dns:///host:port` entries are
expanded to one link per address the name resolves to (again on each re-attach).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import grpc

from engine.errors import InvalidArgument
from protos import hybrid_pb2 as pb
from protos import hybrid_pb2_grpc as pbg
from transport import endpoints
from transport import servekit as kit
from transport.shm import SHM_DIR, segment_path

log = logging.getLogger("hybrid.decode")


@dataclass(eq=False)
class PrefillLink:
    address: str                        # what we dial
    name: str                           # as configured (an address, or dns:///name:port)
    channel: Any
    stub: Any
    paired: tuple[str, int] | None = None  # (region, epoch) it lent us at Attach
    local: bool = False                 # that region's file is on this host
    state: str = "not attached yet"
    weights: str = ""                   # why its weights are not ours; "" = same
    logged: str = ""                    # the `weights` last logged
    mirror: Any = None                  # its GPU KV mirror mapped here (device_kv.PeerMirror)
    mirror_note: str = ""               # why it is not (logged once per region)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def proto(self) -> pb.PairedPrefill:
        region, epoch = self.paired or ("", 0)
        state = f"{self.state}; weights differ" if self.weights else self.state
        return pb.PairedPrefill(address=self.address, region=region, region_epoch=epoch,
                                local=self.local, state=state, device=self.mirror is not None)

    def drop_mirror(self) -> None:
        """The region changed (prefill restarted): unmap its old mirror once the requests
        reading from it are done."""
        mirror, self.mirror, self.mirror_note = self.mirror, None, ""
        if mirror is not None:
            try:
                mirror.close()
            except Exception as e:  # a poisoned CUDA context: the process is leaving
                log.warning("prefill %s: unmapping its GPU KV mirror failed: %s", self.address, e)


def region_is_local(region: str, shm_dir: str = SHM_DIR) -> bool:
    """Whether prefill's region file is on this host (same /dev/shm): only then can
    decode map it. A prefill on another host (or in a container with its own /dev/shm)
    has none here, and its KV comes through FetchKv."""
    try:
        return os.path.exists(segment_path(region, shm_dir))
    except InvalidArgument:
        return False


def choose_transport(asked: str, local: bool) -> str:
    """The KV transport a request gets: what it asked for, except that shm for a region
    that is not on this host becomes grpc (FetchKv from the prefill that owns it)."""
    return "grpc" if asked == "grpc" or not local else "shm"


class PrefillSet:
    def __init__(self, spec: str | list[str], security: Any = None,
                 options: list | None = None, shm_dir: str = SHM_DIR) -> None:
        self.names = endpoints.split(spec, "prefill address")
        self.security, self.shm_dir = security, shm_dir
        self.options = [("grpc.max_receive_message_length", kit.MAX_MESSAGE_BYTES),
                        *(options or [])]
        self.links: dict[str, PrefillLink] = {}  # dialed address -> link
        self.by_region: dict[str, PrefillLink] = {}
        self._add({name: endpoints.expand(name) for name in self.names})

    async def resolve(self) -> list[PrefillLink]:
        """dns:/// names looked up again (in a thread: getaddrinfo blocks): a new address
        gets a link; one that vanished keeps its link (its slots may be live)."""
        found = {}
        for name in self.names:
            if endpoints.is_dns(name):
                found[name] = await asyncio.to_thread(endpoints.expand, name)
        return self._add(found)

    def _add(self, found: dict[str, list[str]]) -> list[PrefillLink]:
        added = []
        for name, addrs in found.items():
            for addr in addrs:
                if addr in self.links:
                    continue
                ch = kit.channel(addr, self.options + endpoints.tls_name_options(name, addr),
                                 self.security)
                link = PrefillLink(addr, name, ch, pbg.PrefillServiceStub(ch))
                self.links[addr] = link
                added.append(link)
        return added

    def __iter__(self):
        return iter(list(self.links.values()))

    def __len__(self) -> int:
        return len(self.links)

    def paired(self, link: PrefillLink, reply: pb.AttachReply) -> bool:
        """Record what `link` lent us at Attach; True when it changed."""
        key = (reply.region.lstrip("/"), reply.region_epoch)
        changed = key != link.paired
        if link.paired and self.by_region.get(link.paired[0]) is link:
            del self.by_region[link.paired[0]]
        if changed:
            link.drop_mirror()
        link.paired, link.state = key, "attached"
        link.local = region_is_local(key[0], self.shm_dir)
        if key[0]:
            self.by_region[key[0]] = link
        return changed

    def owner(self, region: str, epoch: int) -> PrefillLink | None:
        """The link whose Attach lent (region, epoch); None for any other (a dict look-up:
        nothing is opened)."""
        region = region.lstrip("/")
        link = self.by_region.get(region)
        return link if link is not None and link.paired == (region, epoch) else None

    async def close(self) -> None:
        for link in self:
            link.drop_mirror()
            await link.channel.close()


def rpc_code(e: BaseException) -> str:
    return e.code().name if isinstance(e, grpc.aio.AioRpcError) else type(e).__name__
