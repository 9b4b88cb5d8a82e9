"""A second Python on this machine, to show that results do not depend on the interpreter.

The standard library's email parsers differ between patch releases (CVE-2023-27043 made
``getaddresses`` strict in some, and Debian 12's 3.11.2 carries that backport): a test
runs the same probe under this interpreter and another one and compares the results.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def other_interpreter() -> str | None:
    """A Python >= 3.11 other than this one (Debian's /usr/bin/python3 next to a pyenv
    build, or the other way round); None when the machine has only one."""
    here = os.path.realpath(sys.executable)
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3"),
                 *sorted(_pyenv_pythons())):
        if not cand or not os.path.exists(cand):
            continue
        real = os.path.realpath(cand)
        if real == here:
            continue
        ok = subprocess.run([real, "-c", "import sys; sys.exit(sys.version_info < (3, 11))"],
                            capture_output=True).returncode == 0
        same = subprocess.run(
            [real, "-c", "import sys; print(sys.version)"], capture_output=True, text=True
        ).stdout.strip() == sys.version
        if ok and not same:
            return real
    return None


def _pyenv_pythons() -> list[str]:
    """pyenv's builds (the venv may be made from Debian's python3 with pyenv's shim
    first on PATH pointing back at it)."""
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    versions = os.path.join(root, "versions")
    if not os.path.isdir(versions):
        return []
    return [os.path.join(versions, v, "bin", "python3") for v in os.listdir(versions)]
