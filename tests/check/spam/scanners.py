"""Real SpamAssassin (spamd) and rspamd daemons on loopback for the scanner tests.

Both are Debian packages (``spamd``, ``rspamd``); a test that needs one skips with
the reason when it is not installed or does not start.  Neither may reach the
network: spamd runs with ``-L`` (local tests only); rspamd gets a minimal
configuration with no modules that fetch maps, a DNS server on a closed loopback
port, and a tiny TLD list (compiling the full one takes 20 s).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

STARTUP = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(proc: subprocess.Popen[bytes], port: int, log: Path) -> str | None:
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode}: {log.read_text(errors='replace')[-300:]}"
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return None
        except OSError:
            time.sleep(0.1)
    return f"not listening after {STARTUP:g}s"


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


class Daemon:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _user_args(flag_user: str, flag_group: str | None) -> list[str]:
    if os.geteuid() != 0:
        return []
    args = [flag_user, "nobody"]
    if flag_group:
        args += [flag_group, "nogroup"]
    return args


def start_spamd(workdir: Path) -> Daemon | str:
    """spamd on a loopback port, or the reason it cannot run."""
    exe = shutil.which("spamd") or ("/usr/sbin/spamd" if Path("/usr/sbin/spamd").exists()
                                    else None)
    if exe is None:
        return "spamd is not installed (apt-get install spamd spamassassin)"
    port = free_port()
    log = workdir / "spamd.log"
    cmd = [exe, "-L", "-x", "--listen", f"127.0.0.1:{port}", "--max-children", "1",
           "--min-children", "1", "--syslog", "stderr", *_user_args("-u", None)]
    proc = _spawn(cmd, log)
    problem = _wait(proc, port, log)
    if problem:
        Daemon(proc, port).stop()
        return f"spamd did not start: {problem}"
    return Daemon(proc, port)


RSPAMD_CONF = """\
lua = "$RULESDIR/rspamd.lua";
.include "$CONFDIR/metrics.conf"
.include "$CONFDIR/actions.conf"
.include "$CONFDIR/groups.conf"
options {{
  filters = "regexp";
  dns {{ nameserver = ["127.0.0.1:{dead_port}"]; timeout = 0.2s; retransmits = 1; }}
  cache_file = "{dir}/symbols.cache";
  dynamic_conf = "{dir}/dynamic";
  history_file = "{dir}/history";
  stats_file = "{dir}/stats.ucl";
  hs_cache_dir = "{dir}/";
  url_tld = "{dir}/tld.dat";
  tempdir = "{dir}";
  local_addrs = [];
}}
logging {{ type = "console"; level = "error"; }}
worker "normal" {{ bind_socket = "127.0.0.1:{port}"; count = 1; mime = true; }}
"""


def start_rspamd(workdir: Path) -> Daemon | str:
    exe = shutil.which("rspamd")
    if exe is None:
        return "rspamd is not installed (apt-get install rspamd)"
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o777)  # rspamd drops privileges to nobody
    port, dead_port = free_port(), free_port()
    (workdir / "tld.dat").write_text("com\norg\nnet\nexample\n")
    conf = workdir / "rspamd.conf"
    conf.write_text(RSPAMD_CONF.format(dir=workdir, port=port, dead_port=dead_port))
    log = workdir / "rspamd.log"
    cmd = [exe, "-f", "-c", str(conf), *_user_args("-u", "-g")]
    proc = _spawn(cmd, log)
    problem = _wait(proc, port, log)
    if problem:
        Daemon(proc, port).stop()
        return f"rspamd did not start: {problem}"
    return Daemon(proc, port)
