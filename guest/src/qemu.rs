//! The host side of the dm-thin guest: Debian's kernel booted in QEMU (TCG) from an initramfs holding
//! busybox, one guest program with the shared libraries `ldd` lists, `mkfs.ext4`, `mkfs.xfs`,
//! `thin_ls` and the device-mapper, ext4, XFS and overlay modules, with sparse virtio disks ([`DISKS`]) that persist across boots. The guest reports through
//! `THINPIPE-GUEST ...` marker lines on the serial console.
//!
//! `scripts/guest-kernel` fetches the kernel and busybox into a cache folder
//! (`THINPIPE_GUEST_CACHE`); `scripts/test` runs it. Every QEMU process is killed when its
//! [`Boot`] ends, on timeout too, and the disks live in a temporary folder.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Modules in load order (busybox `insmod` resolves no dependencies).
pub const MODULES: [&str; 19] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "dm-mod",
    "dm-bufio",
    "crc32c_generic", // before libcrc32c: TCG has no SSE4.2 for crc32c-intel
    "libcrc32c",
    "dm-persistent-data",
    "dm-bio-prison",
    "dm-thin-pool",
    "crc16",
    "mbcache",
    "jbd2",
    "ext4",
    "xfs", // after libcrc32c
    "overlay",
];

/// The virtio disks in order (vda..vdg): the pool's metadata and data, the worker's state,
/// a tiny pool's metadata and data (for running out of data space), and a small pool's (for
/// garbage collection and capacity watermarks), and an XFS for the overlay backend's size
/// limits (mkfs.xfs wants 300 MiB at least). Sparse files.
const DISKS: [(&str, u64); 8] = [
    ("meta.img", 64 << 20),
    ("data.img", 2 << 30),
    ("state.img", 512 << 20),
    ("tiny-meta.img", 8 << 20),
    ("tiny-data.img", 24 << 20),
    ("small-meta.img", 8 << 20),
    ("small-data.img", 128 << 20),
    ("xfs.img", 320 << 20),
];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in $(cat /modules.list); do
  insmod "/lib/modules/$m.ko" || echo "THINPIPE-GUEST fail insmod $m"
done
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^thinpipe.$1=//p"; }
phase=$(arg phase)
fault=$(arg fault)
[ -n "$fault" ] && export THINPIPE_FAULT="$fault"
RUST_BACKTRACE=1 /bin/guest-program "$phase"
echo "THINPIPE-GUEST exit $?"
# With a fault armed, a power cut: reboot at once, nothing synced (QEMU exits: -no-reboot).
[ -n "$fault" ] && echo b > /proc/sysrq-trigger
sync
echo o > /proc/sysrq-trigger
"#;

pub struct Guest {
    cache: PathBuf,
    dir: tempfile::TempDir,
    qemu: PathBuf,
}

/// What one boot printed.
pub struct Boot {
    pub console: String,
}

impl Boot {
    /// The marker lines (`THINPIPE-GUEST ` stripped).
    pub fn markers(&self) -> Vec<&str> {
        self.console
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').split_once("THINPIPE-GUEST ").map(|(_, m)| m))
            .collect()
    }

    /// Panics with the console unless each check passed and no check failed.
    pub fn assert_ok(&self, checks: &[&str]) {
        let markers = self.markers();
        let failed: Vec<&&str> = markers.iter().filter(|m| m.starts_with("fail ")).collect();
        assert!(failed.is_empty(), "guest checks failed: {failed:#?}\nconsole:\n{}", self.console);
        for c in checks {
            assert!(
                markers.iter().any(|m| m.starts_with(&format!("ok {c} ("))),
                "guest check {c:?} did not pass\nconsole:\n{}",
                self.console
            );
        }
    }
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.is_file())
        .or_else(|| ["/usr/sbin", "/sbin"].iter().map(|d| Path::new(d).join(cmd)).find(|p| p.is_file()))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Copies `src` to `root/dst` (parents made).
fn put(root: &Path, src: &Path, dst: &str) {
    let to = root.join(dst.trim_start_matches('/'));
    std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir in initramfs");
    std::fs::copy(src, &to).unwrap_or_else(|e| panic!("copying {} into the initramfs: {e}", src.display()));
}

/// Copies `exe`'s shared libraries, as `ldd` lists them, to the same paths under `root`.
fn put_libraries(root: &Path, exe: &Path) {
    let out = run_ok(Command::new("ldd").arg(exe));
    for line in out.lines() {
        // "libx.so.1 => /lib/x86_64-linux-gnu/libx.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            let real = std::fs::canonicalize(p).unwrap_or_else(|e| panic!("{p}: {e}"));
            put(root, &real, p);
        }
    }
}

