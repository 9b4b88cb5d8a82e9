#!/usr/bin/env bash
# Set up everything Coffer and its test suite need on a Debian 12 (bookworm) machine that has
# only Python >= 3.11 and pip: the Debian packages the gateway and the tests drive for real
# (gpg, gpgsm, openssl, swaks, Postfix's smtp-sink/smtp-source, Dovecot, OpenDKIM tools,
# mbsync, offlineimap, sqlite3), then the virtualenv .venv with `pip install -e '.[test]'`.
#
# Idempotent and quick on a re-run: apt is skipped when every package is already installed,
# and pip is skipped while pyproject.toml is unchanged since the last successful install.
#
# Environment:
#   PYTHON               interpreter for the venv (default: the distribution's /usr/bin/python3
#                        when it is 3.11 or newer, else python3 on PATH)
#   COFFER_SKIP_APT=1    do not touch Debian packages (e.g. on a machine you manage yourself)
#   COFFER_FORCE_PIP=1   run pip even when pyproject.toml is unchanged
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# The interpreter.  Debian builds its python3 with profile-guided and link-time optimisation
# and a static libpython; a default source build (pyenv's, for one) has neither and runs
# Coffer's Python code ~15 % slower (bench/policy.py: 10.2 s of CPU against 12.2 s).  So the
# distribution's interpreter is preferred to whatever python3 comes first on PATH.
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    if [ -x /usr/bin/python3 ] \
            && /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        PYTHON=/usr/bin/python3
    fi
fi

# --------------------------------------------------------------------------- Debian packages
# One package a line; add new ones here.  Postfix is only used for its smtp-sink/smtp-source
# tools and as a private reference relay (../shared/peers/postfix-relay): no system instance.
APT_PACKAGES=(
    gnupg
    gpgsm
    openssl
    swaks
    postfix
    dovecot-imapd
    opendkim
    opendkim-tools
    isync
    sqlite3
    postgresql-client
    fonts-dejavu-core
    spamassassin
    spamd
    spamc
    rspamd
    # A private slapd on loopback is the upstream LDAP of the IMAP tests (no system instance).
    slapd
    ldap-utils
)
# Installed when the archive carries them (offlineimap3 is in bookworm, not in every release).
APT_OPTIONAL=(
    offlineimap3
)

is_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# Debian's own python3 needs python3-venv (ensurepip) to create a virtualenv.
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    APT_PACKAGES+=(python3-venv)
fi

can_root() { [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null 2>&1; }

run_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "this step needs root, and sudo is not available: $*"
    fi
}

# A system Postfix/Dovecot started by the package's postinst would listen on ports 25/143:
# Coffer's tests start their own private instances on loopback, so keep the system ones down.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

stop_system_daemons() {
    # Cheap probes first, so a re-run never needs sudo when nothing is running.
    if port_open 25 && command -v postfix >/dev/null 2>&1 \
            && run_root postfix status >/dev/null 2>&1; then
        say "stopping the system Postfix instance on port 25 (Coffer's tests start their own)"
        run_root postfix stop >/dev/null 2>&1 || true
    fi
    if port_open 143 && [ -f /run/dovecot/master.pid ]; then
        say "stopping the system Dovecot instance on port 143 (Coffer's tests start their own)"
        run_root doveadm stop >/dev/null 2>&1 || true
    fi
}

apt_install() {
    # Lock::Timeout: wait for another apt/dpkg run (e.g. unattended-upgrades) to finish.
    run_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends -o DPkg::Lock::Timeout=300 "$@"
}

