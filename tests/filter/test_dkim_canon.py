"""The filter's faster replacements of dkimpy internals give exactly the library's results."""
import hashlib
import random

from hypothesis import given, settings, strategies as st

from filter import dkim as ours

WS = st.text(alphabet=" \t\r\nab", max_size=200).map(lambda s: s.encode())


@given(WS)
@settings(max_examples=500, deadline=None)
def test_canonicalization_equals_the_library(content):
    for name in ("compress_whitespace", "strip_trailing_whitespace"):
        assert getattr(ours, name)(content) == ours.LIBRARY[name](content), (name, content)


def test_integers_equal_the_library():
    rng = random.Random(7)
    for _ in range(500):
        n = rng.getrandbits(rng.choice((0, 1, 8, 9, 1024, 2048)))
        assert ours.int2str(n) == ours.LIBRARY["int2str"](n)
        for length in (1, 4, 128, 256, 300):
            assert ours.int2str(n, length) == ours.LIBRARY["int2str"](n, length)
        b = ours.int2str(n)
        assert ours.str2int(b) == ours.LIBRARY["str2int"](b)


def test_rsa_equals_the_library():
    import dkim.crypto
    from tests.filter.mailauth import keys
    for name in ("rsa", "other"):
        private = dkim.crypto.parse_pem_private_key(keys()[name].private)
        public = {"modulus": private["modulus"], "publicExponent": private["publicExponent"]}
        for algorithm in (hashlib.sha256, hashlib.sha1):
            for text in (b"", b"message", b"x" * 5000):
                ours_sig = ours.rsa_sign(algorithm(text), private)
                assert ours_sig == ours.LIBRARY["rsa_sign"](algorithm(text), private)   # PKCS#1 v1.5 is deterministic
                assert ours.rsa_verify(algorithm(text), ours_sig, public)
                assert ours.LIBRARY["rsa_verify"](algorithm(text), ours_sig, public)
                bad = bytes([ours_sig[0] ^ 1]) + ours_sig[1:]
                assert not ours.rsa_verify(algorithm(text), bad, public)
                assert not ours.LIBRARY["rsa_verify"](algorithm(text), bad, public)
                assert not ours.rsa_verify(algorithm(text + b"!"), ours_sig, public)
        assert not ours.rsa_verify(hashlib.sha256(b"m"), b"short", public)


def test_parsed_keys_are_kept_by_record_text():
    from tests.filter.mailauth import keys
    record = keys()["rsa"].record.encode()
    first = ours.load_pk_from_dns("a", lambda name, timeout=5: record)
    assert ours.load_pk_from_dns("b", lambda name, timeout=5: record) is first
    assert first[1:] == ours.LIBRARY["load_pk_from_dns"]("a", lambda name, timeout=5: record)[1:]


MESSAGE_PARTS = st.lists(st.sampled_from([b"From: a@b", b"Subject: x", b" folded", b"\tfolded", b"", b"",
                                          b"body line ", b"\r", b"From x", b"X-A:b"]), max_size=12)
SEPARATORS = st.lists(st.sampled_from([b"\r\n", b"\n"]), min_size=12, max_size=12)


@given(MESSAGE_PARTS, SEPARATORS)
@settings(max_examples=500, deadline=None)
def test_message_parsing_equals_the_library(parts, seps):
    message = b"".join(p + s for p, s in zip(parts, seps))
    try:
        want = ours.LIBRARY["rfc822_parse"](message)
    except Exception as e:                # the library refuses it (or fails on it): so must we, alike
        try:
            ours.rfc822_parse(message)
        except type(e):
            return
        raise AssertionError(f"{message!r} parsed, the library raises {e!r}")
    assert ours.rfc822_parse(message) == want, message
