"""What a tier is made of, as the daemon sees it.

A tier's ``service.py`` declares ``TIER`` (a :class:`shared.config.schema.TierSpec`):
its sections, the checks it registers, its default policy, and its
*component*: the object that owns what lives as long as the process (the
filter's spool and queue manager, the domain tier's Maildir spool) and makes,
for each configuration, what a reload replaces (:class:`Configured`: the sink
new sessions write through and the next-hop client).

The daemon drives a component in this order::

    component = TIER.component(settings, reactor, pool)      # after privileges are dropped
    configured = component.configure(settings, ctx)          # may raise: nothing running changed
    component.activate(configured)                           # cannot fail
    component.start()
    ... on SIGHUP: configure(new) and, if every part of the new configuration
        was built, activate(it); the old one is retired (ctx.on_retire closers)
    component.stop()                                         # after the sessions ended
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Configured:
    sink: Any                     # .session(port) -> the sink session of one SMTP session
    next_hop: Any = None          # the RelayClient of this configuration, for checks (verify)
    settings: Any = None          # the configuration it was made from (for activate)


class Component:
    """The default lifecycle: nothing to start or stop, nothing kept across reloads."""

    def configure(self, settings, ctx) -> Configured:
        raise NotImplementedError

    def activate(self, configured: Configured) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self):
        return None
