#!/usr/bin/env bash
# Bring a fresh Debian 12 machine (run as root) to the state the demo and the test suite need:
#   1. the Debian packages in DEB_PACKAGES (apt work is skipped when all are installed already);
#   2. no system Orthanc left running (the Debian package may start one on 4242/8042 when installed);
#   3. a virtualenv in $VENV_DIR with this project installed editable, with its test, dev and fast extras
#      (the product's packages only; devkit, tunnel_demo and tunnel_bench run from the checkout);
#   4. the packaging tests' npm validator (@kubernetes-models/prometheus-operator) in $VENV_DIR/npm.
# Idempotent: a repeat run checks and does nothing (about a second).
# Environment: PYTHON (default python3, must be >= 3.11), VENV_DIR (default .venv),
#              BOOTSTRAP_FORCE_PIP=1 to reinstall the project into the venv.
# Opt-in extras (used by `make bench`, never by `make test`):
#              BOOTSTRAP_EXTRA_DEBS="openssh-server stunnel4"  more Debian packages;
#              BOOTSTRAP_EXTRA_PIP="matplotlib"                more PyPI packages in the venv.
# An sshd service that the extra install itself started is stopped and disabled again: the benchmark
# runs its own sshd on 127.0.0.1, and a machine that had no SSH server keeps having none listening.
set -euo pipefail

# The one list of Debian packages the project needs.
DEB_PACKAGES=(dcmtk orthanc iproute2 procps squid chromium wireguard-tools wireguard-go nftables postgresql)
# The packaging tests (tests/test_packaging_*.py, docs/packaging.md): a load balancer run as a plain process,
# the OCI image build (debootstrap, buildah) and run (podman and its runtime pieces), node for a validator.
DEB_PACKAGES+=(haproxy debootstrap buildah podman crun runc uidmap fuse-overlayfs slirp4netns conmon netavark nodejs)

ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT_DIR"
PYTHON="${PYTHON:-python3}"
VENV_DIR="${VENV_DIR:-.venv}"
STAMP="$VENV_DIR/.bootstrap-stamp"

log() { echo "bootstrap: $*" >&2; }
die() { echo "bootstrap: error: $*" >&2; exit 1; }

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

install_debian_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        is_installed "$pkg" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "missing Debian packages (${missing[*]}); run this script as root"
    log "installing Debian packages: ${missing[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

orthanc_daemon_pid() {
    # The PID of the packaged Orthanc daemon, from the init script's pidfile, if it is alive.
    local pidfile=/run/orthanc.pid pid
    [ -s "$pidfile" ] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = /usr/sbin/Orthanc ] || return 1
    echo "$pid"
}

stop_pid() {
    # SIGTERM one PID, wait up to 10 s, then SIGKILL it.
    local pid="$1" i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

quiet_orthanc_service() {
    # Tests start their own Orthanc on free ports; the system one must neither run nor start at boot.
    is_installed orthanc || return 0
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        if systemctl is-active --quiet orthanc 2>/dev/null; then
            log "stopping the system Orthanc service"
            systemctl stop orthanc
        fi
        if systemctl is-enabled --quiet orthanc 2>/dev/null; then
            log "disabling the system Orthanc service"
            systemctl disable orthanc >/dev/null 2>&1 || log "warning: systemctl disable orthanc failed"
        fi
    elif compgen -G '/etc/rc[2-5].d/S*orthanc' >/dev/null && command -v update-rc.d >/dev/null 2>&1; then
        log "disabling the orthanc init script"
        update-rc.d orthanc disable >/dev/null 2>&1 || log "warning: update-rc.d orthanc disable failed"
    fi
    # No init system (containers), or one that lost track of it: stop it by its pidfile.
    local pid
    if pid="$(orthanc_daemon_pid)"; then
        log "stopping the system Orthanc daemon (pid $pid)"
        if [ -x /etc/init.d/orthanc ]; then
            /etc/init.d/orthanc stop >/dev/null 2>&1 || true
        fi
        if pid="$(orthanc_daemon_pid)"; then
            stop_pid "$pid"
        fi
    fi
}

check_python() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found; Python >= 3.11 is required (set PYTHON=...)"
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
        || die "$("$PYTHON" --version 2>&1) is too old: Python >= 3.11 is required (set PYTHON=...)"
    if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        # Debian's own python3 keeps venv/ensurepip in a separate package.
        install_debian_packages python3-venv
    fi
}

venv_is_usable() {
    [ -x "$VENV_DIR/bin/python" ] \
        && "$VENV_DIR/bin/python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null
}

