import ipaddress

import pytest

from shared.netlist import covers_public_space


@pytest.mark.parametrize("network", [
    "0.0.0.0/0", "0.0.0.0/1", "128.0.0.0/1", "0.0.0.0/7", "8.0.0.0/7",
    "::/0", "::/1", "8000::/1", "2000::/3", "2000::/15",
    "::ffff:0:0/96", "64:ff9b::/96", "2002::/16", "2002::/17",   # all or half of IPv4, embedded in IPv6
])
def test_networks_wider_than_an_organisation_cover_public_space(network):
    assert covers_public_space(ipaddress.ip_network(network))


@pytest.mark.parametrize("network", [
    "10.0.0.0/8", "8.0.0.0/8", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.7/32",
    "224.0.0.0/3",                                   # multicast and class E: never a client
    "fc00::/7", "fe80::/10", "ff00::/8", "2001:db8::/32", "2001::/16",
    "::ffff:10.0.0.0/104", "2002:c000:200::/40",     # embedded 10.0.0.0/8, 192.0.2.0/24
])
def test_private_or_organisation_sized_networks_do_not(network):
    assert not covers_public_space(ipaddress.ip_network(network))