install_debian_packages() {
    command -v dpkg-query >/dev/null 2>&1 || die "this script expects Debian (dpkg/apt); install ${APT_PACKAGES[*]} yourself and set COFFER_SKIP_APT=1"
    missing=()
    local p
    for p in "${APT_PACKAGES[@]}"; do is_installed "$p" || missing+=("$p"); done
    local optional_missing=()
    for p in "${APT_OPTIONAL[@]}"; do is_installed "$p" || optional_missing+=("$p"); done
    if [ ${#missing[@]} -eq 0 ] && [ ${#optional_missing[@]} -gt 0 ]; then
        # Only optional packages are missing: try them only when this archive has them and we
        # can become root; never fail (or re-run apt every time) for them.
        local known=()
        for p in "${optional_missing[@]}"; do
            apt-cache show "$p" >/dev/null 2>&1 && known+=("$p")
        done
        if [ ${#known[@]} -eq 0 ] || ! can_root; then
            say "note: optional ${optional_missing[*]} not installed; tests that need it will skip"
            optional_missing=()
        else
            optional_missing=("${known[@]}")
        fi
    fi
    if [ ${#missing[@]} -eq 0 ] && [ ${#optional_missing[@]} -eq 0 ]; then
        stop_system_daemons
        return 0
    fi
    local want=("${missing[@]}" "${optional_missing[@]}")
    can_root || die "installing Debian packages (${want[*]}) needs root, and sudo is not available. Run as root:
    apt-get update && apt-get install -y --no-install-recommends ${want[*]}
then run this script again (or set COFFER_SKIP_APT=1 if you installed them another way)."
    say "installing Debian packages: ${want[*]}"

    export DEBIAN_FRONTEND=noninteractive
    # Postfix must not prompt, nor configure itself as a mail server listening on port 25.
    echo "postfix postfix/main_mailer_type select No configuration" | run_root debconf-set-selections
    echo "postfix postfix/mailname string localhost" | run_root debconf-set-selections

    # Keep package scripts from starting daemons (Debian policy-rc.d: exit 101 = "not allowed"),
    # unless the machine already has its own policy.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | run_root tee "$policy" >/dev/null
        run_root chmod 755 "$policy"
        made_policy=1
    fi
    # shellcheck disable=SC2064
    trap "[ $made_policy = 1 ] && run_root rm -f $policy" EXIT

    # `apt-get update` once: only when the lists are absent, or when a package is not found.
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        run_root apt-get update -q
    fi
    local available=() p2
    for p2 in "${optional_missing[@]}"; do
        if apt-cache show "$p2" >/dev/null 2>&1; then available+=("$p2"); fi
    done
    if ! apt_install "${missing[@]}" "${available[@]}"; then
        say "apt-get install failed; refreshing package lists and trying once more"
        run_root apt-get update -q
        available=()
        for p2 in "${optional_missing[@]}"; do
            if apt-cache show "$p2" >/dev/null 2>&1; then available+=("$p2"); fi
        done
        apt_install "${missing[@]}" "${available[@]}"
    fi
    for p2 in "${optional_missing[@]}"; do
        is_installed "$p2" || say "note: optional package $p2 is not available here; tests that need it will skip"
    done
    if [ $made_policy = 1 ]; then run_root rm -f "$policy"; fi
    trap - EXIT
    stop_system_daemons
}

if [ "${COFFER_SKIP_APT:-0}" != 1 ]; then
    install_debian_packages
fi

# --------------------------------------------------------------------------- Python venv
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); Coffer needs Python 3.11 or newer (set PYTHON=...)"

venv="$repo/.venv"
# A venv made from another interpreter than the one chosen above is made again.
want_base=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable))')
have_base=$("$venv/bin/python" -c 'import os, sys; print(os.path.realpath(sys._base_executable))' \
    2>/dev/null || true)
if [ -n "$have_base" ] && [ "$have_base" != "$want_base" ]; then
    say "the virtualenv was made with $have_base; making it again with $want_base"
    have_base=""
fi
if [ -z "$have_base" ]; then
    say "creating virtualenv $venv with $("$PYTHON" -V 2>&1)"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
fi

# Re-install only when pyproject.toml changed (or the package is not importable).
stamp="$venv/.coffer-setup-stamp"
# The pip floor is part of the stamp, so a venv set up before it was raised is set up again.
pip_floor="pip>=23.1"
want_stamp=$( (cat pyproject.toml; echo "$pip_floor") | sha256sum | cut -d' ' -f1)
if [ "${COFFER_FORCE_PIP:-0}" = 1 ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want_stamp" ] \
        || ! "$venv/bin/python" -c 'import gateway' >/dev/null 2>&1; then
    say "installing Coffer and its test dependencies into $venv"
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    # Debian 12's venv brings pip 23.0.1, which installs an sdist without a wheel (pyspf) by
    # the legacy `setup.py install`: no bytecode is written, so the first import compiles
    # spf.py and its invalid escape sequences fail the suite's `-W error`. pip 23.1 and newer
    # always build a wheel, which is installed compiled. --force-reinstall redoes such a
    # legacy install.
    "$venv/bin/python" -m pip install -q --upgrade "$pip_floor"
    "$venv/bin/python" -m pip install -q -e '.[test]'
    purelib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    if compgen -G "$purelib/pyspf-*.egg-info" >/dev/null; then
        "$venv/bin/python" -m pip install -q --force-reinstall --no-deps pyspf
    fi
    printf '%s\n' "$want_stamp" > "$stamp"
fi
say "ready: $venv ($("$venv/bin/python" -V 2>&1))"
