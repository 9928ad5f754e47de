"""Checks: the one vocabulary every tier uses to decide on a session.

A check has a name, the phase it runs in, a timeout, and a function from a
frozen :class:`Request` to a :class:`Verdict` (or a Deferred of one).  The
:class:`Chain` runs a phase's checks in the order the policy gives them; the
first verdict other than CONTINUE decides.  A check that raises or times out
gives a tempfail (451 4.3.0) -- never "continue": the engine fails safe.

Check types and policies: :mod:`shared.checks.registry`.  Relay control is a
chain of its own (:mod:`shared.checks.relay`), evaluated before the recipient
checks and *denied unless a rule permits*, so that a mistake in a spam rule can
never open the relay.  A worked example of a check: :mod:`shared.checks.helo`.
"""
from shared.checks.core import (  # noqa: F401
    ACCEPT, CONTINUE, Chain, Check, Request, Symbol, Verdict, accept, disconnect, note, reject, tempfail,
)
