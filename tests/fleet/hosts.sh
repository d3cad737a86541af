#!/usr/bin/env bash
# Three real test hosts for the Ansible role, on this machine, without Docker.
#
#   tests/fleet/hosts.sh up <dir>     make hosts h1 h2 h3 (and the AWS namespace) under <dir>
#   tests/fleet/hosts.sh down <dir>   tear down everything `up` made (idempotent)
#
# A host is a network namespace (`tp-hN`, 10.231.0.1N on the bridge `tp-br0`, whose own
# address is 10.231.0.1) with its own hostname, mount and cgroup namespaces, copy-on-write
# overlays over the system folders the role writes (/etc, /usr/local, /var/lib; a fresh
# /root and /run; /tmp is shared, and may hold <dir>), an sshd with key authentication (root, the key in <dir>/id_ed25519), and a
# `systemd --user` manager with XDG_RUNTIME_DIR=/run that plain `systemctl` talks to as if
# it were the host's service manager. The namespace `tp-aws` (10.231.0.2) is for the test's
# moto server. Needs root, iproute2, openssh-server, systemd. Everything runs under <dir>;
# `down` kills what `up` started (by the pids it recorded), unmounts, detaches loop devices
# whose backing file is under <dir>, and deletes the namespaces and the bridge.
set -euo pipefail

cmd=${1:?usage: hosts.sh up|down <dir>}
dir=$(realpath -m "${2:?usage: hosts.sh up|down <dir>}")
HOSTS=(h1 h2 h3)
BRIDGE=tp-br0

host_ip() { echo "10.231.0.1${1#h}"; }

down() {
  for h in "${HOSTS[@]}"; do
    # The launcher's pid: killing its process group ends sshd, the manager and its services.
    if [ -f "$dir/$h/launcher.pid" ]; then
      pid=$(cat "$dir/$h/launcher.pid")
      kill -KILL -- "-$pid" 2>/dev/null || true
      rm -f "$dir/$h/launcher.pid"
    fi
    # Everything the host ran is in its cgroup tree (sshd daemonizes out of the process
    # group, services sit in the manager's sub-cgroups): kill it all, then remove the tree.
    cg=/sys/fs/cgroup/systemd/thinpipe-fleet-$h
    for _ in $(seq 1 50); do
      [ -d "$cg" ] || break
      pids=$(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null)
      [ -n "$pids" ] || break
      kill -KILL $pids 2>/dev/null || true
      sleep 0.1
    done
    for hier in systemd unified; do
      cg=/sys/fs/cgroup/$hier/thinpipe-fleet-$h
      [ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
    ip netns del "tp-$h" 2>/dev/null || true
  done
  if [ -f "$dir/aws.pid" ]; then kill -KILL "$(cat "$dir/aws.pid")" 2>/dev/null || true; rm -f "$dir/aws.pid"; fi
  ip netns del tp-aws 2>/dev/null || true
  # A namespace is freed asynchronously; its veth's other end may outlive the name.
  for ns in tp-aws "${HOSTS[@]/#/tp-}"; do ip link del "v-$ns" 2>/dev/null || true; done
  ip link del "$BRIDGE" 2>/dev/null || true
  # Loop devices of btrfs images the role made under <dir>.
  losetup -nO NAME,BACK-FILE 2>/dev/null | while read -r dev file; do
    case "$file" in "$dir"/*) losetup -d "$dev" 2>/dev/null || true ;; esac
  done
  return 0
}

veth() { # veth <namespace> <ip>
  local ns=$1 ip=$2 side="v-$1"
  ip netns add "$ns"
  ip link add "$side" type veth peer name eth0 netns "$ns"
  ip link set "$side" master "$BRIDGE" up
  ip -n "$ns" addr add "$ip/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
}

up() {
  down
  mkdir -p "$dir"
  [ -f "$dir/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$dir/id_ed25519"
  ip link add "$BRIDGE" type bridge
  ip addr add 10.231.0.1/24 dev "$BRIDGE"
  ip link set "$BRIDGE" up
  veth tp-aws 10.231.0.2
  for h in "${HOSTS[@]}"; do
    local hd="$dir/$h" ip
    ip=$(host_ip "$h")
    mkdir -p "$hd"/{upper,work,root,log}
    veth "tp-$h" "$ip"
    ssh-keygen -q -t ed25519 -N '' -f "$hd/ssh_host_ed25519_key" <<<y >/dev/null
    cat > "$hd/sshd_config" <<EOF
ListenAddress $ip
HostKey $hd/ssh_host_ed25519_key
PidFile /run/sshd.pid
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
AuthorizedKeysFile $dir/id_ed25519.pub
StrictModes no
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
    # Stage 2 runs inside the host's namespaces; stage 3 inside its cgroup namespace.
    cat > "$hd/stage2.sh" <<EOF
set -eu
hostname $h
for d in etc usr/local var/lib; do
  mkdir -p "$hd/upper/\$d" "$hd/work/\$d"
  mount -t overlay overlay -o "lowerdir=/\$d,upperdir=$hd/upper/\$d,workdir=$hd/work/\$d" "/\$d"
done
mount --bind "$hd/root" /root
mount -t tmpfs tmpfs /run
echo $h > /etc/hostname
printf '127.0.0.1 localhost\n$ip $h\n' > /etc/hosts
exec unshare --cgroup -- bash "$hd/stage3.sh"
EOF
    cat > "$hd/stage3.sh" <<EOF
set -eu
mount -t tmpfs cgroup /sys/fs/cgroup
mkdir -p /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
mkdir -p /run/systemd/system /run/sshd
/usr/sbin/sshd -f "$hd/sshd_config" -E "$hd/log/sshd.log"
export XDG_RUNTIME_DIR=/run HOME=/root SYSTEMD_UNIT_PATH=/etc/systemd/system:
exec /lib/systemd/systemd --user --log-target=console > "$hd/log/systemd.log" 2>&1
EOF
    # The launcher moves itself into a cgroup of its own first: a manager started in the
    # root cgroup would move every process of the machine.
    setsid bash -c "
      for hier in systemd unified; do
        mkdir -p /sys/fs/cgroup/\$hier/thinpipe-fleet-$h
        echo \$\$ > /sys/fs/cgroup/\$hier/thinpipe-fleet-$h/cgroup.procs
      done
      exec ip netns exec tp-$h unshare --mount --uts --propagation private -- bash '$hd/stage2.sh'
    " </dev/null >"$hd/log/launcher.log" 2>&1 &
    echo $! > "$hd/launcher.pid"
  done
  # Ready when each sshd answers and each manager has its socket.
  for h in "${HOSTS[@]}"; do
    ip=$(host_ip "$h")
    for _ in $(seq 1 200); do
      if ssh -q -i "$dir/id_ed25519" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
           -o ConnectTimeout=1 "root@$ip" 'systemctl is-system-running >/dev/null 2>&1; test -S /run/systemd/private' 2>/dev/null; then
        continue 2
      fi
      sleep 0.1
    done
    echo "hosts.sh: host $h did not come up; logs in $dir/$h/log" >&2
    cat "$dir/$h/log/"* >&2 || true
    exit 1
  done
}

case "$cmd" in
  up) up ;;
  down) down ;;
  *) echo "usage: hosts.sh up|down <dir>" >&2; exit 2 ;;
esac
