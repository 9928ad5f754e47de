"""The `smarthost` command.

    smarthost edge|filter|domain --config FILE    run one tier in the foreground
    smarthost check-config FILE [--tier T]        validate a config, print the effective settings
    smarthost reload --config FILE [--timeout S]  validate FILE, make the running tier load it, say
                                                  whether it did and what needs a restart
    smarthost demo --dir DIR [--base-port N]      all three tiers on 127.0.0.1, mail into Maildir
    smarthost queue ACTION [QID...|ALL] [--json] --config FILE
                                                  list|show|flush|hold|release|delete
    smarthost quarantine ACTION [QID...|ALL] [--json] --config FILE
                                                  list|show|release|delete: the mail checks kept
                                                  from delivery (the filter's queue)
    smarthost user add|passwd|delete|list [NAME] [--cram-md5] [--password-stdin] --config FILE
                                                  the edge's embedded user store (SMTP AUTH)
    smarthost dkim keygen DOMAIN SELECTOR [--algorithm rsa|ed25519] [--bits N] [--directory DIR]
                                                  write a DKIM signing key, print its DNS TXT record
"""
from __future__ import annotations

import argparse
import sys

from shared.config import ConfigError, load, render


def _check_config(args) -> int:
    """Refuse (exit 2) whatever the tier's daemon would refuse at start-up, with the same
    message; print the warnings to stderr and the effective settings to stdout."""
    from shared.daemon import describe_policies, preflight
    try:
        settings = load(args.tier, args.file)
        preflight(settings)
    except ConfigError as e:
        print(f"smarthost check-config: {e}", file=sys.stderr)
        return 2
    for w in settings.warnings:
        print(f"smarthost check-config: warning: {w}", file=sys.stderr)
    sys.stdout.write(render(settings))
    print("\n# listeners, policies and the order their checks run in")
    for line in describe_policies(settings).splitlines():
        print(f"#   {line}")
    return 0


def _reload(args) -> int:
    """Refuse (exit 2) a file that does not validate, without disturbing the tier; else
    SIGHUP the tier that runs with FILE's server.pid_file and print its answer (the tier
    reads its own file again, so FILE is the one it was started with)."""
    try:
        settings = load(None, args.config)
    except ConfigError as e:
        print(f"smarthost reload: {e}", file=sys.stderr)
        return 2
    pid_file = settings.server.pid_file
    if not pid_file:
        print(f"smarthost reload: {args.config}: server.pid_file is not set: cannot find the running tier",
              file=sys.stderr)
        return 1
    from shared import control
    code, text = control.signal_reload(pid_file, timeout=args.timeout)
    print(text, file=sys.stdout if code == 0 else sys.stderr)
    return code


def _load(command: str, path: str):
    """The settings of `path`, or None after printing why not (the caller exits 2)."""
    try:
        return load(None, path)
    except ConfigError as e:
        print(f"smarthost {command}: {e}", file=sys.stderr)
        return None


def _spool(command: str, args, why: str = "") -> str | int:
    """The spool directory of the tier of --config, or the exit status after saying why not."""
    settings = _load(command, args.config)
    if settings is None:
        return 2
    root = settings.queue.directory if settings.has("queue") else ""
    if not root:
        print(f"smarthost {command}: the {settings.tier} tier of {settings.path} keeps no queue "
              f"(it has no [queue] section){why}", file=sys.stderr)
        return 1 if args.action != "list" else 0
    return root


def _queue(args) -> int:
    root = _spool("queue", args)
    if isinstance(root, int):
        return root
    from shared.queue import admin
    if args.action in ("show", "hold", "release", "delete") and not args.qids:
        print(f"smarthost queue {args.action}: name at least one queue id (or ALL)", file=sys.stderr)
        return 2
    if args.json and args.action not in ("list", "show"):
        print(f"smarthost queue {args.action}: --json is for list and show", file=sys.stderr)
        return 2
    try:
        return admin.main(root, args.action, args.qids, as_json=args.json)
    except admin.AdminError as e:
        print(f"smarthost queue {args.action}: {e}", file=sys.stderr)
        return 1