project_fingerprint() {
    # What an editable install depends on: pyproject.toml and the set of top-level packages
    # (setuptools maps the packages it found at install time; a new package needs a reinstall).
    {
        cat pyproject.toml
        ls -d ./*/__init__.py 2>/dev/null || true
    } | sha256sum | cut -d' ' -f1
}

ensure_venv() {
    check_python
    if ! venv_is_usable; then
        log "creating virtualenv $VENV_DIR with $("$PYTHON" --version 2>&1)"
        "$PYTHON" -m venv --clear "$VENV_DIR"
    fi
    local want
    want="$(project_fingerprint)"
    if [ "${BOOTSTRAP_FORCE_PIP:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
        && "$VENV_DIR/bin/python" -c 'import importlib.metadata as m; m.version("dicom-tunnel")' 2>/dev/null; then
        return 0
    fi
    log "installing the project into $VENV_DIR (pip install -e '.[test,dev,fast]')"
    "$VENV_DIR/bin/python" -m pip install --quiet -e '.[test,dev,fast]'
    echo "$want" >"$STAMP"
}

install_extra_debian_packages() {
    local extra=()
    read -r -a extra <<<"${BOOTSTRAP_EXTRA_DEBS:-}"
    [ "${#extra[@]}" -gt 0 ] || return 0
    local had_sshd=1
    is_installed openssh-server || had_sshd=0
    install_debian_packages "${extra[@]}"
    if [ "$had_sshd" -eq 0 ] && is_installed openssh-server; then
        quiet_new_ssh_service
    fi
}

quiet_new_ssh_service() {
    # Only called right after this script installed openssh-server: undo the package's auto-start.
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        if systemctl is-active --quiet ssh 2>/dev/null; then
            log "stopping the ssh service that installing openssh-server started"
            systemctl stop ssh ssh.socket 2>/dev/null || true
        fi
        systemctl disable ssh ssh.socket >/dev/null 2>&1 || true
    elif [ -x /etc/init.d/ssh ] && [ -s /run/sshd.pid ]; then
        log "stopping the sshd that installing openssh-server started"
        /etc/init.d/ssh stop >/dev/null 2>&1 || true
    fi
}

quiet_new_squid_service() {
    # Only called right after this script installed squid: the proxy tests run their own squid on a free
    # port, and a machine that had no proxy keeps having none listening on 3128 or starting at boot.
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        if systemctl is-active --quiet squid 2>/dev/null; then
            log "stopping the squid service that installing squid started"
            systemctl stop squid 2>/dev/null || log "warning: systemctl stop squid failed"
        fi
        systemctl disable squid >/dev/null 2>&1 || true
        return 0
    fi
    if compgen -G '/etc/rc[2-5].d/S*squid' >/dev/null && command -v update-rc.d >/dev/null 2>&1; then
        update-rc.d squid disable >/dev/null 2>&1 || log "warning: update-rc.d squid disable failed"
    fi
    if [ -x /etc/init.d/squid ] && [ -s /run/squid.pid ]; then
        log "stopping the squid that installing squid started"
        /etc/init.d/squid stop >/dev/null 2>&1 || true
    fi
}

quiet_new_haproxy_service() {
    # Only called right after this script installed haproxy: the packaging tests run their own on free
    # ports, and a machine that had no balancer keeps having none listening on 80 or starting at boot.
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        systemctl stop haproxy 2>/dev/null || true
        systemctl disable haproxy >/dev/null 2>&1 || true
        return 0
    fi
    if compgen -G '/etc/rc[2-5].d/S*haproxy' >/dev/null && command -v update-rc.d >/dev/null 2>&1; then
        update-rc.d haproxy disable >/dev/null 2>&1 || log "warning: update-rc.d haproxy disable failed"
    fi
    if [ -x /etc/init.d/haproxy ] && [ -s /run/haproxy.pid ]; then
        /etc/init.d/haproxy stop >/dev/null 2>&1 || true
    fi
}

ensure_npm_validators() {
    # The ServiceMonitor's schema (the Prometheus Operator's CRD) for tests/test_packaging_kubernetes.py, in
    # $VENV_DIR/npm (inside the ignored virtualenv: nothing npm writes lands in the checkout).
    local dir="$VENV_DIR/npm" package="@kubernetes-models/prometheus-operator" version=6.0.0
    if [ -f "$dir/node_modules/$package/package.json" ] && grep -q "\"version\": \"$version\"" \
        "$dir/node_modules/$package/package.json"; then
        return 0
    fi
    command -v npm >/dev/null 2>&1 || die "npm not found (Debian package nodejs)"
    log "installing $package@$version into $dir"
    mkdir -p "$dir"
    npm install --prefix "$dir" --no-audit --no-fund --silent "$package@$version"
}

ensure_extra_pip() {
    local extra=() missing=() pkg
    read -r -a extra <<<"${BOOTSTRAP_EXTRA_PIP:-}"
    for pkg in "${extra[@]}"; do
        "$VENV_DIR/bin/python" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$pkg" \
            2>/dev/null || missing+=("$pkg")
    done
    [ "${#missing[@]}" -gt 0 ] || return 0
    log "installing into $VENV_DIR: ${missing[*]}"
    "$VENV_DIR/bin/python" -m pip install --quiet "${missing[@]}"
}

ensure_mitm_venv() {
    # mitmproxy (the TLS-interception tests' DLP box) in a venv of its own: it pins versions of libraries
    # the project also uses. BOOTSTRAP_MITM=0 skips it; MITM_VENV (default build/mitm-venv) moves it.
    [ "${BOOTSTRAP_MITM:-1}" = 1 ] || return 0
    local dir="${MITM_VENV:-build/mitm-venv}" version=11.0.2
    if [ -x "$dir/bin/mitmdump" ] && "$dir/bin/python" -c \
        'import importlib.metadata as m, sys; sys.exit(m.version("mitmproxy") != sys.argv[1])' "$version" 2>/dev/null; then
        return 0
    fi
    log "installing mitmproxy $version into its own virtualenv $dir"
    "$PYTHON" -m venv --clear "$dir"
    "$dir/bin/python" -m pip install --quiet "mitmproxy==$version"
}

main() {
    local had_squid=1 had_haproxy=1
    is_installed squid || had_squid=0
    is_installed haproxy || had_haproxy=0
    install_debian_packages "${DEB_PACKAGES[@]}"
    if [ "$had_squid" -eq 0 ] && is_installed squid; then
        quiet_new_squid_service
    fi
    if [ "$had_haproxy" -eq 0 ] && is_installed haproxy; then
        quiet_new_haproxy_service
    fi
    install_extra_debian_packages
    quiet_orthanc_service
    ensure_venv
    ensure_extra_pip
    ensure_npm_validators
    ensure_mitm_venv
}

main "$@"
