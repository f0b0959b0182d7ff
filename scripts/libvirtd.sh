#!/usr/bin/env bash
# Start, stop or restart virtlogd + libvirtd, with systemd when it is PID 1 and by hand otherwise.
# A libvirt hook file is only picked up when libvirtd starts, so hook installation calls `restart`.
set -euo pipefail
action=${1:-start}
sock=/run/libvirt/libvirt-sock

have_systemd() { [ "$(ps -o comm= -p 1 2>/dev/null)" = systemd ]; }
running() { pgrep -x "$1" >/dev/null 2>&1; }

wait_for_socket() {
  for _ in $(seq 1 100); do
    if [ -S "$sock" ] && virsh -c qemu:///system version >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "libvirtd.sh: libvirtd did not answer on $sock within 20 s" >&2
  return 1
}

start() {
  mkdir -p /var/log/libvirt/qemu /run/libvirt
  if have_systemd; then
    systemctl start virtlogd.socket libvirtd.service
  else
    running virtlogd || virtlogd --daemon
    running libvirtd || libvirtd --daemon
  fi
  wait_for_socket
}

stop() {
  if have_systemd; then
    systemctl stop libvirtd.service
  else
    if running libvirtd; then
      pkill -TERM -x libvirtd || true
      for _ in $(seq 1 100); do running libvirtd || break; sleep 0.1; done
      running libvirtd && pkill -KILL -x libvirtd || true
    fi
  fi
}

case "$action" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  *) echo "usage: libvirtd.sh start|stop|restart" >&2; exit 2 ;;
esac
