#!/usr/bin/env bash
# Set up qtest-virtio on a Debian machine: the QEMU binaries (scripts/qemu.sh: Debian's
# qemu-system-x86, its 10.0 backport, the newest upstream source build, the gcov build of 10.0.2;
# each only when missing),
# then the package with its dev extras, editable. Safe to run again. Works from any directory.
#
#   bash scripts/setup.sh                # set up only
#   bash scripts/setup.sh --run          # set up, then run the main job (qtest-virtio run: the scenario suite)
#   bash scripts/setup.sh --system-only  # only the system QEMU (enough for the main job, not the tests)
set -euo pipefail

usage() { echo "usage: bash scripts/setup.sh [--system-only] [--run [qtest-virtio run arguments...]]" >&2; }

run=0
system_only=0
run_args=()
for arg in "$@"; do
    if [ "$run" -eq 1 ]; then
        run_args+=("$arg")
        continue
    fi
    case "$arg" in
        --run) run=1 ;;
        --system-only) system_only=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "setup.sh: unknown argument: $arg" >&2; usage; exit 2 ;;
    esac
done

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

# The QEMU binaries the tests compare (scripts/qemu.sh; each cached, reused when there): the system
# QEMU, Debian's 10.0 backport unpacked beside it, the newest upstream source build (qtest
# accelerator) and the gcov build of 10.0.2 (the coverage tool's tests). --system-only stops at the system QEMU (enough for the main job).
if [ "$system_only" -eq 1 ]; then
    bash scripts/qemu.sh provide system | sed "s/^/setup.sh: QEMU /"
else
    bash scripts/qemu.sh provide system debian-10.0 src-newest gcov-10.0.2 | sed "s/^/setup.sh: QEMU /"
fi

# apt-get as root: directly when we are root, else through sudo; one clear line when neither works.
apt_install() {
    local sudo=()
    if [ "$EUID" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "setup.sh: need $* but cannot install it: not root and no sudo; as root run: apt-get install -y $*" >&2
            exit 1
        fi
        sudo=(sudo)
    fi
    echo "setup.sh: installing $* (apt-get)"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Debian's own python3 comes without pip and refuses system-wide installs (PEP 668). The quick start
# runs `python3 -m pytest` with that same python3, so the package has to go there.
if ! python3 -m pip --version >/dev/null 2>&1; then
    apt_install python3-pip
fi
if python3 -c 'import sys, sysconfig, os; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
    echo "setup.sh: python3 is externally managed (Debian); installing into it anyway (PIP_BREAK_SYSTEM_PACKAGES=1)"
    export PIP_BREAK_SYSTEM_PACKAGES=1
fi

echo "setup.sh: installing qtest-virtio (editable, with dev extras)"
PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check -e '.[dev]'

if [ "$run" -eq 1 ]; then
    # The main job: the conformance scenario suite against the installed QEMU, with a summary
    # table (device x transport x flags). Extra arguments go to `qtest-virtio run`.
    exec qtest-virtio run "${run_args[@]}"
fi
