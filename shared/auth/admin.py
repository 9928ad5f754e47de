"""`smarthost user add|passwd|delete|list`: the embedded user store of an edge.

The file is the one the edge's ``auth.users_file`` names; it is owned by
``server.user`` when that is set (the tier reads it after dropping privileges).
A password comes from the terminal (asked twice) or, with ``--password-stdin``,
from the first line of standard input (for scripts; never a command-line
argument, which other users can see in the process list).  The running edge
sees every change at its next AUTH: no reload.
"""
from __future__ import annotations

import getpass
import pwd
import sys

from shared.auth.store import StoreError, UserStore, editing, make_user


class AdminError(Exception):
    pass


def _password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise AdminError("the passwords differ")
    return first


def _owner(settings) -> tuple[int, int] | None:
    user = settings.server.user
    if not user:
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise AdminError(f"{settings.path}: server.user: no such user {user!r}") from None
    return pw.pw_uid, pw.pw_gid


def main(settings, action: str, name: str | None, *, cram_md5: bool = False, password_stdin: bool = False,
         out=sys.stdout) -> int:
    path = settings.auth.users_file
    if not path:
        raise AdminError(f"{settings.path}: auth.users_file is not set: this edge keeps no users")
    try:
        if action == "list":
            for u in sorted(UserStore(path).refresh().values(), key=lambda u: u.name.lower()):
                out.write(f"{u.name}{'  (cram-md5)' if u.cram_key is not None else ''}\n")
            return 0
        key = name.lower()
        if action == "add" or action == "passwd":
            password = _password(password_stdin)
            user = make_user(name, password, cram_md5)
            with editing(path, _owner(settings)) as users:
                if action == "add" and key in users:
                    raise AdminError(f"{name}: already a user (use passwd)")
                if action == "passwd" and key not in users:
                    raise AdminError(f"{name}: no such user (use add)")
                users[key] = user
            out.write(f"{'added' if action == 'add' else 'changed the password of'} {user.name}"
                      f"{' (with a CRAM-MD5 secret)' if cram_md5 else ''}\n")
            return 0
        with editing(path, _owner(settings)) as users:
            if key not in users:
                raise AdminError(f"{name}: no such user")
            del users[key]
        out.write(f"deleted {name}\n")
        return 0
    except StoreError as e:
        raise AdminError(str(e)) from None