def _quarantine(args) -> int:
    root = _spool("quarantine", args, ", so no quarantine: that is the filter's")
    if isinstance(root, int):
        return root
    from shared.queue import admin
    if args.action != "list" and not args.qids:
        print(f"smarthost quarantine {args.action}: name at least one queue id (or ALL)", file=sys.stderr)
        return 2
    if args.action == "list" and args.qids:
        print("smarthost quarantine list: list takes no queue id", file=sys.stderr)
        return 2
    if args.json and args.action not in ("list", "show"):
        print(f"smarthost quarantine {args.action}: --json is for list and show", file=sys.stderr)
        return 2
    try:
        return admin.quarantine_main(root, args.action, args.qids, as_json=args.json)
    except admin.AdminError as e:
        print(f"smarthost quarantine {args.action}: {e}", file=sys.stderr)
        return 1


def _user(args) -> int:
    settings = _load("user", args.config)
    if settings is None:
        return 2
    if not settings.has("auth"):
        print(f"smarthost user: {args.config} configures the {settings.tier} tier; users are the edge's",
              file=sys.stderr)
        return 2
    if (args.action != "list") != bool(args.name):
        print(f"smarthost user {args.action}: " + ("name one user" if args.action != "list" else
                                                   "list takes no name"), file=sys.stderr)
        return 2
    from shared.auth import admin
    try:
        return admin.main(settings, args.action, args.name, cram_md5=args.cram_md5,
                          password_stdin=args.password_stdin)
    except admin.AdminError as e:
        print(f"smarthost user {args.action}: {e}", file=sys.stderr)
        return 1


