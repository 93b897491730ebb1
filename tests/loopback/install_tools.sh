#!/usr/bin/env bash
# Install what tests/loopback/loopback_ssh.py (and tests/test_hostfile_*.py) need, once, as root:
# openssh-server, openssh-client and pdsh from apt, and sshd's privilege-separation folder
# /run/sshd (a tmpfs folder: run this again after a reboot).
#
#   sudo tests/loopback/install_tools.sh
#
# The tests never install anything or touch system files; without these tools they are
# skipped with the reason. openssh-server's postinst would start the system sshd on port 22:
# a temporary /usr/sbin/policy-rc.d ("exit 101") stops that, and is removed again afterwards
# unless one was there before.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root (apt-get install, /run/sshd)" >&2; exit 2; }
command -v apt-get >/dev/null || { echo "no apt-get: install an OpenSSH server and client and pdsh by hand" >&2; exit 2; }
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod 755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
install=(apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 openssh-server openssh-client pdsh)
"${install[@]}" || { apt-get update -q && "${install[@]}"; }
mkdir -p -m 755 /run/sshd
echo "installed: $(command -v sshd || echo /usr/sbin/sshd) $(command -v pdsh) $(command -v ssh)"
