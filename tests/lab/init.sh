#!/bin/busybox sh
# /init of the lab's outer Linux: PID 1 inside the QEMU TCG machine.
#
# lab.py packs this script into the cached initramfs together with a static
# busybox, the kernel modules listed in /lab/modules (in load order), and, per
# run, /lab/job.sh, which sets LAB_CWD and defines lab_command. This script:
#
#   1. mounts proc, sysfs and devtmpfs, and opens the status port (ttyS3);
#   2. loads kvm, kvm_amd and the virtio/9p modules, and checks /dev/kvm;
#   3. mounts the host's / read-only at /newroot (9p tag "hostroot"), fresh proc,
#      sys, dev, dev/pts, dev/shm, tmp, run and var/tmp inside it, and last the
#      project directory read-write over its own path (tag "project");
#   4. runs the command chrooted into /newroot: stdin /dev/null, stdout on
#      ttyS1, stderr on ttyS2;
#   5. reports its exit status on the status port and powers the machine off.
#
# The serial ports, and what the host (lab.py) does with each:
#   ttyS0  kernel console and this script's own messages  -> kept; shown with --verbose or on failure
#   ttyS1  the command's stdout                           -> the caller's stdout
#   ttyS2  the command's stderr                           -> the caller's stderr
#   ttyS3  status lines, written only by this script      -> parsed by lab.py
# The command's output never reaches ttyS3, so nothing it prints can pass for a
# status line. The status lines are (uptimes are guest seconds from /proc/uptime):
#   init UPTIME             this script has started
#   kvm MODE NPT            /dev/kvm exists (its mode) and kvm_amd's npt parameter
#   start UPTIME            the command is about to be executed
#   exit STATUS UPTIME      the command has ended with STATUS (0..255)
#   error MESSAGE           the lab itself failed; no command status follows

PATH=/bin
export PATH
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox --install -s /bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

uptime_now() { cut -d' ' -f1 /proc/uptime; }

# The status port. "raw" turns off output processing, so "\n" is not sent as "\r\n".
stty -F /dev/ttyS3 raw -echo
exec 3>/dev/ttyS3
report() { echo "$*" >&3; }
# Closing the port drains it (see the end of this script), then power off.
fail() {
    echo "lab-init: $*" >/dev/console
    report "error $*"
    exec 3>&-
    poweroff -f
}

report "init $(uptime_now)"

# 2. Modules, in dependency order (lab.py resolved it with `modinfo -F depends`).
[ -r /lab/modules ] || fail "initramfs has no /lab/modules"
for module in $(cat /lab/modules); do
    insmod "/lib/modules/$module.ko" || fail "cannot load kernel module $module"
done
[ -c /dev/kvm ] || fail "/dev/kvm did not appear after loading kvm_amd"
chmod 0666 /dev/kvm
report "kvm $(stat -c %a /dev/kvm) $(cat /sys/module/kvm_amd/parameters/npt)"

# The loopback interface, which Linux leaves down until told: TCP on 127.0.0.1 works as on
# any host (pyvmm's --forward host ends, the tests' local servers). No other interface exists.
ip link set lo up || fail "cannot bring the loopback interface up"

# 3. The job, then the filesystems the command will see.
[ -r /lab/job.sh ] || fail "initramfs has no /lab/job.sh (lab.py appends it per run)"
. /lab/job.sh

ninep="trans=virtio,version=9p2000.L,msize=262144"
# The host root is read-only and changes little during a run: cache it (cache=loose).
mount -t 9p -o "$ninep,ro,cache=loose" hostroot /newroot ||
    fail "cannot mount the host root (9p tag hostroot)"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
mount -t tmpfs -o mode=1777 tmpfs /newroot/var/tmp
# The project is shared read-write and edited on the host meanwhile: no caching. It is
# mounted last, so that a project under /tmp (a CI clone, say) is not hidden by the tmpfs;
# there its mount point has to be made first.
mkdir -p "/newroot$LAB_PROJECT"
mount -t 9p -o "$ninep,rw" project "/newroot$LAB_PROJECT" ||
    fail "cannot mount the project directory $LAB_PROJECT (9p tag project)"
[ -d "/newroot$LAB_CWD" ] || fail "working directory $LAB_CWD does not exist"

# 4. The command. The output ports are set raw while nobody has them open; the
# setting persists to the command's open.
stty -F /dev/ttyS1 raw -echo
stty -F /dev/ttyS2 raw -echo
report "start $(uptime_now)"
(lab_command) </dev/null >/dev/ttyS1 2>/dev/ttyS2
status=$?
end=$(uptime_now)
# The last close of a serial tty waits until its output has been sent: open and
# close each output port once, so nothing the command wrote is lost at power-off.
# (The same holds for the status port, closed before each power-off.)
: >/dev/ttyS1
: >/dev/ttyS2

# 5. Hand back the status and stop the machine (QEMU runs with -no-reboot).
report "exit $status $end"
exec 3>&-
poweroff -f
