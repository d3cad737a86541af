//! One AWS setup for SQS and S3: the standard credential chain and region (environment,
//! profile, instance role), `AWS_ENDPOINT_URL` and the per-service `AWS_ENDPOINT_URL_SQS` /
//! `AWS_ENDPOINT_URL_S3` overrides (read by `aws-config` itself), plus what the config file
//! can set: an explicit endpoint (a local server such as moto), path-style S3 addressing,
//! and anonymous access for public buckets.

use aws_config::meta::region::RegionProviderChain;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};

#[derive(Clone, Debug, Default)]
pub struct AwsOptions {
    /// Overrides the endpoint of every service (`http://127.0.0.1:5000` for moto).
    pub endpoint: Option<String>,
    /// Region if the environment names none; `us-east-1` otherwise.
    pub region: Option<String>,
    /// Send unsigned requests (public buckets).
    pub anonymous: bool,
    /// Path-style S3 URLs (`endpoint/bucket/key`), as local servers need.
    pub s3_path_style: bool,
    /// Fixed access key and secret instead of the credential chain (test servers).
    pub static_credentials: Option<(String, String)>,
    /// Limit on connecting; `None`: 5 s.
    pub connect_timeout: Option<Duration>,
    /// Limit on the first byte of a response; `None`: 30 s. (A body that stalls later is
    /// the blob cache's stall timeout's business.)
    pub read_timeout: Option<Duration>,
}

/// Loads the shared SDK configuration.
pub async fn sdk_config(opts: &AwsOptions) -> SdkConfig {
    let fallback = opts.region.clone().unwrap_or_else(|| "us-east-1".to_owned());
    let region = RegionProviderChain::default_provider().or_else(Region::new(fallback));
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(opts.connect_timeout.unwrap_or(Duration::from_secs(5)))
        .read_timeout(opts.read_timeout.unwrap_or(Duration::from_secs(30)))
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).region(region).timeout_config(timeouts);
    if let Some(endpoint) = &opts.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if opts.anonymous {
        loader = loader.no_credentials();
    } else if let Some((key, secret)) = &opts.static_credentials {
        let creds = aws_sdk_sqs::config::Credentials::new(key, secret, None, None, "thinpipe-static");
        loader = loader.credentials_provider(creds);
    }
    loader.load().await
}

pub fn sqs_client(config: &SdkConfig) -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(config)
}

/// Where this configuration's requests go, for messages: the explicit endpoint, or the
/// region's AWS endpoint.
pub fn endpoint_description(config: &SdkConfig) -> String {
    match (config.endpoint_url(), config.region()) {
        (Some(url), _) => url.to_owned(),
        (None, Some(region)) => format!("the AWS endpoint of region {region}"),
        (None, None) => "the AWS endpoint (no region configured)".to_owned(),
    }
}

pub fn s3_client(config: &SdkConfig, opts: &AwsOptions) -> aws_sdk_s3::Client {
    let s3 = aws_sdk_s3::config::Builder::from(config).force_path_style(opts.s3_path_style).build();
    aws_sdk_s3::Client::from_conf(s3)
}

/// The endpoint of the test server (`THINPIPE_TEST_AWS_ENDPOINT`, set by `scripts/test`).
/// Without it, AWS tests are skipped, except under CI, where they fail.
#[cfg(any(test, feature = "test-support"))]
pub fn test_endpoint() -> Option<String> {
    match std::env::var("THINPIPE_TEST_AWS_ENDPOINT") {
        Ok(e) if !e.is_empty() => Some(e),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("THINPIPE_TEST_AWS_ENDPOINT is not set: run the tests with ./scripts/test, which starts moto")
        }
        _ => {
            eprintln!("skipping: THINPIPE_TEST_AWS_ENDPOINT is not set (./scripts/test starts moto and sets it)");
            None
        }
    }
}

/// SDK options for the test server, with static test credentials.
#[cfg(any(test, feature = "test-support"))]
pub async fn test_config(endpoint: &str) -> (SdkConfig, AwsOptions) {
    let opts = AwsOptions {
        endpoint: Some(endpoint.to_owned()),
        region: Some("us-east-1".into()),
        anonymous: false,
        s3_path_style: true,
        // moto accepts any credentials.
        static_credentials: Some(("test".into(), "test".into())),
        ..AwsOptions::default()
    };
    (sdk_config(&opts).await, opts)
}
