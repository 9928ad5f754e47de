"""Address lists such as ``mynetworks`` and ``upstream_hosts``: networks and membership,
and the rule that tells when such a list reaches into public address space."""
from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The largest block one organisation may hold: an IPv4 /8 (the largest ever
# assigned), an IPv6 /16 (allocations to one network are far smaller).
ORGANISATION_PREFIX = {4: 8, 6: 16}

# Blocks larger than that which hold no public address: the IPv4 multicast and
# class E space (224.0.0.0/3), IPv6 unique-local, link- and site-local, and
# multicast.  IANA's unallocated IPv6 space is not listed: it may be allocated.
_NOT_PUBLIC = {
    4: tuple(ipaddress.collapse_addresses([ipaddress.IPv4Network("224.0.0.0/4"),
                                           ipaddress.IPv4Network("240.0.0.0/4")])),
    6: tuple(ipaddress.collapse_addresses([ipaddress.IPv6Network(n) for n in
                                           ("fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8")])),
}

# IPv6 ranges that carry every IPv4 address inside them: (range, bits right of the
# IPv4 address).  An entry inside one is judged as the IPv4 network it holds.
_EMBEDDED_IPV4 = (
    (ipaddress.IPv6Network("::ffff:0:0/96"), 0),       # IPv4-mapped
    (ipaddress.IPv6Network("64:ff9b::/96"), 0),        # NAT64, RFC 6052
    (ipaddress.IPv6Network("2002::/16"), 80),          # 6to4, RFC 3056
)


def covers_public_space(network: Network) -> bool:
    """Whether `network` reaches beyond what any single organisation could own.

    It does when it is larger than an organisation's block (``ORGANISATION_PREFIX``:
    an IPv4 prefix shorter than /8, an IPv6 prefix shorter than /16) and not
    entirely inside address space that is never public (``_NOT_PUBLIC``).  So
    ``0.0.0.0/0``, both ``/1`` halves, ``::/0``, ``::/1``, ``8000::/1`` and
    ``2000::/3`` do, while ``10.0.0.0/8``, ``fc00::/7``, ``192.0.2.0/24`` or any
    public /24 do not.  An IPv6 network in the IPv4-mapped, NAT64 or 6to4 range
    is judged as the IPv4 network it embeds: ``2002::/16`` is all of IPv4.

    A list entry that covers public space makes everyone there trusted (in
    ``mynetworks``: an open relay; in ``upstream_hosts``: anyone may forge the
    client's identity), so the configuration refuses it unless told otherwise.
    """
    if network.version == 6:
        for block, shift in _EMBEDDED_IPV4:
            if network.subnet_of(block):
                address = (int(network.network_address) >> shift) & 0xFFFFFFFF
                prefix = min(network.prefixlen - block.prefixlen, 32)
                return covers_public_space(ipaddress.IPv4Network((address, prefix)))
    if network.prefixlen >= ORGANISATION_PREFIX[network.version]:
        return False
    return not any(network.subnet_of(block) for block in _NOT_PUBLIC[network.version])


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