def _dkim(args) -> int:
    import os
    from filter.dkimsign import keygen
    from shared.config.schema import domain as domain_rule
    try:
        domain = domain_rule(args.domain)
    except ValueError as e:
        print(f"smarthost dkim keygen: DOMAIN: {e}", file=sys.stderr)
        return 2
    if not args.selector.replace("-", "").replace("_", "").isalnum():
        print(f"smarthost dkim keygen: SELECTOR: {args.selector!r} is not a selector (letters, digits, - and _)",
              file=sys.stderr)
        return 2
    if args.algorithm == "rsa" and not 1024 <= args.bits <= 4096:
        print("smarthost dkim keygen: --bits: from 1024 to 4096 (2048 is the usual size)", file=sys.stderr)
        return 2
    directory = os.path.abspath(args.directory)
    try:
        path, record = keygen(domain, args.selector, directory, args.algorithm, args.bits)
    except FileExistsError:
        print(f"smarthost dkim keygen: {directory}/{domain}.{args.selector}.key exists: not overwritten "
              f"(a new key wants a new selector)", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"smarthost dkim keygen: {directory}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"# private key written to {path} (mode 0600: readable by the filter's server.user only)")
    print("# publish this TXT record in the zone of " + domain + ":")
    print(record)
    print("# and sign with it in the filter's configuration:")
    print(f'#   [dkim_sign]\n#   keys = ["{domain} {args.selector} {path}"]')
    return 0


def _run(args) -> int:
    from shared.daemon import run
    return run(args.command, args.config)


def _demo(args) -> int:
    from shared.demo import run_demo
    return run_demo(args.dir, args.base_port, args.nameserver)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("smarthost")
    except PackageNotFoundError:          # run from a checkout that was never installed
        return "(not installed)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smarthost", description="smart-host mail relay: edge, filter and domain tiers")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for tier, what in (("edge", "the Internet-facing tier"), ("filter", "the email-control tier"),
                       ("domain", "the mailbox tier")):
        t = sub.add_parser(tier, help=f"run {what} in the foreground", description=(
            f"Run {what} in the foreground with the settings of FILE (see `smarthost check-config`). "
            "Logs go to log.file. SIGTERM or SIGINT: stop accepting connections, give open "
            "transactions server.shutdown_timeout seconds, exit 0. SIGHUP: reload FILE (a file that "
            "does not validate is logged and the running settings stay). Exit 2 for a configuration "
            "error, 1 when the tier cannot start."))
        t.add_argument("--config", required=True, metavar="FILE", help="the tier's TOML configuration")
        t.set_defaults(func=_run)
    c = sub.add_parser("check-config", help="validate a configuration file and print the effective settings")
    c.add_argument("file", metavar="FILE")
    c.add_argument("--tier", choices=("edge", "filter", "domain"), help="default: the file's tier key")
    c.set_defaults(func=_check_config)
    r = sub.add_parser("reload", help="make a running tier load its configuration file again", description=(
        "FILE is the file the tier was started with: the tier reads it again itself. "
        "Validate FILE first: a file that does not validate is reported with its key and reason (exit 2) "
        "and the running tier is not signalled. Then send SIGHUP to the tier whose pid is in FILE's "
        "server.pid_file and wait for its answer in the status file beside it (PID_FILE.status). "
        "Prints whether the new configuration is in use (exit 0) or the tier refused it and keeps "
        "the running one (exit 1), and which changed settings need a restart to take effect. "
        "Exit 1 also when no tier runs with that pid file or it does not answer in time."))
    r.add_argument("--config", required=True, metavar="FILE", help="the running tier's TOML configuration")
    r.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for the tier's answer (default 10)")
    r.set_defaults(func=_reload)
    d = sub.add_parser("demo", help="run all three tiers on 127.0.0.1, delivering into Maildir under DIR")
    d.add_argument("--dir", required=True, metavar="DIR")
    d.add_argument("--base-port", type=int, default=2525, metavar="N",
                   help="edge on N, filter on N+1, domain on N+2, submission N+3, submissions N+4, "
                        "the demo's DNS server N+5, its clamd N+6 (default 2525)")
    d.add_argument("--nameserver", metavar="HOST:PORT",
                   help="the filter's DNS server (default: the demo's own, serving the hosted domain's "
                        "SPF, DKIM and DMARC records)")
    d.set_defaults(func=_demo)
    q = sub.add_parser("queue", help="list or change a tier's queue (safe while it runs)")
    q.add_argument("action", choices=("list", "show", "flush", "hold", "release", "delete"))
    q.add_argument("qids", nargs="*", metavar="QID",
                   help="a queue id or the previous tier's (the client's 'queued as' id), "
                        "any case; ALL: every message")
    q.add_argument("--json", action="store_true",
                   help="list, show: one JSON object per message and line")
    q.add_argument("--config", required=True, metavar="FILE")
    q.set_defaults(func=_queue)
    qr = sub.add_parser("quarantine", help="list, show, release or delete quarantined mail (safe while it runs)",
                        description=(
        "Mail an end_of_data check asked to quarantine is accepted (the client is told 250 as for any "
        "message) and kept in the filter's queue, in quarantine/, never delivered on its own. "
        "list: the quarantined messages with the reason; show: envelope, reason, header edits and "
        "the whole message; release: into deferred/, due now: the running tier delivers it with its "
        "header edits, without filtering it again; delete: removed, no bounce. The running tier logs "
        "each release and delete. `smarthost queue list` shows quarantined mail too, with its state."))
    qr.add_argument("action", choices=("list", "show", "release", "delete"))
    qr.add_argument("qids", nargs="*", metavar="QID",
                    help="a queue id or the previous tier's (the client's 'queued as' id), "
                         "any case; ALL: every quarantined message")
    qr.add_argument("--json", action="store_true",
                    help="list, show: one JSON object per message and line")
    qr.add_argument("--config", required=True, metavar="FILE")
    qr.set_defaults(func=_quarantine)
    u = sub.add_parser("user", help="add, change, delete or list the edge's SMTP AUTH users", description=(
        "Edit the file of the edge's auth.users_file (argon2id hashes). The running edge sees a "
        "change at the next AUTH, without a reload."))
    u.add_argument("action", choices=("add", "passwd", "delete", "list"))
    u.add_argument("name", nargs="?", metavar="NAME", help="the user name (usually the address)")
    u.add_argument("--cram-md5", action="store_true",
                   help="add, passwd: also keep a CRAM-MD5 secret (password-equivalent) for this user")
    u.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of standard input")
    u.add_argument("--config", required=True, metavar="FILE", help="the edge's TOML configuration")
    u.set_defaults(func=_user)
    k = sub.add_parser("dkim", help="DKIM signing keys of the filter", description=(
        "keygen: write a new private key to DIR/DOMAIN.SELECTOR.key (PEM, mode 0600, never over an "
        "existing file) and print the TXT record to publish at SELECTOR._domainkey.DOMAIN and the "
        "[dkim_sign] keys entry that signs with it."))
    k.add_argument("action", choices=("keygen",))
    k.add_argument("domain", metavar="DOMAIN")
    k.add_argument("selector", metavar="SELECTOR")
    k.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa",
                   help="rsa (rsa-sha256, default: every verifier knows it) or ed25519 (ed25519-sha256, RFC 8463)")
    k.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    k.add_argument("--directory", default=".", metavar="DIR", help="where to write the key (default: here)")
    k.set_defaults(func=_dkim)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
