#!/usr/bin/env bash
# ferroblk guest lab: boot a throwaway Debian-kernel guest under QEMU/TCG and
# run a host script inside it, with the host's root filesystem (read-only) as
# the guest's userland. See tests/lab/README.md.
#
#   lab.sh prepare                         install packages, fetch kernel, build initramfs
#   lab.sh run SCRIPT [-- QEMU_ARGS...]    boot, run SCRIPT in the guest, exit with its status
#
# Exit status of `run`: the script's status, 124 on timeout, 125 on lab failure.
set -euo pipefail

LAB_DIR=${FERROBLK_LAB_DIR:-/var/tmp/ferroblk-lab}
TIMEOUT=${FERROBLK_LAB_TIMEOUT:-600}    # seconds before QEMU is killed
MEM=${FERROBLK_LAB_MEM:-1G}
SMP=${FERROBLK_LAB_SMP:-2}
# Extra options of the guest's user-mode network (comma-separated QEMU -netdev user options),
# e.g. hostfwd=tcp:127.0.0.1:14420-:4420 to reach a guest service from the host's loopback.
NETDEV_EXTRA=${FERROBLK_LAB_NETDEV_EXTRA:-}
SELF=$(readlink -f "${BASH_SOURCE[0]}")

PACKAGES=(qemu-system-x86 busybox-static cpio kmod xz-utils zstd fio nvme-cli
          dmsetup cryptsetup-bin util-linux python3 iproute2 rdma-core ibverbs-providers
          ibverbs-utils rdmacm-utils)
# Modules put in the initramfs and loaded at boot (dependencies are added from
# modules.dep). Built-in or missing ones are skipped.
# shellcheck disable=SC2206  # FERROBLK_LAB_EXTRA_MODULES: space-separated names
MODULES=(virtio_pci virtio_blk virtio_net 9pnet_virtio 9p
         nvme_core nvme_fabrics nvme_tcp dm_mod dm_crypt xts aesni_intel
         crc32c_intel crc32c_generic af_alg algif_skcipher algif_hash loop ext4 configfs
         rdma_rxe ib_uverbs rdma_ucm crc32_generic nvme_rdma
         ${FERROBLK_LAB_EXTRA_MODULES:-})

log() { echo "lab: $*" >&2; }
die() { log "$*"; exit 125; }

# ---------------------------------------------------------------- prepare ---

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive nice -n 19 apt-get install -y --no-install-recommends "${missing[@]}" >&2
}

# Download + unpack (never install) the kernel behind linux-image-amd64.
fetch_kernel() {
    local pkg
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
          awk '/Depends: linux-image-[0-9]/ { print $2; exit }') || true
    if [[ -z $pkg ]]; then   # no apt metadata: fall back to whatever is cached
        [[ -f $LAB_DIR/kernel.env ]] || die "cannot resolve linux-image-amd64"
        return
    fi
    local dir=$LAB_DIR/kernel/$pkg
    if [[ ! -f $dir/.unpacked ]]; then
        log "downloading $pkg"
        rm -rf "$dir" && mkdir -p "$dir"
        # Sandbox::User=root: apt's _apt user cannot write into our cache dir.
        (cd "$dir" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2)
        dpkg-deb -x "$dir"/*.deb "$dir/root"
        rm -f "$dir"/*.deb
        touch "$dir/.unpacked"
    fi
    local ver
    ver=$(basename "$(ls -d "$dir"/root/lib/modules/*)")
    printf 'KVER=%s\nKROOT=%s\n' "$ver" "$dir/root" > "$LAB_DIR/kernel.env.tmp"
    mv "$LAB_DIR/kernel.env.tmp" "$LAB_DIR/kernel.env"
}

# The guest's PID 1 (busybox sh). @KVER@ is substituted at build time.
# Console output: everything goes to ttyS0; the last line is LAB-EXIT=<n>.
# shellcheck disable=SC2016  # expanded by the guest, not here
INIT_SCRIPT='#!/bin/sh
export PATH=/sbin:/bin
KVER=@KVER@
R=/mnt/host
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev
finish() { sync; echo; echo "LAB-EXIT=$1"; poweroff -f; sleep 10; }
fail() { echo "lab-init: $*"; finish 125; }

for m in $(cat /etc/lab-modules); do
    insmod /lib/modules/$KVER/$m 2>/dev/null || echo "lab-init: insmod ${m##*/} failed"
