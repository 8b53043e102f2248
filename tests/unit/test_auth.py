"""Unit tests of twistedrelay.auth: hashes, users file, cred, throttle, passwd."""

from __future__ import annotations

import base64
import io
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.python.failure import Failure

from twistedrelay.auth import (
    CONCURRENT_CHECKS,
    Authenticator,
    LoginThrottle,
    User,
    UsersFile,
    UsersFileError,
    hash_password,
    parse_users,
    passwd_main,
    set_password,
    verify_password,
)

FAST = 2**4  # scrypt cost for tests that are not about the cost


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def fast_hash(password: str) -> str:
    return hash_password(password, n=FAST)


# -- hashes --------------------------------------------------------------------------------


def test_hash_has_the_documented_format_and_default_cost():
    """A hash is scrypt$N$r$p$salt$hash with N=2**14, r=8, p=1 and a 16-byte salt."""
    parts = hash_password("secret").split("$")
    assert parts[:4] == ["scrypt", "16384", "8", "1"]
    assert len(base64.b64decode(parts[4])) == 16
    assert len(base64.b64decode(parts[5])) == 32


def test_verify_accepts_the_password_and_rejects_others():
    """verify_password is true only for the hashed password."""
    stored = hash_password("correct horse", n=FAST)
    assert verify_password("correct horse", stored)
    assert not verify_password("correct hors", stored)
    assert not verify_password("", stored)


def test_same_password_hashes_differently_each_time():
    """A random salt makes two hashes of one password differ."""
    assert fast_hash("pw") != fast_hash("pw")


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "plain",
        "scrypt$16384$8$1$salt",
        "scrypt$x$8$1$AAAA$AAAA",
        "scrypt$3$8$1$AA==$" + "A" * 44,
        "scrypt$1073741824$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 43 + "=",
    ],
)
def test_verify_rejects_malformed_or_costly_hashes(stored: str):
    """A malformed hash, or one asking for gigabytes of memory, verifies nothing."""
    assert not verify_password("pw", stored)


# -- users file ----------------------------------------------------------------------------


def test_parse_users_skips_comments_and_blank_lines_and_reads_addresses():
    """Comments and blank lines are ignored; the third field lists owned addresses."""
    h = fast_hash("pw")
    users = parse_users(f"# users\n\nalice:{h}\nbob:{h}:bob@example.com, @bob.example\n", "u")
    assert users["alice"] == User("alice", h, ())
    assert users["bob"].addresses == ("bob@example.com", "@bob.example")


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("alice", "expected user:hash"),
        ("alice:HASH:a@b:extra", "expected user:hash"),
        (":HASH", "bad user name"),
        ("alice:notahash", "expected scrypt"),
        ("alice:HASH:not-an-address", "addresses must look like"),
    ],
)
def test_bad_line_names_file_and_line_number(line: str, problem: str):
    """A bad line raises an error naming the file and its line number."""
    text = f"# header\nok:{fast_hash('pw')}\n" + line.replace("HASH", fast_hash("pw")) + "\n"
    with pytest.raises(UsersFileError, match=rf"^users\.txt:3: .*{problem}"):
        parse_users(text, "users.txt")


def test_duplicate_user_is_an_error():
    """A user listed twice is an error on the second line."""
    h = fast_hash("pw")
    with pytest.raises(UsersFileError, match=r"^f:2: user 'a' appears twice"):
        parse_users(f"a:{h}\na:{h}\n", "f")


def test_users_file_loads_lazily_and_reloads_when_changed(tmp_path: Path):
    """The file is read at first lookup and re-read after it changes."""
    path = tmp_path / "users"
    users = UsersFile(path)  # missing file: no error until used
    path.write_text(f"alice:{fast_hash('one')}\n")
    assert users.check_password("alice", "one")
    path.write_text(f"alice:{fast_hash('two')}\nbob:{fast_hash('three')}\n")
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse-clock file system
    assert users.check_password("alice", "two")
    assert not users.check_password("alice", "one")
    assert users.lookup("bob") is not None


