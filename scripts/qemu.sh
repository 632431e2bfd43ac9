#!/usr/bin/env bash
# Provide the QEMU binaries qtest-virtio is tested against, each in a cache, nothing from outside the
# project but Debian's registry. Safe to run again: a binary already in the cache is reused.
#
#   bash scripts/qemu.sh provide NAME...   # make NAME available; prints "NAME PATH" per binary
#   bash scripts/qemu.sh path NAME         # the binary's path (provides it first when missing)
#   bash scripts/qemu.sh path --cached NAME  # the path only when it is already there, else exit 3
#   bash scripts/qemu.sh list              # the names, and which are in the cache
#   bash scripts/qemu.sh version NAME      # the upstream version a source build NAME is (e.g. 10.2.2)
#
# NAMEs:
#   system      Debian's qemu-system-x86 of this release (7.2 on bookworm), installed with apt-get
#   debian-10.0 Debian's 10.0 backport, unpacked beside the system QEMU (never installed over it)
#   src-10.0.2  upstream 10.0.2 built from Debian's orig tarball (qtest accelerator included)
#   src-newest  the newest upstream the registry serves, built the same way (see NEWEST below)
#   gcov-10.0.2 the 10.0.2 source build with --enable-gcov (for coverage)
#
# The cache is $QTEST_VIRTIO_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/qtest-virtio). Facts and traps:
# ../shared/virtio-facts.md, "More than one QEMU".
set -euo pipefail

# The newest upstream release the registry serves, as "<debian version> <suite>": moving to the next
# release is this one line.
NEWEST="1:10.2.2+ds-1 sid"
SRC_10_0_2="1:10.0.2+ds-2+deb13u1~bpo12+1 bookworm-backports"
BACKPORT_SUITE="bookworm-backports"
BACKPORT_PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data qemu-system-gui
    qemu-system-modules-opengl qemu-system-modules-spice qemu-block-extra)
BUILD_DEPS=(ninja-build libglib2.0-dev libpixman-1-dev flex bison python3-venv pkg-config libfdt-dev
    zlib1g-dev device-tree-compiler xz-utils seabios ipxe-qemu dpkg-dev)

CACHE="${QTEST_VIRTIO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qtest-virtio}"
SOURCES_FILE=/etc/apt/sources.list.d/qtest-virtio.sources

die() { echo "qemu.sh: $*" >&2; exit 1; }
log() { echo "qemu.sh: $*" >&2; }

as_root() {
    if [ "$EUID" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
        die "need root for: $* (run as root or install sudo)"
    fi
}

apt_updated=0
apt_update() {
    [ "$apt_updated" -eq 1 ] && return 0
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
    apt_updated=1
}

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing ${missing[*]} (apt-get)"
    apt_update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
}

# Debian's backports (binaries and sources) and sid's sources (only deb-src: no sid binary ever gets
# installed). One file of ours, rewritten only when it changes.
ensure_sources() {
    local want
    want=$(cat <<'EOF'
# written by qtest-virtio scripts/qemu.sh: the 10.0 backport and upstream orig tarballs
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
)
    if [ ! -f "$SOURCES_FILE" ] || [ "$(cat "$SOURCES_FILE")" != "$want" ]; then
        printf '%s\n' "$want" | as_root tee "$SOURCES_FILE" >/dev/null
        apt_updated=0
    fi
    # An apt list that predates our sources knows no backports: update once.
    if ! apt-cache policy qemu-system-x86 2>/dev/null | grep -q bookworm-backports; then
        apt_update
    fi
}

provide_system() {
    if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
        apt_install qemu-system-x86
    fi
    command -v qemu-system-x86_64 || die "qemu-system-x86 installed but qemu-system-x86_64 is not on PATH"
}