done

ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 &&
    ip route add default via 10.0.2.2 || echo "lab-init: network setup failed"

# Host root over virtio-9p, read-only. cache=loose is safe as nothing changes
# it from the guest side and makes exec of host binaries much faster.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot $R ||
    fail "cannot mount host root"
S=$(sed -n "s/.*lab\.script=\([^ ]*\).*/\1/p" /proc/cmdline)
cp "$R$S" /lab-script || fail "cannot read script $S"

# Writable/virtual filesystems over the read-only host tree.
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t configfs configfs $R/sys/kernel/config 2>/dev/null
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
for d in dev/shm tmp run var/tmp; do mount -t tmpfs tmpfs $R/$d; done
# Kernel modules, for `modprobe -d /run/lab MOD` inside the script.
mkdir -p $R/run/lab/lib/modules && mount -o bind /lib/modules $R/run/lab/lib/modules
# The whole host tree again, without the tmpfs above: host paths under /tmp, /run or /var/tmp
# (a build directory, say) are /run/lab/host/<path> in the guest.
mkdir -p $R/run/lab/host && mount -o bind $R $R/run/lab/host
cp /lab-script $R/tmp/lab-script && chmod 755 $R/tmp/lab-script

echo "LAB-READY uptime=$(cut -d" " -f1 /proc/uptime)s kernel=$(uname -r)"
# Honour a shebang, default to sh; cwd is /tmp (tmpfs). udev is absent:
# DM_DISABLE_UDEV tells dmsetup/cryptsetup not to wait for it.
run="/tmp/lab-script"; [ "$(head -c2 /lab-script)" = "#!" ] || run="/bin/sh /tmp/lab-script"
chroot $R /usr/bin/env -i -C /tmp PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/tmp TERM=dumb DM_DISABLE_UDEV=1 LAB_HOST=10.0.2.2 \
    $run </dev/null
finish $?
'

build_initramfs() {
    # shellcheck source=/dev/null  # sets KVER, KROOT
    . "$LAB_DIR/kernel.env"
    local out=$LAB_DIR/initramfs-$KVER.cpio.gz
    local stamp
    stamp="$KVER ${MODULES[*]} $(sha256sum < "$SELF")"
    [[ -f $out && "$(cat "$out.stamp" 2>/dev/null)" == "$stamp" ]] && return

    log "building initramfs for $KVER"
    [[ -f $KROOT/lib/modules/$KVER/modules.dep ]] || depmod -b "$KROOT" "$KVER"
    local st
    st=$(mktemp -d "$LAB_DIR/initramfs.XXXXXX")
    mkdir -p "$st"/{bin,sbin,etc,proc,sys,dev,mnt/host,lib/modules/"$KVER"}
    cp /bin/busybox "$st/bin/"
    local a
    for a in $(/bin/busybox --list); do [[ -e $st/bin/$a ]] || ln -s busybox "$st/bin/$a"; done
    ln -s ../bin/busybox "$st/sbin/modprobe"   # kernel request_module() helper
    # The kernel opens /dev/console before init mounts devtmpfs.
    mknod "$st/dev/console" c 5 1
    mknod "$st/dev/null" c 1 3

    # Ordered, de-duplicated load list from modprobe's dependency resolution.
    local m line list=()
    for m in "${MODULES[@]}"; do
        if ! line=$(modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" 2>/dev/null); then
            log "module $m not found, skipped"; continue
        fi
        while read -r a line; do [[ $a == insmod ]] && list+=("$line"); done <<< "$line"
    done
    local mdir=$KROOT/lib/modules/$KVER rel
    printf '%s\n' "${list[@]}" | awk '!seen[$0]++' | while read -r m; do
        rel=${m#"$mdir"/}; rel=${rel%.xz}; rel=${rel%.zst}
        mkdir -p "$st/lib/modules/$KVER/$(dirname "$rel")"
        # busybox insmod cannot decompress: store plain .ko
        case $m in
            *.xz)  xz -dc "$m" ;;
            *.zst) zstd -qdc "$m" ;;
            *)     cat "$m" ;;
        esac > "$st/lib/modules/$KVER/$rel"
        echo "$rel"
    done > "$st/etc/lab-modules"
    cp "$mdir"/modules.{order,builtin,builtin.modinfo} "$st/lib/modules/$KVER/"
    depmod -b "$st" "$KVER"

    printf '%s' "${INIT_SCRIPT//@KVER@/$KVER}" > "$st/init"
    chmod 755 "$st/init"
    (cd "$st" && find . -print0 | cpio --null -o -H newc --owner=0:0 --quiet) |
        gzip -1 > "$out.tmp"
    mv "$out.tmp" "$out"
    echo "$stamp" > "$out.stamp"
    rm -rf "$st"
    log "initramfs $(du -h "$out" | cut -f1) with $(printf '%s\n' "${list[@]}" | sort -u | wc -l) modules"
}

