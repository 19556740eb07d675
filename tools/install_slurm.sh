#!/usr/bin/env bash
# Installs Debian's Slurm and munge so tests/test_slurm.py can start a one-node cluster on localhost.
#   sudo bash tools/install_slurm.sh
# Nothing is configured or started here: the tests write their own slurm.conf and munge key in a
# temporary directory and run the daemons on private ports, so a system Slurm is left alone.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge)
commands=(slurmctld slurmd sbatch squeue sacct scontrol scancel munged mungekey)

missing=0
for cmd in "${commands[@]}"; do
    if ! command -v "$cmd" >/dev/null 2>&1 && [[ ! -x /usr/sbin/$cmd ]]; then
        missing=1
    fi
done
if [[ $missing -eq 0 ]]; then
    echo "install_slurm.sh: Slurm and munge are already installed"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "install_slurm.sh: installing ${packages[*]} needs root; run it with sudo" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
install=(apt-get install -y --no-install-recommends "${packages[@]}")
# A fresh machine may have no package lists yet (or stale ones): update once, then retry.
if ! "${install[@]}"; then
    apt-get update
    "${install[@]}"
fi
echo "install_slurm.sh: installed ${packages[*]}"
