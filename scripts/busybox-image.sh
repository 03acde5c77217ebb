#!/usr/bin/env bash
# Imports a busybox image for tests and the demo (no registry needed): an
# empty rootfs with the static busybox and its applets, `docker import`ed.
#   scripts/busybox-image.sh [IMAGE]     (default gpuwarden-test/busybox:latest)
# Needs a running Docker engine and the busybox-static package.
set -euo pipefail
image="${1:-gpuwarden-test/busybox:latest}"
if docker image inspect "$image" >/dev/null 2>&1; then
  exit 0
fi
printf '==> importing %s from busybox-static\n' "$image" >&2
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$rootfs/bin"
cp /bin/busybox "$rootfs/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
done
tar -C "$rootfs" -c . | docker import -c 'CMD ["/bin/sh"]' - "$image" >/dev/null
