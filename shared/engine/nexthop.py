"""Builds the relay client for a tier's ``[next_hop]`` section."""
from __future__ import annotations

from shared.transport.client import NextHop, RelayClient


def relay_client(settings, reactor, *, content_checked: bool = False) -> RelayClient:
    nh = settings["next_hop"]
    return RelayClient(
        reactor, [NextHop(host, port) for host, port in nh["hosts"]], helo_name=nh["helo_name"],
        connect_timeout=nh["connect_timeout"], command_timeout=nh["command_timeout"],
        tls=nh["tls"], xclient=nh["xclient"],
        max_messages_per_connection=nh["max_messages_per_connection"],
        content_checked=content_checked)
