"""A private OpenLDAP server (Debian's slapd) on loopback for the upstream-LDAP tests.

Configured from a slapd.conf in a temporary folder (an mdb database under it, no system
instance, no root DN password on disk beyond the test), seeded with slapadd, stopped by
the PID it wrote.  Passwords are stored as {SSHA} hashes made with slappasswd, as a real
directory would hold them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from imap_helpers import free_port

SUFFIX = "dc=corp,dc=example"
ADMIN_DN = f"cn=admin,{SUFFIX}"
ADMIN_PW = "admin-secret"


def available() -> str | None:
    """None when slapd and its tools are installed, else what is missing."""
    for tool in ("slapd", "slapadd", "slappasswd"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} (Debian packages slapd, ldap-utils; see scripts/setup.sh)"
    return None


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class Slapd:
    root: Path
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def pause(self) -> None:
        """Stop answering (SIGSTOP): connections hang as behind a dead network."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)


def start(root: Path, people: dict[str, str]) -> Slapd:
    """slapd on 127.0.0.1 with ou=people holding ``people`` (uid -> password)."""
    root.mkdir(parents=True, exist_ok=True)
    db = root / "db"
    db.mkdir()
    conf = root / "slapd.conf"
    rootpw = subprocess.run([_tool("slappasswd"), "-s", ADMIN_PW], capture_output=True,
                            check=True, text=True).stdout.strip()
    conf.write_text(f"""include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {root}/slapd.pid
database mdb
maxsize 10485760
suffix "{SUFFIX}"
rootdn "{ADMIN_DN}"
rootpw {rootpw}
directory {db}
access to attrs=userPassword by self read by anonymous auth by * none
access to * by * read
""")
    entries = [f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: corp\n"
               "o: Corp\n",
               f"dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n"]
    for uid, pw in people.items():
        hashed = subprocess.run([_tool("slappasswd"), "-s", pw], capture_output=True,
                                check=True, text=True).stdout.strip()
        entries.append(f"dn: uid={uid},ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\n"
                       f"uid: {uid}\ncn: {uid}\nsn: {uid}\nmail: {uid}@corp.example\n"
                       f"userPassword: {hashed}\n")
    ldif = root / "seed.ldif"
    ldif.write_text("\n".join(entries))
    subprocess.run([_tool("slapadd"), "-f", str(conf), "-l", str(ldif)], check=True,
                   capture_output=True)
    port = free_port()
    # -d 0: stay in the foreground (our child, stopped by its PID), log nothing.
    with open(root / "slapd.log", "wb") as log:
        proc = subprocess.Popen([_tool("slapd"), "-f", str(conf), "-h",
                                 f"ldap://127.0.0.1:{port}/", "-d", "0"],
                                stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log_text = (root / "slapd.log").read_text(errors="replace")
            raise RuntimeError(f"slapd exited: {log_text}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return Slapd(root, port, proc)
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("slapd did not listen")