def test_broken_users_file_fails_closed_until_fixed(tmp_path: Path):
    """After a bad edit lookups raise (a removed user stays out), and work again once fixed."""
    path = tmp_path / "users"
    path.write_text(f"alice:{fast_hash('pw')}\n")
    users = UsersFile(path)
    assert users.lookup("alice") is not None
    path.write_text("alice\n")
    with pytest.raises(UsersFileError, match=r":1: "):
        users.lookup("alice")
    with pytest.raises(UsersFileError):
        users.lookup("alice")
    path.write_text(f"alice:{fast_hash('pw')}\n")
    assert users.lookup("alice") is not None


def test_missing_users_file_names_the_file(tmp_path: Path):
    """Loading a missing users file raises an error naming it."""
    with pytest.raises(UsersFileError, match="nope.*cannot read"):
        UsersFile(tmp_path / "nope").reload()


def test_unknown_user_does_not_match(tmp_path: Path):
    """An unknown user is refused (after a dummy hash, for equal timing)."""
    path = tmp_path / "users"
    path.write_text("# nobody here\n")
    assert not UsersFile(path).check_password("nobody", "pw")


# -- sender ownership ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "sender", "allowed"),
    [
        (User("alice@example.com", "h"), "alice@example.com", True),
        (User("alice@example.com", "h"), "Alice@EXAMPLE.com", True),
        (User("alice@example.com", "h"), "bob@example.com", False),
        (User("alice", "h"), "alice@example.com", False),
        (User("alice", "h", ("al@example.org",)), "al@example.org", True),
        (User("alice", "h", ("@example.net",)), "anyone@example.net", True),
        (User("alice", "h", ("@example.net",)), "anyone@sub.example.net", False),
        (User("alice", "h"), "", True),
    ],
)
def test_may_send_as(user: User, sender: str, allowed: bool):
    """A user owns its address name, listed addresses and listed @domains; <> is allowed."""
    assert user.may_send_as(sender) is allowed


# -- twisted.cred --------------------------------------------------------------------------


