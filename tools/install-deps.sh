#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine: kernel-peer tools from apt, the
# project with its test extra from PyPI into the virtual environment .venv (Debian 12's python3 is
# "externally managed", PEP 668: pip installs only into a venv).  Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PACKAGES=(erofs-utils fsverity attr podman skopeo runc crun uidmap busybox-static util-linux kmod gcc python3-dev python3-venv groff-base)
APT_PACKAGES+=(docker-registry apache2-utils openssl)  # registry tests: a real registry, htpasswd, a TLS cert
APT_PACKAGES+=(strace)  # test_objects_store: counts the bulk helpers' syscalls per object
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
modprobe erofs 2>/dev/null || true
modprobe overlay 2>/dev/null || true
modprobe loop 2>/dev/null || true
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' ruff
