"""The reference: a private Postfix instance relaying to the same sink.

The instance has its own config_directory, queue_directory and data_directory inside the
run's directory, so the machine's /etc/postfix and /var/spool/postfix are never touched
(``postfix -c DIR``, no postmulti). It starts from Debian's main.cf and master.cf and
changes only what a loopback relay to a smarthost needs:

- smtpd listens on 127.0.0.1:PORT (master.cf's ``smtp inet`` line), every service runs
  unchrooted (a chroot would need copies of /etc files inside the private queue);
- ``relayhost = [127.0.0.1]:SINK``, ``mydestination`` empty, ``mynetworks = 127.0.0.0/8``:
  every recipient is relayed to the sink, nothing is delivered locally;
- ``smtp_destination_concurrency_limit = 20``, the relay's per-destination default;
- the smtpd process limit is raised to 1,100, or the idle scenario's 1,000 sessions would
  starve the 20 sending ones (Postfix serves one session per smtpd process, 100 by default);
- the mail log goes to a file (``maillog_file``, via postlogd) that the harness reads for
  delivery delays.

Durability stays Postfix's default (the queue file is fsync'd before 250). Postfix must run
as root (its master drops to ``mail_owner``); the harness installs the Debian package with
apt-get when it is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from load.procs import ProcStat, kill_leftovers, process_tree, read_stat, wait_until

SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
SMTPD_PROCESS_LIMIT = 1100
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 30.0


def postfix_command(name: str = "postfix") -> str | None:
    """The path of a Postfix command (postfix, postconf), or None when Postfix is missing."""
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def ensure_postfix() -> str | None:
    """Make sure Postfix can be run here, installing the Debian package if needed.

    :returns: None when Postfix is ready, else the reason it cannot be benchmarked.
    """
    if os.geteuid() != 0:
        return "Postfix needs root (its master drops to mail_owner); run the harness as root"
    if postfix_command() and postfix_command("postconf"):
        return None
    apt_get = shutil.which("apt-get", path=SBIN_PATH)
    if apt_get is None:
        return "postfix is not installed and apt-get is not available"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # "No configuration": install the programs without configuring or starting the
    # machine's own instance; the harness runs a private one.
    subprocess.run(
        ["debconf-set-selections"],
        input=b"postfix postfix/main_mailer_type select No configuration\n",
        env=env,
        check=False,
        timeout=60,
    )
    result = subprocess.run(
        [apt_get, "install", "-y", "postfix"],
        env=env,
        capture_output=True,
        check=False,
        timeout=900,
    )
    if result.returncode != 0 or not postfix_command():
        tail = (result.stdout + result.stderr).decode("utf-8", "replace")[-1000:]
        return f"apt-get install postfix failed ({result.returncode}): {tail}"
    return None


def postfix_version() -> str:
    """Postfix's mail_version ("" when unknown)."""
    postconf = postfix_command("postconf")
    if postconf is None:
        return ""
    result = subprocess.run(
        [postconf, "-d", "-h", "mail_version"], capture_output=True, check=False, timeout=30
    )
    return result.stdout.decode().strip()