class ImmediateReactor:
    """callFromThread runs at once: enough for deferToThreadPool without a reactor."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class RecordingThreadPool:
    """Runs work synchronously and records that it went through the pool."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):  # noqa: N802
        self.calls.append(f.__name__)
        try:
            result = f(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - relayed like the real pool
            on_result(False, Failure(e))
        else:
            on_result(True, result)


def make_authenticator(tmp_path: Path, text: str) -> tuple[Authenticator, RecordingThreadPool]:
    path = tmp_path / "users"
    path.write_text(text)
    pool = RecordingThreadPool()
    return Authenticator(UsersFile(path), ImmediateReactor(), pool), pool  # type: ignore[arg-type]


def result_of(d: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred did not fire"
    return results[0]


def test_authenticate_returns_the_user_name_and_hashes_in_the_threadpool(tmp_path: Path):
    """A good login fires with the user name; the hash ran in the injected thread pool."""
    authenticator, pool = make_authenticator(tmp_path, f"alice:{fast_hash('pw')}\n")
    assert result_of(authenticator.authenticate("alice", "pw")) == "alice"
    assert pool.calls == ["check_password"]


@pytest.mark.parametrize(("user", "password"), [("alice", "wrong"), ("bob", "pw")])
def test_authenticate_fails_with_unauthorized_login(tmp_path: Path, user: str, password: str):
    """A wrong password or an unknown user fails with UnauthorizedLogin."""
    authenticator, _ = make_authenticator(tmp_path, f"alice:{fast_hash('pw')}\n")
    failure = result_of(authenticator.authenticate(user, password))
    assert failure.check(UnauthorizedLogin)


def test_authenticate_with_broken_users_file_is_a_temporary_failure(tmp_path: Path):
    """A broken users file fails with UsersFileError, not UnauthorizedLogin."""
    authenticator, _ = make_authenticator(tmp_path, "garbage\n")
    failure = result_of(authenticator.authenticate("alice", "pw"))
    assert failure.check(UsersFileError) and not failure.check(UnauthorizedLogin)


class HeldThreadPool:
    """Keeps every job until the test lets it finish, to count how many run at once."""

    def __init__(self) -> None:
        self.held: list[Callable[[], None]] = []

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):  # noqa: N802
        self.held.append(lambda: on_result(True, f(*args, **kwargs)))


def test_no_more_than_two_password_checks_run_at_once(tmp_path: Path):
    """scrypt takes 16 MiB a check: a flood of logins waits for a slot, none is lost."""
    path = tmp_path / "users"
    path.write_text(f"alice:{fast_hash('pw')}\n")
    pool = HeldThreadPool()
    authenticator = Authenticator(UsersFile(path), ImmediateReactor(), pool)  # type: ignore[arg-type]
    logins = [authenticator.authenticate("alice", "pw") for _ in range(5)]
    finished = 0
    while pool.held:
        assert len(pool.held) <= CONCURRENT_CHECKS
        pool.held.pop(0)()
        finished += 1
    assert finished == 5
    assert [result_of(login) for login in logins] == ["alice"] * 5


def test_authenticator_may_send_as_uses_the_users_file(tmp_path: Path):
    """may_send_as looks the user up in the users file; unknown users own nothing."""
    h = fast_hash("pw")
    authenticator, _ = make_authenticator(tmp_path, f"alice:{h}:alice@example.com\n")
    assert authenticator.may_send_as("alice", "alice@example.com")
    assert not authenticator.may_send_as("alice", "bob@example.com")
    assert not authenticator.may_send_as("mallory", "alice@example.com")


# -- throttle ------------------------------------------------------------------------------


def test_throttle_delays_exponentially_after_threshold_up_to_the_cap():
    """No delay below the threshold, then 1, 2, 4 ... seconds, never above the cap."""
    throttle = LoginThrottle(threshold=3, base_delay_seconds=1.0, max_delay_seconds=30.0)
    delays = []
    for i in range(10):
        delays.append(throttle.delay_for("192.0.2.1", now=float(i)))
        throttle.record_failure("192.0.2.1", now=float(i))
    assert delays == [0, 0, 0, 1, 2, 4, 8, 16, 30, 30]
    assert throttle.delay_for("192.0.2.2", now=10.0) == 0


def test_throttle_forgets_a_window_after_the_last_failure():
    """Failures expire a window after the last one (and only then: a good login by the same
    address, which a guesser with an account of their own could make, does not reset it)."""
    throttle = LoginThrottle(threshold=1, window_seconds=60.0)
    throttle.record_failure("192.0.2.1", now=0.0)
    assert throttle.delay_for("192.0.2.1", now=60.0) == 1.0
    assert throttle.delay_for("192.0.2.1", now=60.5) == 0.0


def test_throttled_checks_run_one_at_a_time_per_address():
    """Parallel connections cannot multiply the guesses: past the threshold, a second check
    from the same address is refused while one is running."""
    throttle = LoginThrottle(threshold=1)
    assert throttle.begin("192.0.2.1", now=0.0) == 0.0  # not throttled: no limit
    assert throttle.begin("192.0.2.1", now=0.0) == 0.0
    throttle.end("192.0.2.1")
    throttle.end("192.0.2.1")
    throttle.record_failure("192.0.2.1", now=0.0)
    assert throttle.begin("192.0.2.1", now=0.0) == 1.0
    assert throttle.checking("192.0.2.1")
    assert throttle.begin("192.0.2.1", now=0.0) is None
    assert throttle.begin("192.0.2.2", now=0.0) == 0.0  # another address is not held
    throttle.end("192.0.2.1")
    assert throttle.begin("192.0.2.1", now=0.0) == 1.0


def test_throttle_counts_ipv6_per_64_and_mapped_ipv4_as_ipv4():
    """Addresses in one IPv6 /64 share a count; ::ffff:a.b.c.d counts as a.b.c.d."""
    throttle = LoginThrottle(threshold=1)
    throttle.record_failure("2001:db8:1:2::1", now=0.0)
    assert throttle.delay_for("2001:db8:1:2::ffff", now=0.0) == 1.0
    assert throttle.delay_for("2001:db8:1:3::1", now=0.0) == 0.0
    throttle.record_failure("::ffff:192.0.2.7", now=0.0)
    assert throttle.delay_for("192.0.2.7", now=0.0) == 1.0


def test_throttle_memory_is_bounded():
    """Beyond max_addresses the oldest address is forgotten."""
    throttle = LoginThrottle(threshold=1, max_addresses=2)
    for i in range(3):
        throttle.record_failure(f"192.0.2.{i}", now=0.0)
    assert throttle.delay_for("192.0.2.0", now=0.0) == 0.0
    assert throttle.delay_for("192.0.2.2", now=0.0) == 1.0


# -- passwd --------------------------------------------------------------------------------


def run_passwd(argv: list[str], stdin_text: str) -> tuple[int, str]:
    stderr = io.StringIO()
    status = passwd_main(argv, stdin=io.StringIO(stdin_text), stderr=stderr)
    return status, stderr.getvalue()


def test_passwd_creates_the_file_with_mode_0600(tmp_path: Path):
    """passwd creates a missing users file, private to its owner, holding a working hash."""
    path = tmp_path / "users"
    status, message = run_passwd([str(path), "alice@example.com"], "s3cret\n")
    assert (status, message) == (0, "added user alice@example.com\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert UsersFile(path).check_password("alice@example.com", "s3cret")


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_passwd_keeps_the_owner_of_the_file_it_replaces(tmp_path: Path):
    """Root updating the users file of unprivileged workers leaves it theirs."""
    users = tmp_path / "users"
    set_password(users, "alice", "first")
    os.chown(users, 65534, 65534)  # nobody
    set_password(users, "alice", "second")
    stat = users.stat()
    assert (stat.st_uid, stat.st_gid, stat.st_mode & 0o777) == (65534, 65534, 0o600)


def test_passwd_replaces_a_password_and_keeps_other_lines(tmp_path: Path):
    """Changing a password keeps comments, other users and the user's addresses."""
    path = tmp_path / "users"
    bob = fast_hash("bob")
    path.write_text(f"# team\nalice:{fast_hash('old')}:al@example.com\nbob:{bob}\n")
    path.chmod(0o644)
    status, message = run_passwd([str(path), "alice"], "new\r\n")
    assert (status, message) == (0, "changed password for alice\n")
    lines = path.read_text().splitlines()
    assert lines[0] == "# team" and lines[2] == f"bob:{bob}"
    assert lines[1].startswith("alice:scrypt$") and lines[1].endswith(":al@example.com")
    users = UsersFile(path)
    assert users.check_password("alice", "new") and not users.check_password("alice", "old")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["users"]  # no temporary file left


@pytest.mark.parametrize(
    ("argv", "stdin_text", "problem"),
    [
        (["USERS", "bad:name"], "pw\n", "bad user name"),
        (["USERS", "alice"], "", "no password"),
        (["USERS", "alice"], "\n", "empty password"),
    ],
)
def test_passwd_refuses_bad_input(tmp_path: Path, argv: list[str], stdin_text: str, problem: str):
    """A bad user name or a missing password exits 1 and leaves no file."""
    argv = [str(tmp_path / "users") if a == "USERS" else a for a in argv]
    status, message = run_passwd(argv, stdin_text)
    assert status == 1 and problem in message
    assert not (tmp_path / "users").exists()


def test_passwd_usage_error_exits_2(capsys: pytest.CaptureFixture[str]):
    """Missing arguments print usage and return 2."""
    assert passwd_main([], stdin=io.StringIO(""), stderr=io.StringIO()) == 2
    assert "usage: twistedrelay passwd" in capsys.readouterr().err


def test_passwd_runs_as_a_subprocess(tmp_path: Path):
    """The entry point works with a real stdin pipe, as `twistedrelay passwd` will run it."""
    import subprocess
    import sys

    path = tmp_path / "users"
    code = (
        "import sys; from twistedrelay.auth import passwd_main; sys.exit(passwd_main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path), "carol"],
        input="pw\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert UsersFile(path).check_password("carol", "pw")
