"""What the adapter lets in from whom: the inner tiers' client list, and the size
allowance for the pipeline's own additions."""
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from shared.netlist import NetworkList
from shared.smtp.server import ServerConfig
from shared.transport.server import ListenerConfig, PIPELINE_ALLOWANCE, SMTPServerFactory


class Handler:
    """A session handler that answers every decision with the standard reply."""
    in_transaction = False

    def __init__(self, proto):
        self.proto = proto

    def on_connect(self):
        return None

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda event=None: None
        raise AttributeError(name)


def connect(factory, host):
    proto = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
    proto.makeConnection(transport)
    return proto, transport


def factory(**kw):
    return SMTPServerFactory.single(reactor=Clock(), server_config=ServerConfig(hostname="filter.test",
                                                                         max_message_size=1_000_000),
                             handler_factory=Handler, upstream_hosts=["192.0.2.1"], **kw)


def test_an_upstream_tier_may_send_what_the_pipeline_added_on_top_of_the_limit():
    f = factory()
    upstream, edge = connect(f, "192.0.2.1")
    client, other = connect(f, "198.51.100.7")
    upstream.dataReceived(b"EHLO edge.test\r\n")
    client.dataReceived(b"EHLO client.test\r\n")
    assert f"250-SIZE {1_000_000 + PIPELINE_ALLOWANCE}\r\n".encode() in edge.value()
    assert b"250-SIZE 1000000\r\n" in other.value()
    # the edge enforces line length and counts each client's errors: an upstream session,
    # carrying many clients and probes, is not cut off for them
    assert (f.listener().upstream_config.max_data_line, f.listener().upstream_config.hard_error_limit,
            f.listener().upstream_config.junk_command_limit) == (0, 0, 0)
    upstream.dataReceived(b"FOO\r\n" * 30 + b"NOOP\r\n" * 200)
    assert b"421" not in edge.value() and not edge.disconnecting
    client.dataReceived(b"FOO\r\n" * 30)
    assert b"421 4.7.0 filter.test Error: too many errors" in other.value()
    # a reload makes a new listener configuration: the allowance follows
    bigger = ListenerConfig("smtp", ServerConfig(hostname="filter.test", max_message_size=2_000_000), Handler)
    assert bigger.upstream_config.max_message_size == 2_000_000 + PIPELINE_ALLOWANCE
    unlimited = ListenerConfig("smtp", ServerConfig(hostname="filter.test", max_message_size=0), Handler)
    assert unlimited.upstream_config.max_message_size == 0          # no limit stays no limit


def test_inner_tiers_greet_only_their_allowed_clients():
    f = factory(allowed_clients=NetworkList(["192.0.2.1", "10.0.0.0/8"]))
    _, refused = connect(f, "198.51.100.7")
    assert refused.value().startswith(b"554 5.7.1 ")
    assert b"[198.51.100.7]" in refused.value()
    assert refused.disconnecting
    for host in ("192.0.2.1", "10.1.2.3"):
        _, ok = connect(f, host)
        assert ok.value().startswith(b"220 filter.test"), host
    _, anyone = connect(factory(), "198.51.100.7")             # the edge: everybody is greeted
    assert anyone.value().startswith(b"220 ")