impl Guest {
    /// The kernel cache and QEMU, with an initramfs that runs `guest_bin` (a program using
    /// [`crate::inside`]), or `None` (skip) outside CI when either is missing.
    pub fn prepare(guest_bin: &Path) -> Option<Guest> {
        let cache = std::env::var_os("THINPIPE_GUEST_CACHE").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/thinpipe/guest")
        });
        let qemu = which("qemu-system-x86_64");
        let ready = cache.join("vmlinux").is_file()
            && qemu.is_some()
            && which("thin_ls").is_some()
            && which("mkfs.xfs").is_some();
        if !ready {
            assert!(
                std::env::var("CI").is_err(),
                "the dm-thin guest needs qemu-system-x86, thin-provisioning-tools, xfsprogs and {} (scripts/test sets them up)",
                cache.join("vmlinux").display()
            );
            eprintln!("skipping: the dm-thin guest is not set up (run scripts/test, or scripts/guest-kernel)");
            return None;
        }
        let guest = Guest { cache, dir: tempfile::tempdir().expect("tempdir"), qemu: qemu.expect("checked") };
        guest.build_initramfs(guest_bin);
        for (disk, size) in DISKS {
            let f = std::fs::File::create(guest.dir.path().join(disk)).expect("disk image");
            f.set_len(size).expect("sparse disk");
        }
        Some(guest)
    }

    pub fn disk(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn build_initramfs(&self, guest_bin: &Path) {
        let root = self.dir.path().join("root");
        for d in ["bin", "sbin", "usr/sbin", "proc", "sys", "dev", "tmp", "state", "volumes", "etc", "lib/modules"] {
            std::fs::create_dir_all(root.join(d)).expect("initramfs dirs");
        }
        put(&root, &self.cache.join("busybox/bin/busybox"), "/bin/busybox");
        // The program without debug info: a smaller initramfs boots faster.
        let exe = root.join("bin/guest-program");
        run_ok(Command::new("strip").arg("-o").arg(&exe).arg(guest_bin));
        put_libraries(&root, guest_bin);
        let mke2fs = which("mke2fs").expect("mke2fs (e2fsprogs)");
        put(&root, &mke2fs, "/sbin/mkfs.ext4"); // mke2fs picks ext4 from its name
        put_libraries(&root, &mke2fs);
        if Path::new("/etc/mke2fs.conf").is_file() {
            put(&root, Path::new("/etc/mke2fs.conf"), "/etc/mke2fs.conf");
        }
        let mkfs_xfs = which("mkfs.xfs").expect("mkfs.xfs (xfsprogs)");
        put(&root, &mkfs_xfs, "/sbin/mkfs.xfs");
        put_libraries(&root, &mkfs_xfs);
        let thin_ls = std::fs::canonicalize(which("thin_ls").expect("thin_ls")).expect("thin_ls");
        put(&root, &thin_ls, "/usr/sbin/pdata_tools");
        std::os::unix::fs::symlink("pdata_tools", root.join("usr/sbin/thin_ls")).expect("thin_ls link");
        put_libraries(&root, &thin_ls);

        let modules = self.cache.join("kernel/lib/modules");
        let version =
            std::fs::read_dir(&modules).expect("kernel modules").next().expect("a kernel").expect("entry").path();
        let mut found = std::collections::HashMap::new();
        let mut stack = vec![version.join("kernel")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("module dir").map(|e| e.expect("entry")) {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Some(name) = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ko")) {
                    found.insert(name.to_owned(), p.clone());
                }
            }
        }
        for m in MODULES {
            let p = found.get(m).unwrap_or_else(|| panic!("module {m}.ko is not in {}", version.display()));
            put(&root, p, &format!("/lib/modules/{m}.ko"));
        }
        std::fs::write(root.join("modules.list"), MODULES.join("\n") + "\n").expect("modules.list");
        let init = root.join("init");
        std::fs::write(&init, INIT).expect("init");
        std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod init");
        let cpio = self.dir.path().join("initrd.cpio");
        run_ok(
            Command::new("sh")
                .current_dir(&root)
                .arg("-c")
                .arg(format!("find . | cpio -o -H newc --quiet > '{}'", cpio.display())),
        );
    }

    /// Boots the guest for one phase and returns what it printed once it powers off.
    /// `fault` arms a fault point in the guest binary. Panics after `timeout`.
    pub fn boot(&self, phase: &str, fault: Option<&str>, timeout: Duration) -> Boot {
        let mut append = format!("console=ttyS0 panic=-1 loglevel=3 thinpipe.phase={phase}");
        if let Some(f) = fault {
            append.push_str(&format!(" thinpipe.fault={f}"));
        }
        let mut cmd = Command::new(&self.qemu);
        // TCG only: this machine's /dev/kvm is a nested device on which a stock kernel hangs
        // rather than failing, so QEMU's own fallback (`-accel kvm -accel tcg`) never kicks in.
        cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "1"])
            .args(["-nographic", "-no-reboot", "-nic", "none", "-serial", "stdio", "-monitor", "none"])
            .arg("-kernel")
            .arg(self.cache.join("vmlinux"))
            .arg("-initrd")
            .arg(self.dir.path().join("initrd.cpio"))
            .args(["-append", &append]);
        for (disk, _) in DISKS {
            cmd.arg("-drive").arg(format!("file={},if=virtio,format=raw,cache=unsafe", self.disk(disk).display()));
        }
        let mut child =
            cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start qemu");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + timeout;
        let mut console = String::new();
        let status = loop {
            while let Ok(line) = rx.try_recv() {
                console.push_str(&line);
                console.push('\n');
            }
            if let Some(status) = child.try_wait().expect("try_wait qemu") {
                break status;
            }
            if Instant::now() > deadline {
                kill(&mut child);
                panic!("the guest ({phase}) did not power off within {timeout:?}; console:\n{console}");
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    console.push_str(&line);
                    console.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Timeout | mpsc::RecvTimeoutError::Disconnected) => {}
            }
        };
        reader.join().expect("console reader");
        while let Ok(line) = rx.try_recv() {
            console.push_str(&line);
            console.push('\n');
        }
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut stderr).expect("qemu stderr");
        }
        assert!(status.success(), "qemu ({phase}) exited with {status}: {stderr}\nconsole:\n{console}");
        Boot { console }
    }
}

/// Kills QEMU and reaps it.
fn kill(child: &mut std::process::Child) {
    if let Err(e) = child.kill() {
        eprintln!("killing qemu: {e}");
    }
    if let Err(e) = child.wait() {
        eprintln!("reaping qemu: {e}");
    }
}
