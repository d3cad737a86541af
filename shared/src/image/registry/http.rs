//! The few Distribution API calls thinpipe makes (`GET` a manifest, `GET` a blob from an
//! offset), on the project's one HTTP stack (reqwest 0.13). Written here rather than taken
//! from `oci-client`, which would bring a second stack (reqwest 0.12), because what matters to
//! a fleet lives between the calls: a 429's `Retry-After` goes into the `backoff` retry
//! here, where the response's headers are at hand, a token is
//! fetched only when a registry asks for one (its authentication first asks `/v2/` for the
//! challenge: one request more per image and host), and every failure is classed (retry or
//! not) as the S3 source's are.
//!
//! Authentication follows the registry's `WWW-Authenticate` challenge: `Basic` with the
//! login, or `Bearer` through the named token service (Docker Hub's flow), anonymous when
//! there is no login. Tokens are kept per registry and repository. No credential or token is
//! ever put in a message, a log line or a trace.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, RANGE, RETRY_AFTER, WWW_AUTHENTICATE};

use super::credentials::{CredentialStore, Login};
use crate::image::error::{ImageError, error_chain};

/// How a registry is spoken to.
#[derive(Clone, Debug, Default)]
pub struct HttpOptions {
    /// Extra CA certificates (PEM) trusted beside the system's, for a registry whose
    /// certificate a private CA signed.
    pub ca_pem: Option<Vec<u8>>,
    /// Registries (`host:port`) spoken to over plain HTTP, as Docker's `insecure-registries`.
    pub plain_http: Vec<String>,
    /// How long one call keeps retrying 429s, 5xx and broken connections before it fails
    /// (transient: the engine's step retry takes over).
    pub retry_for: Duration,
}

/// A call's failure before it is given a meaning by its caller.
enum Failure {
    /// Worth another try (429, 5xx, a broken connection), after `after` if the registry said.
    Again {
        detail: String,
        after: Option<Duration>,
    },
    Final(ImageError),
}

pub(crate) struct RegistryHttp {
    client: reqwest::Client,
    options: HttpOptions,
    credentials: CredentialStore,
    /// `Authorization` values per `registry/repository`, once a challenge was answered.
    auth: Mutex<HashMap<String, String>>,
    /// Logins per registry, read once from the Docker config.
    logins: tokio::sync::Mutex<HashMap<String, Option<Login>>>,
    requests: AtomicU64,
}

/// What a `GET` found.
pub(crate) enum Got {
    Found(reqwest::Response),
    NotFound,
    /// A `Range` past the blob's end: nothing left to read.
    PastEnd,
}

