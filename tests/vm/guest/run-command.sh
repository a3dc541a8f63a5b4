#!/run/fvd-vm/busybox sh
# tests/vm/guest/run-command.sh — runs the caller's command inside the guest.
#
# Usage: run-command.sh pid1      (busybox mode: we are PID 1 in the overlay root)
#        run-command.sh service   (systemd mode: started by fvd-vm-command.service)
#
# The command itself is /run/fvd-vm/results/job.sh, written by run.sh on the
# host (cwd, environment and properly quoted argv).  Its stdout+stderr go to
# the serial console, which qemu streams to run.sh's stdout.  Its exit code is
# written to results/rc, which run.sh turns into its own exit code.  The guest
# uptime at command start is written to results/started (boot timing).
bb=/run/fvd-vm/busybox
R=/run/fvd-vm/results
mode=${1:-pid1}
tty=/dev/ttyS0

if [ "$mode" = pid1 ]; then
    # What systemd would otherwise set up for us.
    $bb mkdir -p /dev/pts /dev/shm /dev/mqueue
    $bb mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
    $bb mount -t tmpfs -o nosuid,nodev shm /dev/shm
    $bb mount -t mqueue mqueue /dev/mqueue 2>/dev/null
    $bb mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
    [ -e /dev/fd ]     || $bb ln -s /proc/self/fd /dev/fd
    [ -e /dev/stdin ]  || $bb ln -s /proc/self/fd/0 /dev/stdin
    [ -e /dev/stdout ] || $bb ln -s /proc/self/fd/1 /dev/stdout
    [ -e /dev/stderr ] || $bb ln -s /proc/self/fd/2 /dev/stderr
    $bb ip link set lo up 2>/dev/null
    # Host's /tmp content stays visible (read-only lower), writes go to tmpfs.
fi

# Plain '\n' on the host side (no CR added by the tty layer).
$bb stty -F $tty -onlcr 2>/dev/null

# A kernel that oopsed while booting (taint bit 7, D: under TCG, an int3 left by the kernel's
# own code patching, see run.sh) may have lost a kernel thread such as rcu_preempt: the command
# would hang or fail for reasons of no concern to it.  Power off without results/started, so
# run.sh boots once more.  Said on the kernel console, which run.sh shows on stderr.
if [ $(( $($bb cat /proc/sys/kernel/tainted) & 128 )) -ne 0 ]; then
    echo "[fvd-vm] the guest kernel oopsed while booting (tainted $($bb cat /proc/sys/kernel/tainted)): not starting the command" > /dev/console
    $bb sync
    if [ "$mode" = pid1 ]; then $bb poweroff -f; $bb sleep 30; fi
    exit 1
fi

$bb cat /proc/uptime > $R/started
/bin/bash $R/job.sh < /dev/null > $tty 2>&1
rc=$?
echo "$rc" > $R/rc.tmp && $bb mv $R/rc.tmp $R/rc
$bb sync

# Keep the host's stdout clean after the command: silence the kernel's
# "reboot: Power down" (emergency level) unless debugging.
$bb grep -q 'fvd.debug=1' /proc/cmdline || echo 0 > /proc/sys/kernel/printk

if [ "$mode" = pid1 ]; then
    # Nothing else to stop: power off right away (qemu exits on ACPI poweroff).
    $bb poweroff -f
    $bb sleep 30
fi
# service mode: SuccessAction=poweroff in the unit powers off cleanly.
exit 0
