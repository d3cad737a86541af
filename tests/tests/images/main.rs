//! Images, file for file: layer semantics against umoci-built layouts, the real Debian image,
//! and hostile or malformed input.
//!
//! One test binary per concern (each links the AWS SDK once); each module is one former
//! test file, described in its own header and in `tests/README.md`.

mod hostile_input;
mod oci_layers;
mod real_images;
mod registry;
