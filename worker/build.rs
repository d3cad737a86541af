//! Sets `THINPIPE_VERSION`: the package version, plus `+<id>` when the build is given an id
//! by `THINPIPE_BUILD_ID` (release pipelines stamp their build; the fleet test builds two);
//! and `THINPIPE_COMMIT`, the source's git commit when it is built from a git checkout.
fn main() {
    println!("cargo:rerun-if-env-changed=THINPIPE_BUILD_ID");
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/refs/heads");
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    println!("cargo:rustc-env=THINPIPE_COMMIT={commit}");
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let version = match std::env::var("THINPIPE_BUILD_ID") {
        Ok(id) if !id.is_empty() => format!("{version}+{id}"),
        _ => version,
    };
    println!("cargo:rustc-env=THINPIPE_VERSION={version}");
}
