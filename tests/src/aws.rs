//! AWS fixtures on moto: a job queue with its dead-letter queue, a bucket, the credentials
//! the binaries need.

/// Credentials moto accepts, for the binaries' environment.
pub const AWS_ENV: [(&str, &str); 3] =
    [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1")];

/// A job queue and its dead-letter queue of this test's own.
pub struct Sqs {
    pub endpoint: String,
    pub client: aws_sdk_sqs::Client,
    pub jobs: String,
    pub dlq: String,
}

pub async fn sqs(endpoint: String) -> Sqs {
    let (config, _) = thinpipe::aws::test_config(&endpoint).await;
    let client = thinpipe::aws::sqs_client(&config);
    let suffix = format!("{:x}", rand::random::<u64>());
    let jobs = client.create_queue().queue_name(format!("jobs-{suffix}")).send().await.expect("creating a queue");
    let dlq = client.create_queue().queue_name(format!("dlq-{suffix}")).send().await.expect("creating a queue");
    let url = |o: Option<&str>| o.expect("moto returns a queue URL").to_owned();
    Sqs { endpoint, client, jobs: url(jobs.queue_url()), dlq: url(dlq.queue_url()) }
}

impl Sqs {
    /// The worker's environment for these queues, with a visibility timeout in seconds.
    pub fn worker_env<'a>(&'a self, visibility: &'a str) -> Vec<(&'a str, &'a str)> {
        let mut env = vec![
            ("THINPIPE_QUEUE_KIND", "sqs"),
            ("THINPIPE_QUEUE_URL", self.jobs.as_str()),
            ("THINPIPE_QUEUE_DEAD_LETTER_URL", self.dlq.as_str()),
            ("THINPIPE_AWS_ENDPOINT", self.endpoint.as_str()),
            ("THINPIPE_QUEUE_VISIBILITY_TIMEOUT_SECS", visibility),
        ];
        env.extend(AWS_ENV);
        env
    }
}

/// A new bucket of this test's own.
pub async fn bucket(endpoint: &str) -> (aws_sdk_s3::Client, String) {
    let (config, opts) = thinpipe::aws::test_config(endpoint).await;
    let client = thinpipe::aws::s3_client(&config, &opts);
    let name = format!("images-{:x}", rand::random::<u64>());
    client.create_bucket().bucket(&name).send().await.expect("creating a bucket");
    (client, name)
}
