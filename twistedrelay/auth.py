"""Authentication for submission ([auth]): who the users are and how a login is checked.

Owns the users file and its password hashes, the twisted.cred checker over it, the
per-address login throttle, the sender ownership rule, and the ``twistedrelay passwd``
command. It does not speak SMTP: the server protocol feeds AUTH lines to
``smtp.sasl.SASLExchange`` and asks :class:`Authenticator` for a verdict.

Invariants: passwords are stored only as salted scrypt hashes and compared in constant time;
the slow hash never runs on the reactor thread; an unknown user costs as much as a wrong
password, so timing does not reveal who exists.

The users file, one user per line (``#`` starts a comment line)::

    alice:scrypt$16384$8$1$<salt b64>$<hash b64>
    bob@example.com:scrypt$16384$8$1$<salt b64>$<hash b64>:bob@example.com,@bob.example

The optional third field lists the sender addresses the user owns for
``auth.restrict_sender``; ``@domain`` means every address in the domain. A user name that is
itself an address always owns that address.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import getpass
import hashlib
import hmac
import os
import secrets
import sys
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from twisted.cred import checkers, credentials, error, portal
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from twistedrelay.smtp.admission import client_key

# -- password hashes -----------------------------------------------------------------------

#: Password checks that run at once in one worker (UsersFileChecker).
CONCURRENT_CHECKS = 2
# RFC 7914 parameters: N=2**14, r=8 costs 16 MiB and tens of milliseconds per check.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
# A hash asking for more memory than this is refused, so a users file cannot exhaust memory.
_MAX_SCRYPT_MEMORY = 2**26


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """Hash a password with scrypt and a fresh random salt.

    :param n: the CPU/memory cost (a power of two); tests may lower it to run fast.
    :returns: ``scrypt$N$r$p$salt_b64$hash_b64``.
    """
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, n, r, p)
    return "$".join(("scrypt", str(n), str(r), str(p), _b64(salt), _b64(digest)))


def verify_password(password: str, stored: str) -> bool:
    """Check a password against a stored hash in constant time.

    :returns: False for a wrong password and for a malformed stored hash.
    """
    try:
        n, r, p, salt, expected = _parse_hash(stored)
    except ValueError:
        return False
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), expected)


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("expected scrypt$N$r$p$salt$hash")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        raise ValueError("bad number or base64 in the scrypt hash") from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or 128 * n * r * p > _MAX_SCRYPT_MEMORY:
        raise ValueError("scrypt parameters out of range")
    if not salt or len(digest) < 16:
        raise ValueError("scrypt salt or hash too short")
    return n, r, p, salt, digest


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=_MAX_SCRYPT_MEMORY + 2**20,
        dklen=HASH_BYTES,
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# A real hash to check unknown users against, so they cost the same time as known ones.
_DUMMY_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + _b64(bytes(HASH_BYTES))


# -- the users file ------------------------------------------------------------------------


class UsersFileError(Exception):
    """A users file that cannot be used; str() names the file and, when known, the line."""


@dataclass(frozen=True, slots=True)
class User:
    """One line of the users file."""

    name: str
    password_hash: str
    addresses: tuple[str, ...] = ()

    def may_send_as(self, sender: str) -> bool:
        """Whether this user owns ``sender`` (for ``auth.restrict_sender``).

        The user owns its name when that is an address, each listed address, and every
        address of each listed ``@domain``. Addresses compare case-insensitively. The null
        sender (bounces, RFC 3834 auto-replies) impersonates nobody and is allowed.
        """
        if sender == "":
            return True
        sender = sender.casefold()
        owned = {a.casefold() for a in (*self.addresses, self.name) if "@" in a}
        domain = "@" + sender.rpartition("@")[2]
        return sender in owned or domain in owned


def parse_users(text: str, source: str) -> dict[str, User]:
    """Parse the users file's text.

    :param source: the file name for error messages.
    :raises UsersFileError: ``FILE:LINE: problem`` for the first bad line.
    """
    users: dict[str, User] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) not in (2, 3):
            raise UsersFileError(f"{source}:{number}: expected user:hash or user:hash:addresses")
        name, password_hash = fields[0], fields[1]
        if not is_valid_user_name(name):
            raise UsersFileError(f"{source}:{number}: bad user name {name!r}")
        if name in users:
            raise UsersFileError(f"{source}:{number}: user {name!r} appears twice")
        try:
            _parse_hash(password_hash)
        except ValueError as e:
            raise UsersFileError(f"{source}:{number}: {e}") from None
        addresses = tuple(a.strip() for a in fields[2].split(",")) if len(fields) == 3 else ()
        if any("@" not in a or any(c.isspace() for c in a) for a in addresses):
            raise UsersFileError(f"{source}:{number}: addresses must look like a@b or @domain")
        users[name] = User(name, password_hash, addresses)
    return users


def is_valid_user_name(name: str) -> bool:
    """A user name is non-empty, printable, without ``:`` or white space."""
    return (
        bool(name) and name.isprintable() and ":" not in name and not any(c.isspace() for c in name)
    )


class UsersFile:
    """The ``auth.users_file``, loaded on first use and reloaded when it changes.

    A change is noticed by the file's mtime, size and inode at each lookup, so an operator's
    edit (or ``twistedrelay passwd``) takes effect without a restart. If the new contents are
    bad, lookups raise until the file is fixed: failing closed keeps a removed user out.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._users: dict[str, User] | None = None
        self._signature: tuple[int, int, int] | None = None
        # Lookups come from the thread pool (logins) and the reactor thread (MAIL FROM).
        self._lock = threading.Lock()

    def reload(self) -> None:
        """Read the file now.

        :raises UsersFileError: the file cannot be read or has a bad line.
        """
        with self._lock:
            self._load()

    def lookup(self, name: str) -> User | None:
        """The user called ``name``, re-reading the file first if it changed.

        :raises UsersFileError: the file cannot be read or has a bad line.
        """
        try:
            stat = self.path.stat()
            signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            signature = None
        with self._lock:
            users = self._users
            if users is None or signature != self._signature:
                users = self._load()
        return users.get(name)

    def _load(self) -> dict[str, User]:
        self._users = None
        try:
            with self.path.open("rb") as f:
                stat = os.fstat(f.fileno())
                text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsersFileError(f"{self.path}: cannot read: {e}") from None
        users = parse_users(text, str(self.path))
        self._users, self._signature = users, (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        return users

    def check_password(self, name: str, password: str) -> bool:
        """Whether ``password`` is ``name``'s; slow (scrypt) and blocking, so call it in a thread.

        :raises UsersFileError: the file cannot be read or has a bad line.
        """
        user = self.lookup(name)
        matched = verify_password(password, user.password_hash if user else _DUMMY_HASH)
        return matched and user is not None


# -- twisted.cred --------------------------------------------------------------------------


class IAuthenticatedUser(Interface):
    """The avatar interface of a submission login: the avatar is the user name (str)."""


@implementer(checkers.ICredentialsChecker)
class UsersFileChecker:
    """A twisted.cred checker of user names and passwords against a :class:`UsersFile`.

    scrypt runs in ``threadpool``, never on the reactor thread, and at most
    CONCURRENT_CHECKS at a time: each check takes 16 MiB, so a flood of AUTH attempts
    waits its turn instead of holding that in every pool thread at once.
    """

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(
        self, users: UsersFile, reactor: IReactorFromThreads, threadpool: ThreadPool
    ) -> None:
        self._users = users
        self._reactor = reactor
        self._threadpool = threadpool
        self._slots = defer.DeferredSemaphore(CONCURRENT_CHECKS)

    def requestAvatarId(  # type: ignore[override]  # our avatar IDs are str user names
        self, credentials: credentials.IUsernamePassword
    ) -> defer.Deferred[str]:
        """Check the credentials; fire with the user name or fail with UnauthorizedLogin.

        A broken users file fails with :class:`UsersFileError` instead (a temporary failure).
        """
        name = _text(credentials.username)
        password = _text(credentials.password)
        d = self._slots.run(
            threads.deferToThreadPool,
            self._reactor,
            self._threadpool,
            self._users.check_password,
            name,
            password,
        )

        def verdict(matched: bool) -> str:
            if not matched:
                raise error.UnauthorizedLogin(f"bad password or unknown user {name!r}")
            return name

        return d.addCallback(verdict)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


@implementer(portal.IRealm)
class UserRealm:
    """The realm of submission users: the avatar is the user name itself."""

    def requestAvatar(  # type: ignore[override]  # avatar IDs are str (UsersFileChecker)
        self, avatar_id: str, mind: object, *interfaces: type
    ) -> tuple[type, str, object]:
        """Return the user name as the avatar for :class:`IAuthenticatedUser`."""
        if IAuthenticatedUser not in interfaces:
            raise NotImplementedError("only IAuthenticatedUser avatars")
        return IAuthenticatedUser, avatar_id, lambda: None


class Authenticator:
    """Checks submission logins through a twisted.cred Portal over the users file."""

    def __init__(
        self, users: UsersFile, reactor: IReactorFromThreads, threadpool: ThreadPool
    ) -> None:
        """Build the portal.

        :param threadpool: where scrypt runs, e.g. ``reactor.getThreadPool()``.
        """
        self.users = users
        self.portal = portal.Portal(UserRealm(), [UsersFileChecker(users, reactor, threadpool)])

    def authenticate(self, username: str, password: str) -> defer.Deferred[str]:
        """Check a login.

        :returns: a Deferred firing with the user name; it fails with
            ``twisted.cred.error.UnauthorizedLogin`` for bad credentials (reply
            ``AUTH_FAILED``) and with :class:`UsersFileError` when the users file is broken
            (reply ``AUTH_TEMPORARY_FAILURE``).
        """
        login = self.portal.login(
            credentials.UsernamePassword(username.encode(), password.encode()),
            None,
            IAuthenticatedUser,
        )

        def user_name(result: tuple[object, object, object]) -> str:
            return str(result[1])

        return login.addCallback(user_name)

    def may_send_as(self, username: str, sender: str) -> bool:
        """Whether an authenticated user owns ``sender`` (see :meth:`User.may_send_as`).

        Blocking only for a stat(2) and, after a change, a re-read of the users file.

        :raises UsersFileError: the users file is broken.
        """
        user = self.users.lookup(username)
        return user is not None and user.may_send_as(sender)


# -- login throttle ------------------------------------------------------------------------


class LoginThrottle:
    """Slows password guessing per client address (pure: the caller passes the time).

    After ``threshold`` failures, each check of a password from that address waits
    ``base_delay_seconds`` doubled per further failure, capped at ``max_delay_seconds``,
    and only one such check runs at a time per address (``begin``/``end``): parallel
    connections do not multiply the guesses. Failures are forgotten ``window_seconds``
    after the last one; a successful login does not forget them (a guesser with one
    account of their own could otherwise reset the count). IPv6 clients are counted per
    /64, because one host commonly holds the whole /64. The count is per worker process.
    """

    def __init__(
        self,
        *,
        threshold: int = 3,
        window_seconds: float = 900.0,
        base_delay_seconds: float = 1.0,
        max_delay_seconds: float = 30.0,
        max_addresses: int = 100_000,
    ) -> None:
        """Configure the throttle; ``max_addresses`` bounds memory under a wide attack."""
        self.threshold = threshold
        self.window_seconds = window_seconds
        self.base_delay_seconds = base_delay_seconds
        self.max_delay_seconds = max_delay_seconds
        self.max_addresses = max_addresses
        # key -> (failures, time of the last failure); dicts keep insertion order, oldest first
        self._failures: dict[str, tuple[int, float]] = {}
        self._throttled_in_flight: set[str] = set()

    def delay_for(self, address: str, now: float) -> float:
        """Seconds to wait before answering this address's next AUTH (0 when not throttled)."""
        count = self._count(client_key(address), now)
        if count < self.threshold:
            return 0.0
        delay = self.base_delay_seconds * 2.0 ** min(count - self.threshold, 64)
        return min(delay, self.max_delay_seconds)

    def record_failure(self, address: str, now: float) -> None:
        """Count a failed login from ``address``."""
        key = client_key(address)
        count = self._count(key, now)
        self._failures.pop(key, None)
        self._failures[key] = (count + 1, now)
        while len(self._failures) > self.max_addresses:
            del self._failures[next(iter(self._failures))]

    def begin(self, address: str, now: float) -> float | None:
        """Start checking a password from ``address``: how long to wait before the check.

        :returns: seconds to wait first, or None when a throttled check from that address
            is still running (refuse this one). Every call that returns a number must be
            followed by ``end`` once the check is done.
        """
        delay = self.delay_for(address, now)
        if delay > 0:
            key = client_key(address)
            if key in self._throttled_in_flight:
                return None
            self._throttled_in_flight.add(key)
        return delay

    def end(self, address: str) -> None:
        """The check started by ``begin`` is over."""
        self._throttled_in_flight.discard(client_key(address))

    def checking(self, address: str) -> bool:
        """True while a throttled check from ``address`` (its /64) is running."""
        return client_key(address) in self._throttled_in_flight

    def _count(self, key: str, now: float) -> int:
        count, last = self._failures.get(key, (0, now))
        if now - last > self.window_seconds:
            del self._failures[key]
            return 0
        return count


# -- twistedrelay passwd -------------------------------------------------------------------


def passwd_main(
    argv: list[str], *, stdin: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """``twistedrelay passwd FILE USER``: add a user or change a password.

    Reads the password from the terminal without echo (asked twice), or one line from
    standard input when it is not a terminal. Rewrites the file atomically with mode 0600,
    creating it when missing; other lines and the user's addresses are kept.

    :param argv: the arguments after ``passwd``.
    :returns: the exit status.
    """
    stdin = stdin if stdin is not None else sys.stdin
    stderr = stderr if stderr is not None else sys.stderr
    parser = argparse.ArgumentParser(
        prog="twistedrelay passwd", description="Add a user or change a user's password."
    )
    parser.add_argument("file", type=Path, help="the users file (auth.users_file)")
    parser.add_argument("user", help="the user name (often the user's email address)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if not is_valid_user_name(args.user):
        print(f"twistedrelay passwd: bad user name {args.user!r}", file=stderr)
        return 1
    try:
        password = _read_password(stdin)
    except (ValueError, EOFError) as e:
        print(f"twistedrelay passwd: {e or 'no password given'}", file=stderr)
        return 1
    try:
        added = set_password(args.file, args.user, password)
    except OSError as e:
        print(f"twistedrelay passwd: {args.file}: {e.strerror or e}", file=stderr)
        return 1
    print(f"{'added user' if added else 'changed password for'} {args.user}", file=stderr)
    return 0


def _read_password(stdin: TextIO) -> str:
    if stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise ValueError("the passwords differ")
    else:
        line = stdin.readline()
        if not line:
            raise EOFError("no password on standard input")
        password = line.rstrip("\r\n")
    if not password:
        raise ValueError("empty password")
    return password


def set_password(path: Path, user: str, password: str) -> bool:
    """Set ``user``'s password in the users file, atomically (write, fsync, rename).

    :returns: True when the user was added, False when an existing password was replaced.
    :raises OSError: the file or its directory cannot be read or written.
    """
    try:
        lines = path.read_text("utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    new_hash = hash_password(password)
    added = True
    for i, line in enumerate(lines):
        fields = line.strip().split(":")
        if not line.lstrip().startswith("#") and fields[0] == user:
            lines[i] = ":".join([user, new_hash, *fields[2:]])
            added = False
    if added:
        lines.append(f"{user}:{new_hash}")
    _write_atomically(path, lines)
    return added


def _write_atomically(path: Path, lines: Iterable[str]) -> None:
    """Replace ``path`` (mode 0600), keeping the owner and group of the file it replaces.

    Run as root for a relay whose workers run as another user, the new file must stay
    readable by them.
    """
    directory = path.parent
    try:
        before = path.stat()
    except FileNotFoundError:
        before = None
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        if before is not None and (before.st_uid, before.st_gid) != (os.geteuid(), os.getegid()):
            os.fchown(fd, before.st_uid, before.st_gid)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    # The rename is durable only once the directory itself is on disk.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
