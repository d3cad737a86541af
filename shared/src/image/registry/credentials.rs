//! Registry credentials the way Docker finds them: `config.json`'s `auths` (a base64
//! `user:password`), and `credHelpers` / `credsStore` by running `docker-credential-<name> get`
//! with the registry's host on stdin; and for Amazon ECR (`<account>.dkr.ecr.<region>.
//! amazonaws.com`, or a host listed in `registry.ecr_hosts`) a token from ECR's
//! `GetAuthorizationToken` through the usual AWS credential chain, renewed before it expires.
//! A helper named for the registry in the Docker config goes first (the user chose it).
//! Nothing here is ever logged: [`Secret`] prints as `<redacted>`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use crate::image::error::ImageError;

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    pub username: String,
    pub password: Secret,
    /// When the password stops working (an ECR token); `None`: it does not expire.
    pub expires: Option<std::time::SystemTime>,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login").field("username", &self.username).field("password", &self.password).finish()
    }
}

/// A password or token: kept out of every `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Docker's `config.json`, the parts that name credentials.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: HashMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Where credentials come from: a Docker `config.json` (or none), and ECR.
#[derive(Clone, Debug, Default)]
pub struct CredentialStore {
    config: Option<PathBuf>,
    /// Looked in for `docker-credential-*` before `PATH` (tests put their helper here).
    helpers_in: Option<PathBuf>,
    ecr: Option<EcrLogins>,
}

/// ECR logins: the AWS configuration to ask with, loaded when an ECR registry is first met
/// (loading it may ask the instance metadata service for the region: not for every worker
/// start), and hosts beyond ECR's own names that take them (a pull-through endpoint, or a
/// test registry).
#[derive(Clone, Debug)]
pub struct EcrLogins {
    options: crate::aws::AwsOptions,
    sdk: std::sync::Arc<tokio::sync::OnceCell<aws_config::SdkConfig>>,
    extra_hosts: Vec<String>,
}

impl EcrLogins {
    /// Logins through the AWS configuration `options` describe.
    pub fn new(options: crate::aws::AwsOptions, extra_hosts: Vec<String>) -> Self {
        Self { options, sdk: Default::default(), extra_hosts }
    }

    /// Logins through an AWS configuration already loaded.
    pub fn with_sdk(sdk: aws_config::SdkConfig, extra_hosts: Vec<String>) -> Self {
        Self {
            options: Default::default(),
            sdk: std::sync::Arc::new(tokio::sync::OnceCell::new_with(Some(sdk))),
            extra_hosts,
        }
    }

    async fn sdk(&self) -> &aws_config::SdkConfig {
        self.sdk.get_or_init(|| crate::aws::sdk_config(&self.options)).await
    }
}

/// The account and region of an ECR registry host (`123456789012.dkr.ecr.eu-west-1.amazonaws.com`).
fn ecr_host(registry: &str) -> Option<(&str, &str)> {
    let (account, rest) = registry.split_once('.')?;
    let rest = rest.strip_prefix("dkr.ecr.").or_else(|| rest.strip_prefix("dkr.ecr-fips."))?;
    let (region, domain) = rest.split_once('.')?;
    let ok = account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && (domain == "amazonaws.com" || domain == "amazonaws.com.cn");
    ok.then_some((account, region))
}

/// Docker's default: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn default_docker_config() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker/config.json"))
}

/// The keys Docker files a registry's credentials under: the host itself, and for Docker Hub
/// the historical `https://index.docker.io/v1/`.
fn keys_for(registry: &str) -> Vec<String> {
    let mut keys = vec![registry.to_owned(), format!("https://{registry}"), format!("http://{registry}")];
    if matches!(registry, "docker.io" | "index.docker.io" | "registry-1.docker.io") {
        keys.extend(["https://index.docker.io/v1/".to_owned(), "index.docker.io".to_owned(), "docker.io".to_owned()]);
    }
    keys
}

impl CredentialStore {
    pub fn new(config: Option<PathBuf>) -> Self {
        Self { config, helpers_in: None, ecr: None }
    }

    /// Also logs in to ECR registries with tokens from `ecr`.
    pub fn with_ecr(mut self, ecr: EcrLogins) -> Self {
        self.ecr = Some(ecr);
        self
    }

