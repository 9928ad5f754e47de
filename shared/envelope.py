"""The envelope of one message as it travels between tiers and through a queue.

Everything here is plain data that serialises to JSON: the queue stores it in
the queue file, the SMTP client turns it back into MAIL/RCPT parameters
(DSN: RET, ENVID, NOTIFY, ORCPT; RFC 3461) and into XCLIENT attributes for the
next hop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.message import HeaderEdits


@dataclass(slots=True)
class Recipient:
    address: str
    notify: tuple[str, ...] | None = None     # ("SUCCESS", "FAILURE", "DELAY") or ("NEVER",)
    orcpt: str | None = None                  # "rfc822;user@example.org", decoded (not xtext)

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address,
                "notify": list(self.notify) if self.notify is not None else None,
                "orcpt": self.orcpt}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Recipient":
        notify = d.get("notify")
        return cls(d["address"], tuple(notify) if notify is not None else None, d.get("orcpt"))


@dataclass(slots=True)
class ClientInfo:
    """Who the original client was: what XCLIENT carries (Postfix XCLIENT_README)."""
    addr: str | None = None        # IP address, "[UNAVAILABLE]" when unknown
    port: int | None = None
    name: str | None = None        # verified reverse name, or None
    helo: str | None = None
    proto: str | None = None       # "SMTP" or "ESMTP"
    login: str | None = None       # SASL identity
    tls: str | None = None         # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384", informational


@dataclass(slots=True)
class Envelope:
    sender: str                                   # "" is the null sender
    recipients: list[Recipient]
    ret: str | None = None                        # "FULL" or "HDRS"
    envid: str | None = None                      # decoded
    body: str | None = None                       # "7BIT" or "8BITMIME"
    smtputf8: bool = False
    client: ClientInfo = field(default_factory=ClientInfo)
    upstream_id: str | None = None                # the previous tier's queue id, if known
    received_at: float = 0.0                      # time.time() when the 250 was sent
    notice: str | None = None                     # "bounce" or "double-bounce": made by the queue itself
    header_edits: HeaderEdits | None = None       # what end-of-data checks asked for, applied when sent
    quarantine: str | None = None                 # why a check kept it from delivery (quarantine/)

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("sender", "ret", "envid", "body", "smtputf8",
                                           "upstream_id", "received_at", "notice")}
        d["recipients"] = [r.to_json() for r in self.recipients]
        if self.header_edits:
            d["header_edits"] = self.header_edits.to_json()
        if self.quarantine:
            d["quarantine"] = self.quarantine
        c = self.client
        d["client"] = {"addr": c.addr, "port": c.port, "name": c.name, "helo": c.helo, "proto": c.proto,
                       "login": c.login, "tls": c.tls}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Envelope":
        return cls(
            sender=d["sender"],
            recipients=[Recipient.from_json(r) for r in d["recipients"]],
            ret=d.get("ret"), envid=d.get("envid"), body=d.get("body"),
            smtputf8=bool(d.get("smtputf8", False)),
            client=ClientInfo(**d.get("client", {})),
            upstream_id=d.get("upstream_id"),
            received_at=float(d.get("received_at", 0.0)),
            notice=d.get("notice"),
            header_edits=HeaderEdits.from_json(d.get("header_edits")),
            quarantine=_text(d.get("quarantine")),
        )


def _text(value: Any) -> str | None:
    """An optional text field of a stored envelope: a string, or None when unset."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise TypeError(f"expected a string, not {type(value).__name__}")
    return value
