//! The fleet's queue and blob paths against moto's SQS and S3.
//!
//! One test binary per concern (each links the AWS SDK once); each module is one former
//! test file, described in its own header and in `tests/README.md`.

mod s3_e2e;
mod sqs_e2e;
