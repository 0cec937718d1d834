#!/usr/bin/env bash
# Builds the test guest into $1 (default .cache/guest): vmlinuz from Debian's
# linux-image-cloud-amd64 (downloaded and unpacked, never installed) and
# initrd.img, a busybox-static initramfs with tests/guest/init.
# Rebuilds only when an input changes (kernel package version, busybox, init, this script).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../.cache/guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)

kernel_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1
}
pkg=$(kernel_pkg)
if [ -z "$pkg" ]; then
    apt-get update -qq >&2
    pkg=$(kernel_pkg)
fi
[ -n "$pkg" ] || { echo "build.sh: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
pkg_version=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')
busybox_sum=$(sha256sum /bin/busybox | cut -d' ' -f1)
inputs_sum=$(cat "$here/init" "$here/build.sh" | sha256sum | cut -d' ' -f1)
stamp="$pkg $pkg_version $busybox_sum $inputs_sum"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] \
        && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ]; then
    exit 0
fi
file /bin/busybox 2>/dev/null | grep -q 'statically linked' \
    || ldd /bin/busybox 2>&1 | grep -q 'not a dynamic' \
    || { echo "build.sh: /bin/busybox is not static: install busybox-static" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "building test guest from $pkg $pkg_version" >&2
# apt's _apt user must be able to write the download directory.
chmod 0755 "$work"
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$pkg") >&2
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/kernel"
kver=${pkg#linux-image-}
moddir="$work/kernel/lib/modules/$kver/kernel"

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,etc/acpi/PWRF,lib/modules,tmp,root}
cp /bin/busybox "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
cp "$here/init" "$root/init"
chmod 0755 "$root/init"
printf '#!/bin/sh\npoweroff -f\n' > "$root/etc/acpi/PWRF/00000080"
chmod 0755 "$root/etc/acpi/PWRF/00000080"
for m in drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev \
         drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci net/core/failover \
         drivers/net/net_failover drivers/net/virtio_net drivers/virtio/virtio_balloon \
         drivers/block/virtio_blk drivers/acpi/button drivers/input/evdev; do
    cp "$moddir/$m.ko" "$root/lib/modules/"
done
(cd "$root" && find . -print0 | sort -z | cpio --null -o -H newc --quiet | gzip -9n) > "$work/initrd.img"
cp "$work/kernel/boot/vmlinuz-$kver" "$work/vmlinuz"
mv "$work/vmlinuz" "$out/vmlinuz"
mv "$work/initrd.img" "$out/initrd.img"
echo "$stamp" > "$out/stamp"
echo "test guest: $out/vmlinuz $out/initrd.img" >&2