impl RegistryHttp {
    pub fn new(options: HttpOptions, credentials: CredentialStore) -> Result<Self, ImageError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("thinpipe/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &options.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| ImageError::SourceMisconfigured {
                source_desc: "registry.ca_file".into(),
                detail: format!("not PEM certificates: {e}"),
            })?;
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder.build().map_err(|e| ImageError::SourceMisconfigured {
            source_desc: "the registry client".into(),
            detail: error_chain(&e),
        })?;
        Ok(Self {
            client,
            options,
            credentials,
            auth: Mutex::default(),
            logins: Default::default(),
            requests: AtomicU64::new(0),
        })
    }

    /// Requests sent to registries and token services so far (benchmarks count them).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn base(&self, registry: &str) -> String {
        let host = api_host(registry);
        let scheme = if self.options.plain_http.iter().any(|h| h == registry || h == host) { "http" } else { "https" };
        format!("{scheme}://{host}")
    }

    /// `GET /v2/<repository>/<path>`, retried under `backoff` (a 429's `Retry-After`
    /// honoured); `from` > 0 asks for the bytes from there on.
    pub async fn get(
        &self,
        registry: &str,
        repository: &str,
        path: &str,
        accept: &[&str],
        from: u64,
    ) -> Result<Got, ImageError> {
        let url = format!("{}/v2/{repository}/{path}", self.base(registry));
        let policy = backoff::ExponentialBackoff {
            initial_interval: Duration::from_millis(200),
            max_interval: Duration::from_secs(10),
            max_elapsed_time: Some(self.options.retry_for),
            ..Default::default()
        };
        let result = backoff::future::retry(policy, || async {
            match self.get_once(registry, repository, &url, accept, from).await {
                Ok(got) => Ok(got),
                Err(Failure::Final(e)) => Err(backoff::Error::permanent(e)),
                Err(Failure::Again { detail, after }) => {
                    tracing::debug!(%detail, ?after, "registry call failed; trying again");
                    let e = ImageError::Unavailable { source_desc: format!("registry {registry}"), detail };
                    Err(match after {
                        // Never wait past the call's own budget for one answer.
                        Some(after) => backoff::Error::retry_after(e, after.min(self.options.retry_for)),
                        None => backoff::Error::transient(e),
                    })
                }
            }
        })
        .await;
        result.map_err(|e| match e {
            ImageError::Unavailable { source_desc, detail } => ImageError::Unavailable {
                source_desc,
                // The detail names the request already.
                detail: format!("{detail} (still failing after {:?} of retries)", self.options.retry_for),
            },
            other => other,
        })
    }

    async fn get_once(
        &self,
        registry: &str,
        repository: &str,
        url: &str,
        accept: &[&str],
        from: u64,
    ) -> Result<Got, Failure> {
        let key = format!("{registry}/{repository}");
        let mut answered_challenge = false;
        loop {
            let mut request = self.client.get(url).header(ACCEPT, accept.join(", "));
            if from > 0 {
                request = request.header(RANGE, format!("bytes={from}-"));
            }
            let cached = self.auth.lock().ok().and_then(|a| a.get(&key).cloned());
            if let Some(value) = &cached {
                request = request.header(AUTHORIZATION, value);
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            let response = request.send().await.map_err(|e| transport_failure(registry, url, &e))?;
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && !answered_challenge {
                let challenge = response
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .map(Challenge::parse)
                    .unwrap_or(Challenge::None);
                let value = self.answer(registry, repository, url, challenge).await?;
                if let Ok(mut a) = self.auth.lock() {
                    a.insert(key.clone(), value);
                }
                answered_challenge = true;
                continue;
            }
            return classify(registry, url, response, from).await;
        }
    }

    async fn login(&self, registry: &str) -> Result<Option<Login>, Failure> {
        let mut logins = self.logins.lock().await;
        // A login that expires (an ECR token) is renewed ten minutes before it does.
        let fresh = |l: &Option<Login>| {
            l.as_ref().and_then(|l| l.expires).is_none_or(|at| {
                at.duration_since(std::time::SystemTime::now()).is_ok_and(|left| left > Duration::from_secs(600))
            })
        };
        if let Some(found) = logins.get(registry).filter(|l| fresh(l)) {
            return Ok(found.clone());
        }
        let found = self.credentials.login_for(registry).await.map_err(Failure::Final)?;
        logins.insert(registry.to_owned(), found.clone());
        Ok(found)
    }

    /// The `Authorization` value that answers `challenge`.
    async fn answer(
        &self,
        registry: &str,
        repository: &str,
        url: &str,
        challenge: Challenge,
    ) -> Result<String, Failure> {
        use base64::Engine as _;
        let login = self.login(registry).await?;
        let denied = |detail: String| {
            Failure::Final(ImageError::AccessDenied { source_desc: format!("registry {registry}"), detail })
        };
        match challenge {
            Challenge::Basic => {
                let login = login.ok_or_else(|| {
                    denied(format!(
                        "GET {url} needs a login and none is configured: `docker login {registry}` (or add it to the Docker config that registry.docker_config names)"
                    ))
                })?;
                let raw = format!("{}:{}", login.username, login.password.expose());
                Ok(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw)))
            }
            Challenge::Bearer { realm, service } => {
                let scope = format!("repository:{repository}:pull");
                let mut request = self.client.get(&realm).query(&[("scope", scope.as_str())]);
                if let Some(service) = &service {
                    request = request.query(&[("service", service.as_str())]);
                }
                if let Some(login) = &login {
                    request = request.basic_auth(&login.username, Some(login.password.expose()));
                }
                self.requests.fetch_add(1, Ordering::Relaxed);
                let response = request.send().await.map_err(|e| transport_failure(registry, &realm, &e))?;
                let status = response.status();
                if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                    let hint = if login.is_some() {
                        "the configured login was refused: check it (`docker login`)"
                    } else {
                        "no login is configured for it: `docker login`"
                    };
                    return Err(denied(format!("the token service {realm} answered HTTP {status}; {hint}")));
                }
                if let Some(again) = again_after(status, response.headers()) {
                    return Err(Failure::Again {
                        detail: format!("token service {realm}: HTTP {status}"),
                        after: again,
                    });
                }
                if !status.is_success() {
                    return Err(Failure::Final(ImageError::SourceMisconfigured {
                        source_desc: format!("registry {registry}"),
                        detail: format!("the token service {realm} answered HTTP {status}"),
                    }));
                }
                #[derive(serde::Deserialize)]
                struct TokenAnswer {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let body: TokenAnswer = response.json().await.map_err(|e| Failure::Again {
                    detail: format!("reading the token from {realm}: {}", error_chain(&e)),
                    after: None,
                })?;
                let token = body.token.or(body.access_token).ok_or_else(|| {
                    Failure::Final(ImageError::SourceMisconfigured {
                        source_desc: format!("registry {registry}"),
                        detail: format!("the token service {realm} answered without a token"),
                    })
                })?;
                Ok(format!("Bearer {token}"))
            }
            Challenge::None => Err(denied(format!(
                "GET {url} answered HTTP 401 without a challenge this client can answer (Basic or Bearer)"
            ))),
        }
    }
}

/// Docker Hub's API lives at another host than the name users write (`docker.io`, or the
/// historical `index.docker.io`): where Docker itself sends its requests.
fn api_host(registry: &str) -> &str {
    if registry == "docker.io" || registry == "index.docker.io" { "registry-1.docker.io" } else { registry }
}