def free_port() -> int:
    """A loopback port the kernel had free a moment ago (Postfix cannot bind port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postfix_role(stat: ProcStat, argv: list[str]) -> str:
    """The Postfix program of a process (master, smtpd, cleanup, qmgr, smtp, …)."""
    return stat.comm


class PostfixInstance:
    """A private Postfix for one scenario.

    :param directory: an empty directory; etc/, spool/, data/ and maillog go here.
    :param sink_port: the sink on 127.0.0.1 that Postfix relays everything to.
    """

    def __init__(self, directory: Path, *, sink_port: int) -> None:
        self.directory = directory
        self.config_dir = directory / "etc"
        self.queue_dir = directory / "spool"
        self.data_dir = directory / "data"
        self.maillog = directory / "maillog"
        self.sink_port = sink_port
        self.smtp_port = 0
        self.pid = 0
        self._snapshot: list[ProcStat] = []
        postfix, postconf = postfix_command(), postfix_command("postconf")
        if postfix is None or postconf is None:
            raise RuntimeError("postfix is not installed")
        self.postfix, self.postconf = postfix, postconf

    def _run(self, *argv: str, timeout: float = 60.0) -> str:
        result = subprocess.run(list(argv), capture_output=True, check=False, timeout=timeout)
        output = (result.stdout + result.stderr).decode("utf-8", "replace")
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed ({result.returncode}): {output}\n{self.log_tail()}"
            )
        return output

    def log_tail(self, characters: int = 2000) -> str:
        """The end of the instance's mail log."""
        if not self.maillog.exists():
            return ""
        return self.maillog.read_text("utf-8", "replace")[-characters:]

    def configure(self) -> None:
        """Write etc/main.cf and etc/master.cf from the machine's (Debian's) files."""
        # The postfix user must reach its queue: the harness makes the run's directory
        # world-traversable, this makes the instance's own directory so.
        self.directory.chmod(0o755)
        self.config_dir.mkdir()
        self.queue_dir.mkdir()  # root-owned; `postfix check` creates its subdirectories
        self.data_dir.mkdir()
        shutil.chown(self.data_dir, user="postfix")
        for name in ("main.cf", "master.cf"):
            source = Path("/etc/postfix") / name
            if not source.exists():
                source = Path("/usr/share/postfix") / f"{name}.dist"
            shutil.copy(source, self.config_dir / name)
        self.smtp_port = free_port()
        settings = {
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.directory),
            "myhostname": "postfix.bench.test",
            "mydomain": "bench.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "relay_domains": "",
            "relayhost": f"[127.0.0.1]:{self.sink_port}",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks reject",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "smtp_destination_concurrency_limit": "20",
            "smtpd_tls_security_level": "none",
            "smtp_tls_security_level": "none",
            "biff": "no",
        }
        conf = ["-c", str(self.config_dir)]
        self._run(
            self.postconf, *conf, "-e", *(f"{key}={value}" for key, value in settings.items())
        )
        listen = f"127.0.0.1:{self.smtp_port}"
        self._run(self.postconf, *conf, "-F", f"smtp/inet/service={listen}")
        self._run(self.postconf, *conf, "-F", f"{listen}/inet/process_limit={SMTPD_PROCESS_LIMIT}")
        self._run(self.postconf, *conf, "-F", "*/*/chroot=n")

    def start(self) -> None:
        """Configure, check (creates the queue directories) and start the instance.

        :raises RuntimeError: a command failed or smtpd did not greet in time.
        """
        self.configure()
        conf = ["-c", str(self.config_dir)]
        self._run(self.postfix, *conf, "check")
        self._run(self.postfix, *conf, "start")
        pid_file = self.queue_dir / "pid" / "master.pid"

        def master_pid() -> int:
            try:
                return int(pid_file.read_text().strip() or 0)
            except (FileNotFoundError, ValueError):
                return 0

        self.pid = wait_until(master_pid, START_TIMEOUT_SECONDS) or 0
        if not self.pid:
            raise RuntimeError(f"the Postfix master wrote no PID file:\n{self.log_tail()}")

        def greets() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=5) as conn:
                    return conn.recv(512).startswith(b"220 ")
            except OSError:
                return False

        if not wait_until(greets, START_TIMEOUT_SECONDS, 0.1):
            raise RuntimeError(f"Postfix smtpd did not greet:\n{self.log_tail()}")

    def queue_is_empty(self) -> bool:
        """No message left in incoming, active or deferred."""
        return not any(
            files
            for state in ("incoming", "active", "deferred", "maildrop")
            for _, _, files in os.walk(self.queue_dir / state)
        )

    def stop(self) -> list[int]:
        """``postfix stop`` (bounded), then SIGKILL any process of the instance still alive.

        :returns: the PIDs that had to be killed.
        """
        if not self.pid:
            return []
        self._snapshot = process_tree(self.pid)
        try:
            self._run(
                self.postfix, "-c", str(self.config_dir), "stop", timeout=STOP_TIMEOUT_SECONDS
            )
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            pass  # whatever is left is killed by PID below
        master = read_stat(self.pid)
        if master is not None:
            pid, started = master.pid, master.start_ticks

            def master_gone() -> bool:
                stat = read_stat(pid)
                return stat is None or stat.start_ticks != started or stat.state in "ZX"

            wait_until(master_gone, STOP_TIMEOUT_SECONDS, 0.1)
        killed = kill_leftovers(self._snapshot)
        self.pid = 0
        return killed
