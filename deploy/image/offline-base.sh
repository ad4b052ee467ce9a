#!/usr/bin/env bash
# Build an offline stand-in for python:3.11-slim from a Debian mirror (no container registry needed):
# debootstrap a minimal bookworm with Python 3.11, then import it as a local image with buildah.
#
#   deploy/image/offline-base.sh [IMAGE] [MIRROR]
#
# IMAGE defaults to localhost/malaria-base:bookworm; MIRROR defaults to the first Debian mirror in
# this machine's apt sources (else deb.debian.org). Needs root, debootstrap and buildah.
set -euo pipefail

image="${1:-localhost/malaria-base:bookworm}"
mirror="${2:-${DEBIAN_MIRROR:-}}"
if [[ -z "$mirror" ]]; then
    mirror="$(grep -rhE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
        | grep -oE 'https?://[^ ]+/debian/?( |$)' | tr -d ' ' | head -n1 || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"
work="$(mktemp -d "${TMPDIR:-/tmp}/malaria-base.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$work/rootfs" "$mirror"

# Behave like python:3.11-slim: pip may install into the system interpreter (PEP 668 marker removed),
# `python` exists, and no apt lists or caches are shipped.
rm -f "$work"/rootfs/usr/lib/python3.*/EXTERNALLY-MANAGED
ln -sf python3 "$work/rootfs/usr/bin/python"
rm -rf "$work"/rootfs/var/lib/apt/lists/* "$work"/rootfs/var/cache/apt/*.bin "$work"/rootfs/var/cache/apt/archives/*.deb

tar --numeric-owner -C "$work/rootfs" -cf "$work/rootfs.tar" .
printf 'FROM scratch\nADD rootfs.tar /\nENV LANG=C.UTF-8\nCMD ["python3"]\n' > "$work/Containerfile"
buildah build --layers=false --force-rm -t "$image" -f "$work/Containerfile" "$work"
echo "built $image"
