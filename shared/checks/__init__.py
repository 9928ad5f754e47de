"""Checks: the one vocabulary every tier uses to decide on a session.

A check has a name, the phase it runs in, a timeout, and a function from a
frozen :class:`Request` to a :class:`Verdict` (or a Deferred of one).  The
:class:`Chain` runs a phase's checks in their configured order; the first verdict
other than CONTINUE decides.  A check that raises or times out gives a tempfail
(451 4.3.0) — never "continue": the engine fails safe.

Relay control is a chain of its own (:func:`relay_restrictions`), evaluated
before the recipient checks and *denied unless a check permits*, so that a
mistake in a spam rule can never open the relay.
"""
from shared.checks.core import (  # noqa: F401
    ACCEPT, CONTINUE, Chain, Check, Request, Verdict, accept, disconnect, reject, tempfail,
)