# Debian's 10.0 backport: its packages unpacked into one prefix, run through a wrapper that points
# QEMU at its own modules and firmware (else it loads 7.2's modules and aborts at start).
provide_debian_10_0() {
    local dir="$CACHE/debian-10.0" bin
    bin="$dir/bin/qemu-system-x86_64"
    if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then echo "$bin"; return 0; fi
    ensure_sources
    # Its modules link against libraries the system QEMU brings; pipewire silences a module warning.
    apt_install qemu-system-x86 libpipewire-0.3-0
    rm -rf "$dir.tmp"
    mkdir -p "$dir.tmp/debs" "$dir.tmp/prefix/bin"
    local specs=()
    for pkg in "${BACKPORT_PACKAGES[@]}"; do specs+=("$pkg/$BACKPORT_SUITE"); done
    (cd "$dir.tmp/debs" && apt-get download -qq "${specs[@]}" 2>&1 >/dev/null | grep -v "unsandboxed" >&2; exit "${PIPESTATUS[0]}") \
        || die "apt-get download of the $BACKPORT_SUITE QEMU packages failed (is $SOURCES_FILE there?)"
    for deb in "$dir.tmp"/debs/*.deb; do dpkg-deb -x "$deb" "$dir.tmp/prefix"; done
    local prefix="$dir/prefix"
    cat >"$dir.tmp/prefix/bin/qemu-system-x86_64" <<EOF
#!/bin/sh
# Debian's $BACKPORT_SUITE QEMU, unpacked by qtest-virtio scripts/qemu.sh (not installed).
QEMU_MODULE_DIR="$prefix/usr/lib/x86_64-linux-gnu/qemu"
export QEMU_MODULE_DIR
exec "$prefix/usr/bin/qemu-system-x86_64" -L "$prefix/usr/share/qemu" "\$@"
EOF
    chmod +x "$dir.tmp/prefix/bin/qemu-system-x86_64"
    rm -rf "$dir"
    mkdir -p "$dir"
    mv "$dir.tmp/prefix" "$dir/prefix"
    rm -rf "$dir.tmp"
    mkdir -p "$dir/bin"
    ln -sf "$prefix/bin/qemu-system-x86_64" "$bin"
    "$bin" --version >/dev/null || die "the unpacked 10.0 backport does not start: $bin --version failed"
    echo "$bin"
}

# An upstream tree from Debian's orig tarball, configured for x86_64 only and built with ninja.
#   $1 name in the cache, $2 the Debian source version, $3 extra configure options
provide_source() {
    local name="$1" debver="$2" extra="${3:-}"
    local dir="$CACHE/$name" upver
    upver=$(upstream_of "$debver")
    local bin="$dir/build/qemu-system-x86_64"
    if [ -x "$bin" ] && [ -f "$dir/.built" ] && "$bin" --version >/dev/null 2>&1; then echo "$bin"; return 0; fi
    apt_install "${BUILD_DEPS[@]}" qemu-system-x86
    local tarball
    tarball=$(fetch_orig "$debver")
    rm -rf "$dir"
    mkdir -p "$dir"
    log "$name: unpacking $(basename "$tarball")"
    tar -xJf "$tarball" -C "$dir" --strip-components=1
    # The orig tarball has no EDK2 blobs: never unpack them.
    sed -i "s/^if unpack_edk2_blobs\$/if false/" "$dir/pc-bios/meson.build"
    grep -q "^if false\$" "$dir/pc-bios/meson.build" \
        || die "$name: pc-bios/meson.build has no 'if unpack_edk2_blobs' line to turn off"
    # Meson >= 1.5 and pycotap, which configure only looks for offline, in a venv of our own.
    local venv="$CACHE/build-venv"
    if [ ! -x "$venv/bin/meson" ] || ! "$venv/bin/python3" -c 'import pycotap' 2>/dev/null; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check 'meson>=1.5,<2' 'pycotap==1.3.1' \
            || die "pip install meson pycotap failed"
    fi
    log "$name: configuring QEMU $upver"
    mkdir -p "$dir/build"
    # shellcheck disable=SC2086
    (cd "$dir/build" && PATH="$venv/bin:$PATH" ../configure --python="$venv/bin/python3" \
        --target-list=x86_64-softmmu --disable-docs --without-default-features --disable-werror \
        --disable-install-blobs $extra >"$dir/configure.log" 2>&1) \
        || die "$name: configure failed; see $dir/configure.log"
    log "$name: building qemu-system-x86_64 (5-7 minutes on 2 cores)"
    (cd "$dir/build" && PATH="$venv/bin:$PATH" ninja qemu-system-x86_64 >"$dir/build.log" 2>&1) \
        || die "$name: build failed; see $dir/build.log"
    link_firmware "$dir/build/qemu-bundle/usr/local/share/qemu"
    "$bin" --version >/dev/null || die "$name: the built binary does not start"
    touch "$dir/.built"
    echo "$bin"
}

# The orig tarball of a Debian source version: apt-get source --download-only (the Debian diff may
# 404; the orig tarball is all we need). Kept in the cache.
fetch_orig() {
    local debver="$1" upver
    upver=$(upstream_of "$debver")
    local want="$CACHE/src/qemu_${upver}+ds.orig.tar.xz"
    if [ -s "$want" ]; then echo "$want"; return 0; fi
    ensure_sources
    mkdir -p "$CACHE/src/dl"
    log "downloading qemu $debver sources (orig tarball)"
    (cd "$CACHE/src/dl" && apt-get source -qq --download-only "qemu=$debver" >/dev/null 2>&1) || true
    [ -s "$CACHE/src/dl/qemu_${upver}+ds.orig.tar.xz" ] \
        || die "no orig tarball for qemu=$debver from the registry (apt-get source --download-only qemu=$debver)"
    mv "$CACHE/src/dl/qemu_${upver}+ds.orig.tar.xz" "$want"
    rm -rf "$CACHE/src/dl"
    echo "$want"
}

# A build tree looks for firmware under qemu-bundle: give it Debian's SeaBIOS, iPXE and option ROMs.
link_firmware() {
    local fw="$1"
    mkdir -p "$fw"
    local f
    for f in /usr/share/seabios/*.bin /usr/lib/ipxe/qemu/*.rom /usr/share/qemu/*.bin /usr/share/qemu/*.rom; do
        [ -e "$f" ] || continue
        [ -e "$fw/$(basename "$f")" ] || ln -s "$(readlink -f "$f")" "$fw/$(basename "$f")"
    done
}

# 1:10.2.2+ds-1 -> 10.2.2
upstream_of() { local v="${1#*:}"; echo "${v%%+*}"; }

provide() {
    case "$1" in
        system) provide_system ;;
        debian-10.0) provide_debian_10_0 ;;
        src-10.0.2) provide_source src-10.0.2 "${SRC_10_0_2% *}" ;;
        src-newest) provide_source "src-$(upstream_of "${NEWEST% *}")" "${NEWEST% *}" ;;
        gcov-10.0.2) provide_source gcov-10.0.2 "${SRC_10_0_2% *}" --enable-gcov ;;
        *) die "unknown QEMU name '$1'; known: $(names)" ;;
    esac
}

# Where NAME lives once provided (the system QEMU: on PATH).
location() {
    case "$1" in
        system) command -v qemu-system-x86_64 || echo "/usr/bin/qemu-system-x86_64" ;;
        debian-10.0) echo "$CACHE/debian-10.0/bin/qemu-system-x86_64" ;;
        src-10.0.2) echo "$CACHE/src-10.0.2/build/qemu-system-x86_64" ;;
        src-newest) echo "$CACHE/src-$(upstream_of "${NEWEST% *}")/build/qemu-system-x86_64" ;;
        gcov-10.0.2) echo "$CACHE/gcov-10.0.2/build/qemu-system-x86_64" ;;
        *) die "unknown QEMU name '$1'; known: $(names)" ;;
    esac
}

names() { echo "system debian-10.0 src-10.0.2 src-newest gcov-10.0.2"; }

cmd="${1:-}"
shift || true
case "$cmd" in
    provide)
        [ "$#" -gt 0 ] || die "usage: bash scripts/qemu.sh provide NAME... (NAMEs: $(names))"
        for name in "$@"; do
            path=$(provide "$name")
            echo "$name $path"
        done
        ;;
    path)
        if [ "${1:-}" = "--cached" ]; then
            [ "$#" -eq 2 ] || die "usage: bash scripts/qemu.sh path --cached NAME (NAMEs: $(names))"
            bin=$(location "$2")
            if [ -x "$bin" ] && { [ "$2" = system ] || [ "$2" = debian-10.0 ] || [ -f "$(dirname "$(dirname "$bin")")/.built" ]; }; then
                echo "$bin"
                exit 0
            fi
            echo "qemu.sh: QEMU '$2' is not provided yet: run bash scripts/qemu.sh provide $2" >&2
            exit 3
        fi
        [ "$#" -eq 1 ] || die "usage: bash scripts/qemu.sh path NAME (NAMEs: $(names))"
        provide "$1"
        ;;
    version)
        case "${1:-}" in
            src-10.0.2 | gcov-10.0.2) upstream_of "${SRC_10_0_2% *}" ;;
            src-newest) upstream_of "${NEWEST% *}" ;;
            *) die "usage: bash scripts/qemu.sh version src-10.0.2|src-newest|gcov-10.0.2" ;;
        esac
        ;;
    list)
        for name in $(names); do
            bin=$(location "$name")
            if [ -x "$bin" ]; then echo "$name $bin"; else echo "$name (not provided)"; fi
        done
        ;;
    *)
        die "usage: bash scripts/qemu.sh provide NAME... | path NAME | list (NAMEs: $(names))"
        ;;
esac
