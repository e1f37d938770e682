#!/usr/bin/env bash
# An arm64 Debian root that runs under qemu-user on this x86 host, as a Raspberry Pi (aarch64)
# would run the torch-free validator: python3 + a venv with the `[device]` extra's packages.
# Recipe: shared/notes/pi-emulation.md. Usage: build-root.sh ROOT   (idempotent: ROOT/.ready)
# Needs root, qemu-user-static binfmt-support debootstrap (`make sysdeps`), Debian and PyPI.
set -euo pipefail
ROOT=$1
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
[ -f "$ROOT/.ready" ] && exit 0

# qemu-user runs the arm64 binaries through binfmt_misc.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || { echo "qemu-aarch64 is not registered in binfmt_misc" >&2; exit 1; }

rm -rf "$ROOT.tmp" && mkdir -p "$ROOT.tmp"
debootstrap --arch=arm64 --foreign --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$ROOT.tmp" "$MIRROR" >/dev/null
# debootstrap's second stage under emulation is slow: unpacking the downloaded packages is enough
# to run python3 (no maintainer scripts are needed for that).
for deb in "$ROOT.tmp"/var/cache/apt/archives/*.deb; do
    dpkg-deb --fsys-tarfile "$deb" | tar -C "$ROOT.tmp" -x --keep-directory-symlink
done
chroot "$ROOT.tmp" /sbin/ldconfig
cp /etc/ssl/certs/ca-certificates.crt "$ROOT.tmp/etc/ssl/certs/ca-certificates.crt"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$ROOT.tmp/etc/pip.conf"
# The `[device]` extra of pyproject.toml: numpy and the runtimes, no torch.
env -i PATH=/usr/bin:/bin:/usr/sbin:/sbin HOME=/root chroot "$ROOT.tmp" /usr/bin/python3 -m venv /venv
env -i PATH=/usr/bin:/bin:/usr/sbin:/sbin HOME=/root chroot "$ROOT.tmp" /venv/bin/pip install --quiet \
    "numpy>=1.26" "ai-edge-litert==2.3.0" onnxruntime
touch "$ROOT.tmp/.ready"
rm -rf "$ROOT" && mv "$ROOT.tmp" "$ROOT"
