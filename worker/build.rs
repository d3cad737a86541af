//! Sets `THINPIPE_VERSION`: the package version, plus `+<id>` when the build is given an id
//! by `THINPIPE_BUILD_ID` (release pipelines stamp their build; the fleet test builds two).
fn main() {
    println!("cargo:rerun-if-env-changed=THINPIPE_BUILD_ID");
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let version = match std::env::var("THINPIPE_BUILD_ID") {
        Ok(id) if !id.is_empty() => format!("{version}+{id}"),
        _ => version,
    };
    println!("cargo:rustc-env=THINPIPE_VERSION={version}");
}
