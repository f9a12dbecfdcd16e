#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine: kernel-peer tools from apt, the
# project with its test extra from PyPI.  Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PACKAGES=(erofs-utils fsverity attr podman skopeo runc crun uidmap busybox-static util-linux kmod gcc python3-dev)
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
python3 -m pip install -q --disable-pip-version-check -e '.[test]' ruff