/// A `WWW-Authenticate` challenge, the two schemes registries use.
#[derive(Debug, PartialEq, Eq)]
enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String> },
    None,
}

impl Challenge {
    fn parse(header: &str) -> Challenge {
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Challenge::Basic;
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Challenge::None;
        }
        let params = auth_params(rest);
        match params.get("realm") {
            Some(realm) => Challenge::Bearer { realm: realm.clone(), service: params.get("service").cloned() },
            None => Challenge::None,
        }
    }
}

/// `key="value", key=value` pairs (RFC 9110's auth-param), quotes and escapes undone.
fn auth_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect::<String>().trim().to_ascii_lowercase();
        if key.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied().filter(|c| *c != ',') {
                value.push(c);
                chars.next();
            }
        }
        out.insert(key, value.trim().to_owned());
    }
}

/// Whether `status` is worth another try, and when the registry said to come back.
fn again_after(status: StatusCode, headers: &HeaderMap) -> Option<Option<Duration>> {
    let again =
        status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT || status.is_server_error();
    again.then(|| {
        // Seconds only: registries send seconds, and an HTTP date would need the clock.
        headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
    })
}

async fn classify(registry: &str, url: &str, response: reqwest::Response, from: u64) -> Result<Got, Failure> {
    let status = response.status();
    if status.is_success() {
        return Ok(Got::Found(response));
    }
    if status == StatusCode::NOT_FOUND {
        return Ok(Got::NotFound);
    }
    if status == StatusCode::RANGE_NOT_SATISFIABLE && from > 0 {
        return Ok(Got::PastEnd);
    }
    let source_desc = format!("registry {registry}");
    if let Some(after) = again_after(status, response.headers()) {
        return Err(Failure::Again { detail: format!("GET {url}: HTTP {status}"), after });
    }
    let said = registry_errors(response).await;
    let detail = format!("GET {url}: HTTP {status}{said}");
    Err(Failure::Final(match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ImageError::AccessDenied {
            source_desc,
            detail: format!("{detail}; check the login for {registry} (`docker login`, registry.docker_config)"),
        },
        _ => ImageError::SourceMisconfigured { source_desc, detail },
    }))
}

/// The registry's own words from an error body (`{"errors":[{"code","message"}]}`), short.
async fn registry_errors(response: reqwest::Response) -> String {
    #[derive(serde::Deserialize)]
    struct Body {
        errors: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        code: String,
        #[serde(default)]
        message: String,
    }
    let Ok(bytes) = response.bytes().await else { return String::new() };
    match serde_json::from_slice::<Body>(&bytes) {
        Ok(body) if !body.errors.is_empty() => {
            let parts: Vec<String> = body.errors.iter().take(3).map(|e| format!("{} {}", e.code, e.message)).collect();
            format!(" ({})", parts.join("; "))
        }
        _ => String::new(),
    }
}

fn transport_failure(registry: &str, url: &str, e: &reqwest::Error) -> Failure {
    let chain = error_chain(e);
    if chain.contains("certificate") || chain.contains("UnknownIssuer") || chain.contains("InvalidCertificate") {
        return Failure::Final(ImageError::SourceMisconfigured {
            source_desc: format!("registry {registry}"),
            detail: format!(
                "GET {url}: {chain}; the registry's TLS certificate is not trusted: give its CA in registry.ca_file"
            ),
        });
    }
    if chain.contains("InvalidContentType")
        || chain.contains("invalid HTTP version")
        || chain.contains("CorruptMessage")
    {
        return Failure::Final(ImageError::SourceMisconfigured {
            source_desc: format!("registry {registry}"),
            detail: format!(
                "GET {url}: {chain}; the registry does not speak TLS here: list it in registry.plain_http if it serves plain HTTP"
            ),
        });
    }
    Failure::Again { detail: format!("GET {url}: {chain}"), after: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse_as_registries_send_them() {
        assert_eq!(Challenge::parse(r#"Basic realm="Registry Realm""#), Challenge::Basic);
        assert_eq!(
            Challenge::parse(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull""#
            ),
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into())
            }
        );
        assert_eq!(
            Challenge::parse(r#"Bearer realm=https://r.example/t, service="a \"b\"""#),
            Challenge::Bearer { realm: "https://r.example/t".into(), service: Some(r#"a "b""#.into()) }
        );
        assert_eq!(Challenge::parse("Negotiate"), Challenge::None);
        assert_eq!(Challenge::parse("Bearer service=x"), Challenge::None);
    }

    #[test]
    fn retry_after_is_read_for_429_and_5xx_only() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(again_after(StatusCode::TOO_MANY_REQUESTS, &h), Some(Some(Duration::from_secs(3))));
        assert_eq!(again_after(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new()), Some(None));
        assert_eq!(again_after(StatusCode::NOT_FOUND, &h), None);
        assert_eq!(api_host("docker.io"), "registry-1.docker.io");
        let hub = super::super::reference::parse("debian:bookworm").unwrap();
        assert_eq!(api_host(hub.registry()), "registry-1.docker.io", "Docker Hub's names reach its API host");
    }
}