prepare() {
    install_packages
    fetch_kernel
    build_initramfs
}

# Serialise cache updates between concurrent lab.sh invocations.
locked() {
    mkdir -p "$LAB_DIR"
    ( flock 9 && "$@" ) 9> "$LAB_DIR/lock"
}

# -------------------------------------------------------------------- run ---

run() {
    local script=${1:?usage: lab.sh run SCRIPT [-- QEMU_ARGS...]}
    shift
    [[ ${1:-} == -- ]] && shift
    [[ -f $script ]] || die "no such script: $script"
    # Cached kernel: only refresh the initramfs (cheap if up to date).
    if [[ -f $LAB_DIR/kernel.env ]]; then locked build_initramfs; else locked prepare; fi
    # shellcheck source=/dev/null
    . "$LAB_DIR/kernel.env"

    mkdir -p "$LAB_DIR/runs"
    local rd
    rd=$(mktemp -d "$LAB_DIR/runs/run.XXXXXX")
    # The guest reads the script through the shared host root, so give it a
    # stable, space-free path of its own.
    cp "$script" "$rd/script"
    : > "$rd/console"

    # no_timer_check: under software emulation on a loaded host the guest's early check of its
    # timer interrupt can miss its window and panic the boot ("IO-APIC + timer doesn't work");
    # the emulated timer is fine, so skip the check (as distribution kernels do in VMs).
    timeout -k 10 "$TIMEOUT" nice -n 19 qemu-system-x86_64 \
        -accel tcg -machine q35 -cpu max -smp "$SMP" -m "$MEM" \
        -object memory-backend-memfd,id=mem,size="$MEM",share=on -numa node,memdev=mem \
        -kernel "$KROOT/boot/vmlinuz-$KVER" -initrd "$LAB_DIR/initramfs-$KVER.cpio.gz" \
        -append "console=ttyS0 panic=-1 quiet loglevel=4 no_timer_check lab.script=$rd/script ${FERROBLK_LAB_APPEND:-}" \
        -display none -monitor none -serial "file:$rd/console" -no-reboot \
        -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
        -netdev "user,id=n0${NETDEV_EXTRA:+,$NETDEV_EXTRA}" -device virtio-net-pci,netdev=n0,romfile= \
        "$@" </dev/null &
    local qpid=$!
    # shellcheck disable=SC2064
    trap "kill $qpid 2>/dev/null || true; rm -rf '$rd'" EXIT
    trap 'exit 125' INT TERM

    local t0=$SECONDS
    # Stream the console; tail exits once QEMU (well, timeout) is gone.
    tail -n +1 -s 0.2 -f --pid=$qpid "$rd/console" | sed -u 's/\r$//' &
    local tpid=$!
    local qrc=0
    wait $qpid || qrc=$?
    wait $tpid || true
    log "guest ran for $((SECONDS - t0)) s"

    local rc
    rc=$(tr -d '\r' < "$rd/console" | sed -n 's/^LAB-EXIT=\([0-9]\{1,3\}\)$/\1/p' | tail -n 1)
    if [[ -n $rc ]]; then exit "$rc"; fi
    ((qrc == 124 || qrc == 137)) && { log "timed out after $TIMEOUT s"; exit 124; }
    die "guest ended without LAB-EXIT marker (qemu status $qrc)"
}

case ${1:-} in
    prepare) locked prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 prepare | run SCRIPT [-- QEMU_ARGS...]" >&2; exit 2 ;;
esac