    /// The login for `registry`: the Docker config's, else ECR's for an ECR host.
    pub async fn login_for(&self, registry: &str) -> Result<Option<Login>, ImageError> {
        if let Some(login) = self.docker_login_for(registry).await? {
            return Ok(Some(login));
        }
        match &self.ecr {
            Some(ecr) if ecr_host(registry).is_some() || ecr.extra_hosts.iter().any(|h| h == registry) => {
                ecr_login(ecr, registry).await.map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The login for `registry`, if the Docker config names one. A config that exists but
    /// does not parse, or a helper that fails, is an error naming it (not a silent anonymous
    /// pull).
    async fn docker_login_for(&self, registry: &str) -> Result<Option<Login>, ImageError> {
        let Some(path) = &self.config else { return Ok(None) };
        let config = match tokio::fs::read(path).await {
            Ok(bytes) => serde_json::from_slice::<DockerConfig>(&bytes).map_err(|e| misconfigured(path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ImageError::io("reading the Docker config", path, e)),
        };
        let keys = keys_for(registry);
        if let Some(helper) = keys.iter().find_map(|k| config.cred_helpers.get(k)) {
            return self.run_helper(helper, registry).await;
        }
        for key in &keys {
            if let Some(entry) = config.auths.get(key) {
                if let Some(login) = entry_login(entry, path)? {
                    return Ok(Some(login));
                }
                // An entry without a secret: the secret is in the store (`docker login` with
                // a credsStore writes `{}` here).
                if let Some(store) = &config.creds_store {
                    return self.run_helper(store, registry).await;
                }
            }
        }
        match &config.creds_store {
            Some(store) => self.run_helper(store, registry).await,
            None => Ok(None),
        }
    }

    /// Runs `docker-credential-<helper> get` with `registry` on stdin, as Docker does.
    async fn run_helper(&self, helper: &str, registry: &str) -> Result<Option<Login>, ImageError> {
        let name = format!("docker-credential-{helper}");
        let program = match &self.helpers_in {
            Some(dir) if dir.join(&name).exists() => dir.join(&name),
            _ => PathBuf::from(&name),
        };
        run_helper(&program, registry).await
    }
}

fn misconfigured(path: &Path, e: impl std::fmt::Display) -> ImageError {
    ImageError::SourceMisconfigured {
        source_desc: format!("Docker config {}", path.display()),
        detail: format!("it is not valid JSON of Docker's config.json ({e}); fix it, or set registry.docker_config"),
    }
}

fn entry_login(entry: &AuthEntry, path: &Path) -> Result<Option<Login>, ImageError> {
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()
            .and_then(|raw| String::from_utf8(raw).ok())
            .ok_or_else(|| misconfigured(path, "an `auth` value is not base64 of user:password"))?;
        let (user, pass) =
            decoded.split_once(':').ok_or_else(|| misconfigured(path, "an `auth` value is not user:password"))?;
        return Ok(Some(Login { username: user.to_owned(), password: Secret::new(pass), expires: None }));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(Some(Login { username: u.clone(), password: Secret::new(p.clone()), expires: None })),
        _ => Ok(None),
    }
}

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

async fn run_helper(program: &Path, registry: &str) -> Result<Option<Login>, ImageError> {
    use tokio::io::AsyncWriteExt;
    let program = program.display().to_string();
    let fail = |detail: String| ImageError::SourceMisconfigured { source_desc: format!("registry {registry}"), detail };
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("the Docker config names the credential helper {program}, which could not run ({e}); install it or remove it from the config")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(registry.as_bytes()).await.map_err(|e| fail(format!("writing to {program}: {e}")))?;
    }
    let out = child.wait_with_output().await.map_err(|e| fail(format!("waiting for {program}: {e}")))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stdout);
        // Docker's helpers say this when they hold nothing for the registry: pull anonymously.
        if said.contains("credentials not found") {
            return Ok(None);
        }
        return Err(fail(format!("{program} get failed ({}): {}", out.status, said.trim())));
    }
    let answer: HelperAnswer = serde_json::from_slice(&out.stdout)
        .map_err(|e| fail(format!("{program} get answered something other than its JSON ({e})")))?;
    Ok(Some(Login { username: answer.username, password: Secret::new(answer.secret), expires: None }))
}

