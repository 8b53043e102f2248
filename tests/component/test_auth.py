"""Component test of twistedrelay.auth on the real reactor: scrypt runs off the reactor thread."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import pytest_twisted
from twisted.cred.error import UnauthorizedLogin

from twistedrelay.auth import Authenticator, UsersFile, hash_password


class ThreadRecordingUsersFile(UsersFile):
    """A UsersFile that records which thread checked each password."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.threads: list[int] = []

    def check_password(self, name: str, password: str) -> bool:
        self.threads.append(threading.get_ident())
        return super().check_password(name, password)


@pytest_twisted.ensureDeferred
async def test_logins_hash_in_the_reactor_thread_pool(tmp_path: Path):
    """Good and bad logins are decided in the thread pool, never on the reactor thread."""
    from twisted.internet import reactor

    path = tmp_path / "users"
    path.write_text(f"alice:{hash_password('pw')}\n")
    users = ThreadRecordingUsersFile(path)
    authenticator = Authenticator(users, reactor, reactor.getThreadPool())
    assert await authenticator.authenticate("alice", "pw") == "alice"
    with pytest.raises(UnauthorizedLogin):
        await authenticator.authenticate("alice", "wrong")
    assert len(users.threads) == 2
    assert threading.get_ident() not in users.threads
