//! What an operator sees: the admin API, /metrics, traces over OTLP, progress on a terminal,
//! and the inspector page in Chromium.
//!
//! One test binary per concern (each links the AWS SDK once); each module is one former
//! test file, described in its own header and in `tests/README.md`.

mod admin_api;
mod inspector_browser;
mod metrics;
mod progress_terminal;
mod traces_e2e;
