"""Address lists such as ``mynetworks`` and ``upstream_hosts``: networks and membership."""
from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class NetworkList:
    """An immutable list of networks; `in` tells whether an address string belongs."""

    __slots__ = ("networks",)

    def __init__(self, networks=()) -> None:
        self.networks: tuple[Network, ...] = tuple(
            n if isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network))
            else ipaddress.ip_network(n, strict=False) for n in networks)

    def __contains__(self, address: object) -> bool:
        if not self.networks or not isinstance(address, str) or not address:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    def __bool__(self) -> bool:
        return bool(self.networks)
