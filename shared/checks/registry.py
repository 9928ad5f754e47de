"""The check registry: what a tier can run, and the policies that say what it does run.

A check *type* (:class:`CheckType`) is registered by a tier (its ``service.TIER``
lists them): a name, the phases it can run in, its settings section (a frozen
dataclass read from its own ``[name]`` table, see
:meth:`shared.config.schema.Section.of`), and ``build(settings, ctx)``, which
makes the check function for one configuration (or None: the check is off).

A *policy* (``[policies.NAME]``) lists per phase the checks its sessions run,
in order, and the relay permit rules (:class:`PermitRule`): a recipient outside
the hosted domains is refused unless one of them permits it, so no spam rule
can open the relay.  Each listener names its policy.

:func:`build_policies` makes every policy of a configuration, each check
built once however many policies use it; a reload builds a new set and the
daemon swaps it in whole (:mod:`shared.daemon`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from shared.checks.core import Chain, Check, CheckFn
from shared.checks.relay import PERMITS, PermitRule, RelayControl
from shared.config.schema import PHASE_KEYS, Section, Settings, TierSpec
from shared.counters import describe as counters_where
from shared.redisconn import configured, describe as describe_redis


@dataclass(frozen=True)
class CheckType:
    name: str
    phases: tuple[str, ...]
    build: Callable[[Any, "BuildContext"], CheckFn | None]
    section: Section | None = None          # its [name] table; build gets its object
    doc: str = ""
    timeout: float | Callable[[Settings], float] = 30.0
    # (its settings, the configuration) -> whether build makes a check; None: always.
    # check-config marks a check listed but off.
    active: Callable[[Any, Settings], bool] | None = None
    # (its settings, the configuration) -> None, or raises ConfigError: what start-up needs
    # from this host (files it reads), run by check-config and a starting daemon.
    preflight: Callable[[Any, Settings], None] | None = None
    # (its settings, the configuration) -> what check-config prints under the check when it
    # is on: what it was given to work with (zones, limits), in one line.
    summary: Callable[[Any, Settings], str] | None = None
    # The symbols it reports (shared.checks.core.Symbol), each with its default score and
    # meaning: {"SPF_FAIL": (3.0, "SPF says the client may not send for the domain")}.
    # The actions check scores them; check-config prints them.  A check whose symbols come
    # from its configuration (a DNS list's, named by the administrator) gives a function
    # (its settings, the configuration) -> that mapping instead.
    symbols: dict[str, tuple[float, str]] | Callable[[Any, Settings], dict[str, tuple[float, str]]] = \
        field(default_factory=dict)
    # The checks whose results it reads, which a policy must list before it in a phase they
    # share: names, "symbols" (every check that reports symbols) or "*" (every other check);
    # or {phase: those}, for a check that reads them in some of its phases only.
    after: tuple[str, ...] | dict[str, tuple[str, ...]] = ()

    def own(self, settings: Settings, policy: str | None = None) -> Any:
        """Its settings object in `settings` (None: it has no section), with what `policy`'s
        ``[policies.NAME.CHECK]`` table sets for it."""
        if self.section is None:
            return None
        own = settings.sections[self.section.name]
        changed = settings.policies[policy].settings.get(self.section.name) if policy is not None else None
        return replace(own, **changed) if changed else own

    def is_active(self, settings: Settings, policy: str | None = None) -> bool:
        if self.active is None:
            return True
        return self.active(self.own(settings, policy), settings)

    def symbols_for(self, settings: Settings, policy: str | None = None) -> dict[str, tuple[float, str]]:
        """The symbols it reports under `settings` (see ``symbols``)."""
        if callable(self.symbols):
            return self.symbols(self.own(settings, policy), settings)
        return self.symbols

    def timeout_for(self, settings: Settings) -> float:
        return self.timeout(settings) if callable(self.timeout) else self.timeout


@dataclass
class BuildContext:
    """What a check's ``build`` may use: the whole configuration, the reactor, the
    bounded pool for blocking work, the tier's next-hop client of this configuration
    (None in a tier without one, and when only checking a file), ``on_retire`` to
    have something closed when this configuration is replaced or the tier stops, and
    ``kept`` for state that outlives a reload (counters, caches)."""
    settings: Settings
    reactor: Any
    pool: Any
    next_hop: Any = None
    closers: list[Callable[[], Any]] = field(default_factory=list)
    store: dict[str, Any] = field(default_factory=dict)     # the daemon's: the same at every reload

    def on_retire(self, fn: Callable[[], Any]) -> None:
        self.closers.append(fn)

    def kept(self, name: str, make: Callable[[], Any]) -> Any:
        """The object kept under `name` since the process started (made by `make()` the
        first time): a rate counter does not forget its clients at a reload."""
        if name not in self.store:
            self.store[name] = make()
        return self.store[name]


@dataclass(frozen=True)
class Policy:
    name: str
    chain: Chain
    relay: RelayControl


def build_policies(settings: Settings, spec: TierSpec, ctx: BuildContext) -> dict[str, Policy]:
    """Every ``[policies.NAME]`` of `settings`, built (the file was validated when loaded:
    each name is a check of `spec` allowed in its phase)."""
    types = {c.name: c for c in spec.checks}
    permits = {p.name: p for p in all_permits(spec)}
    built: dict[tuple, CheckFn | None] = {}     # each check once per distinct settings
    out = {}
    for name, policy in settings.policies.items():
        checks = []
        for phase in PHASE_KEYS:
            for entry in getattr(policy, phase):
                t = types[entry]
                own = t.own(settings, name)
                try:
                    key = (entry, hash(own) and own)
                except TypeError:                     # settings that cannot be compared: per policy
                    key = (entry, name)
                if key not in built:
                    built[key] = t.build(own, ctx)
                fn = built[key]
                if fn is not None:
                    checks.append(Check(entry, phase, fn, timeout=types[entry].timeout_for(settings)))
        rules = [(r, permits[r].build(settings)) for r in policy.relay]
        out[name] = Policy(name, Chain(checks, reactor=ctx.reactor), RelayControl(rules))
    return out


def _symbol_scores(settings: Settings) -> dict[str, float]:
    """The scores ``[actions] scores`` sets (over the checks' defaults), where the tier has it."""
    return dict(getattr(settings.sections.get("actions"), "scores", None) or {})


def preflight_checks(settings: Settings, spec: TierSpec) -> None:
    """Every registered check's preflight (see CheckType.preflight)."""
    for t in spec.checks:
        if t.preflight is not None:
            t.preflight(t.own(settings), settings)


def all_permits(spec: TierSpec) -> list[PermitRule]:
    return [*PERMITS, *spec.permits]


def describe(settings: Settings, spec: TierSpec) -> str:
    """Each listener and the policy its sessions follow, then each policy's checks per
    phase in the order they run, and its relay permit rules, then where the counters
    are (in a tier with a ``[redis]`` section): what check-config prints."""
    types = {c.name: c for c in spec.checks}
    permits = {p.name: p for p in all_permits(spec)}
    lines = []
    for name, listener in settings.listeners.items():
        needs = [w for w, on in (("TLS", listener.require_tls), ("AUTH", listener.require_auth)) if on]
        lines.append(f"listener {name}: {listener.endpoint} ({listener.role}; tls {listener.tls}; auth "
                     f"{'on' if listener.auth else 'off'}"
                     f"{'; MAIL needs ' + ' and '.join(needs) if needs else ''}), policy {listener.policy}")
    for name, policy in settings.policies.items():
        lines.append(f"policy {name}:")
        for phase in PHASE_KEYS:
            for i, entry in enumerate(getattr(policy, phase), 1):
                t = types[entry]
                active = t.is_active(settings, name)
                state = f"timeout {t.timeout_for(settings):g}s" if active else "off"
                lines.append(f"  {phase:11} {i:2}. {entry} ({state}): {t.doc}")
                if t.summary is not None and active:
                    lines.append(f"{'':18}{t.summary(t.own(settings, name), settings)}")
                symbols = t.symbols_for(settings, name) if active else {}
                if symbols:
                    scores = _symbol_scores(settings)
                    lines.append(f"{'':18}symbols: " + ", ".join(
                        f"{s} {scores.get(s, d):g}" for s, (d, _) in symbols.items()))
                if t.section is not None and t.section.name in policy.settings:
                    own = ", ".join(f"{k} = {v!r}" for k, v in policy.settings[t.section.name].items())
                    lines.append(f"{'':18}this policy's own settings: {own}")
        rules = ", ".join(policy.relay) or "none"
        lines.append(f"  relay, before the rcpt checks (554 5.7.1 unless one permits): {rules}")
        for r in policy.relay:
            lines.append(f"           {r}: {permits[r].doc}")
    if settings.has("redis"):
        if any(c.name == "rate_limits" for c in spec.checks):
            lines.append(counters_where(settings))
        elif configured(settings.redis):
            lines.append(f"redis: {describe_redis(settings.redis)}, shared by every node using it")
    return "\n".join(lines)


def active_checks(settings: Settings, spec: TierSpec, policy: str = "default") -> dict[str, list[str]]:
    """{phase: [check names]} of the checks `policy` runs (those switched off left out, and
    a phase none of whose checks is on)."""
    types = {c.name: c for c in spec.checks}
    p = settings.policies[policy]
    active = {phase: [c for c in getattr(p, phase) if types[c].is_active(settings, policy)]
              for phase in PHASE_KEYS if phase != "relay"}
    return {phase: names for phase, names in active.items() if names}