/// A login from ECR's `GetAuthorizationToken` (a base64 `AWS:<token>`, valid for 12 hours).
async fn ecr_login(ecr: &EcrLogins, registry: &str) -> Result<Login, ImageError> {
    use aws_sdk_ecr::error::ProvideErrorMetadata as _;
    let source_desc = format!("registry {registry}");
    let mut config = aws_sdk_ecr::config::Builder::from(ecr.sdk().await);
    if let Some((_, region)) = ecr_host(registry) {
        config = config.region(aws_sdk_ecr::config::Region::new(region.to_owned()));
    }
    let client = aws_sdk_ecr::Client::from_conf(config.build());
    // One token serves every registry the identity may read (ECR ignores registry ids).
    let answer = client.get_authorization_token().send().await.map_err(|e| {
        let detail = format!(
            "ECR GetAuthorizationToken for {registry}: {}",
            e.as_service_error()
                .and_then(|s| s.message())
                .map(str::to_owned)
                .unwrap_or_else(|| crate::image::error::error_chain(&e))
        );
        match e.raw_response().map(|r| r.status().as_u16()) {
            Some(401 | 403) => ImageError::AccessDenied {
                source_desc: source_desc.clone(),
                detail: format!("{detail}; the worker's AWS identity needs ecr:GetAuthorizationToken"),
            },
            Some(400..=499) => ImageError::SourceMisconfigured { source_desc: source_desc.clone(), detail },
            _ => ImageError::Unavailable { source_desc: source_desc.clone(), detail },
        }
    })?;
    let data = answer.authorization_data().first().ok_or_else(|| ImageError::SourceMisconfigured {
        source_desc: source_desc.clone(),
        detail: "ECR GetAuthorizationToken answered without authorization data".into(),
    })?;
    let decoded = data
        .authorization_token()
        .and_then(|t| base64::engine::general_purpose::STANDARD.decode(t).ok())
        .and_then(|raw| String::from_utf8(raw).ok())
        .ok_or_else(|| ImageError::SourceMisconfigured {
            source_desc: source_desc.clone(),
            detail: "ECR's authorization token is not base64 of user:password".into(),
        })?;
    let (user, pass) = decoded.split_once(':').ok_or_else(|| ImageError::SourceMisconfigured {
        source_desc,
        detail: "ECR's authorization token is not user:password".into(),
    })?;
    let expires = data.expires_at().and_then(|t| std::time::SystemTime::try_from(*t).ok());
    Ok(Login { username: user.to_owned(), password: Secret::new(pass), expires })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn logins_come_from_auths_and_helpers() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        let helper = dir.path().join("docker-credential-test");
        std::fs::write(
            &helper,
            "#!/bin/sh\nread host\n[ \"$host\" = helped.example ] || { echo 'credentials not found in native keychain'; exit 1; }\necho '{\"ServerURL\":\"helped.example\",\"Username\":\"bob\",\"Secret\":\"tok\"}'\n",
        )
        .unwrap();
        std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::write(
            &config,
            serde_json::json!({
                "auths": {"reg.example:5000": {"auth": auth}, "https://index.docker.io/v1/": {"auth": base64::engine::general_purpose::STANDARD.encode("hub:pw")}},
                "credHelpers": {"helped.example": "test"},
            })
            .to_string(),
        )
        .unwrap();
        let store =
            CredentialStore { config: Some(config.clone()), helpers_in: Some(dir.path().to_owned()), ecr: None };
        let login = store.login_for("reg.example:5000").await.unwrap().unwrap();
        assert_eq!((login.username.as_str(), login.password.expose()), ("alice", "s3cret"));
        assert!(!format!("{login:?}").contains("s3cret"), "a secret never prints");
        assert_eq!(store.login_for("docker.io").await.unwrap().unwrap().username, "hub");
        let helped = store.login_for("helped.example").await.unwrap().unwrap();
        assert_eq!((helped.username.as_str(), helped.password.expose()), ("bob", "tok"));
        assert_eq!(store.login_for("other.example").await.unwrap(), None);

        std::fs::write(&config, "{not json").unwrap();
        let err = store.login_for("reg.example:5000").await.unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
        assert_eq!(CredentialStore::new(Some(dir.path().join("missing.json"))).login_for("x").await.unwrap(), None);
    }

    #[test]
    fn ecr_hosts_are_known_by_their_names() {
        assert_eq!(ecr_host("123456789012.dkr.ecr.eu-west-1.amazonaws.com"), Some(("123456789012", "eu-west-1")));
        assert_eq!(ecr_host("123456789012.dkr.ecr-fips.us-east-1.amazonaws.com"), Some(("123456789012", "us-east-1")));
        assert_eq!(ecr_host("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn"), Some(("123456789012", "cn-north-1")));
        for other in
            ["registry.example.com", "12345.dkr.ecr.eu-west-1.amazonaws.com", "123456789012.dkr.ecr.x.evil.com"]
        {
            assert_eq!(ecr_host(other), None, "{other}");
        }
    }
}
