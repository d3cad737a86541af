//! One blocking client for the admin API (call it outside an async runtime, or in
//! `spawn_blocking`): where the worker of a state directory listens, and typed GETs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::wire;

/// Why the admin API could not be asked or did not answer what was expected.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("reading {}: {source}", path.display())]
    AddressFile { path: PathBuf, source: std::io::Error },
    #[error("building the HTTP client: {0}")]
    Client(reqwest::Error),
    /// Nothing answered at the address: no worker is there (a killed worker leaves its
    /// address file behind).
    #[error("{url}: nothing answers there; is the worker running? (`worker daemon`): {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("{url}: {source}")]
    Transport { url: String, source: reqwest::Error },
    #[error("{url}: HTTP {status}: {message}")]
    Status { url: String, status: u16, message: String },
    #[error("{url}: the answer is not what this version expects: {source}")]
    Decode { url: String, source: serde_json::Error },
}

impl AdminError {
    /// Whether no worker answered at the address.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, AdminError::Unreachable { .. })
    }

    /// Whether asking again later can help (the worker may be starting, busy or restarting).
    pub fn is_retryable(&self) -> bool {
        match self {
            AdminError::Unreachable { .. } | AdminError::Transport { .. } => true,
            AdminError::Status { status, .. } => *status >= 500,
            AdminError::AddressFile { .. } | AdminError::Client(_) | AdminError::Decode { .. } => false,
        }
    }
}

/// The admin API of one worker.
#[derive(Clone, Debug)]
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::blocking::Client,
}

impl AdminClient {
    /// The address a client should use: `given` (a flag) if set, else what the worker running
    /// on `state_dir` wrote to its [`ADDR_FILE`](super::ADDR_FILE); `None` when neither says.
    pub fn address(given: Option<&str>, state_dir: &Path) -> Result<Option<String>, AdminError> {
        if let Some(url) = given {
            return Ok(Some(url.trim().trim_end_matches('/').to_owned()));
        }
        let path = state_dir.join(super::ADDR_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text.trim().trim_end_matches('/').to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(AdminError::AddressFile { path, source }),
        }
    }

    /// A client of the API at `base` (`http://host:port`), sending `token` as a bearer token
    /// when set (a worker with `admin.token` wants it), each request bounded by `timeout`.
    pub fn new(base: &str, token: Option<&str>, timeout: Duration) -> Result<AdminClient, AdminError> {
        let http = reqwest::blocking::Client::builder().timeout(timeout).build().map_err(AdminError::Client)?;
        Ok(AdminClient {
            base: base.trim_end_matches('/').to_owned(),
            token: token.filter(|t| !t.is_empty()).map(str::to_owned),
            http,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET <base><path>` as `T`; an error status's `{"error": ...}` becomes the message.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, AdminError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.get(&url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().map_err(|source| {
            if source.is_connect() {
                AdminError::Unreachable { url: url.clone(), source }
            } else {
                AdminError::Transport { url: url.clone(), source }
            }
        })?;
        let status = response.status();
        let body = response.bytes().map_err(|source| AdminError::Transport { url: url.clone(), source })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_else(|| "no detail".to_owned());
            return Err(AdminError::Status { url, status: status.as_u16(), message });
        }
        serde_json::from_slice(&body).map_err(|source| AdminError::Decode { url, source })
    }

    /// `GET /api/progress`: the steps the worker is running now.
    pub fn progress(&self) -> Result<Vec<wire::StepProgress>, AdminError> {
        self.get("/api/progress")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_then_the_address_file_then_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(AdminClient::address(None, dir.path()).unwrap(), None);
        std::fs::write(dir.path().join(crate::admin::ADDR_FILE), "http://127.0.0.1:9/\n").unwrap();
        assert_eq!(AdminClient::address(None, dir.path()).unwrap().as_deref(), Some("http://127.0.0.1:9"));
        assert_eq!(AdminClient::address(Some("http://x:1/"), dir.path()).unwrap().as_deref(), Some("http://x:1"));
    }

    #[test]
    fn nothing_listening_is_unreachable_and_worth_asking_again() {
        // A port bound then closed: nothing listens on it.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client = AdminClient::new(&format!("http://127.0.0.1:{port}"), None, Duration::from_secs(5)).unwrap();
        let e = client.progress().unwrap_err();
        assert!(e.is_unreachable(), "{e}");
        assert!(e.is_retryable());
        assert!(e.to_string().contains("is the worker running?"), "{e}");
    }
}
