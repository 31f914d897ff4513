"""Other MTAs to run the same workload through: a private Postfix instance built for one benchmark run.

The instance lives entirely under a temporary directory (its own config_directory, queue_directory and
data_directory), listens on 127.0.0.1 only, delivers nothing locally and relays everything to the
benchmark's sink. It runs beside any system Postfix without touching /etc/postfix's queue.
Needs Debian's `postfix` package (`apt-get install -y postfix`) and root.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import free_port, wait_for_port

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"

# The services a relay-only instance needs, none chrooted (the queue directory is not a prepared jail).
_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_available() -> bool:
    return Path(POSTFIX).exists() and Path(POSTCONF).exists()


def postfix_version() -> str:
    return subprocess.run([POSTCONF, "-h", "mail_version"], capture_output=True, text=True, check=True).stdout.strip()


class PostfixRelay:
    """A Postfix instance relaying all mail from 127.0.0.1:`port` to 127.0.0.1:`relay_port` (context manager).

    Postfix keeps its defaults where they matter for speed (queue files fsynced, 20 parallel deliveries
    to one destination, connection caching); it only skips reverse DNS of the client and writes its log to
    a file, as a host without syslog needs.
    """

    def __init__(self, relay_port: int, concurrency: int = 20) -> None:
        self.relay_port = relay_port
        self.port = free_port()
        self.concurrency = concurrency
        self.directory = Path(tempfile.mkdtemp(prefix="bench-postfix-"))
        self.directory.chmod(0o755)
        self.config_dir = self.directory / "etc"
        self.queue_dir = self.directory / "queue"
        self.pid = 0

    def _settings(self) -> dict[str, str]:
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.directory / "data"),
            "maillog_file": str(self.directory / "maillog"),
            "maillog_file_prefixes": str(self.directory),
            "myhostname": "postfix.bench.test",
            "mydomain": "bench.test",
            "myorigin": "$mydomain",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "local_transport": "error:local delivery is disabled",
            "alias_maps": "",
            "alias_database": "",
            "relayhost": f"[127.0.0.1]:{self.relay_port}",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_peername_lookup": "no",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "default_destination_concurrency_limit": str(self.concurrency),
            "smtp_destination_concurrency_limit": str(self.concurrency),
            "default_process_limit": "200",
            "message_size_limit": str(50 << 20),
            "biff": "no",
        }

    def __enter__(self) -> PostfixRelay:
        self.config_dir.mkdir()
        (self.config_dir / "main.cf").write_text("")
        (self.config_dir / "master.cf").write_text(_MASTER_CF.format(port=self.port))
        settings = [f"{key}={value}" for key, value in self._settings().items()]
        subprocess.run([POSTCONF, "-c", str(self.config_dir), "-e", *settings], check=True)
        self.queue_dir.mkdir()
        try:
            for command in ("check", "start"):
                subprocess.run([POSTFIX, "-c", str(self.config_dir), command], check=True, capture_output=True)
            self.pid = self._master_pid(timeout=10.0)
            wait_for_port(self.port, 20.0)
        except (subprocess.CalledProcessError, RuntimeError) as error:
            log = self.log_text()
            self.__exit__(None, None, None)
            raise RuntimeError(f"postfix did not start: {error}\n{log}") from None
        return self

    def _master_pid(self, timeout: float) -> int:
        pid_file = self.queue_dir / "pid" / "master.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = pid_file.read_text().strip() if pid_file.exists() else ""
            if text.isdigit():
                return int(text)
            time.sleep(0.05)
        raise RuntimeError(f"no {pid_file} after {timeout:.0f}s")

    def log_text(self) -> str:
        path = self.directory / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def __exit__(self, *exc: object) -> None:
        subprocess.run([POSTFIX, "-c", str(self.config_dir), "stop"], capture_output=True)
        deadline = time.monotonic() + 15.0
        while self.pid and Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.directory, ignore_errors=True)
