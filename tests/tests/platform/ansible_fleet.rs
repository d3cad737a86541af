//! The Ansible role and playbooks, for real: lint (production profile, offline) and syntax
//! checks, then three hosts made by `tests/fleet/hosts.sh` (network namespaces with sshd and
//! a `systemd --user` manager each) and a moto server in a namespace of its own:
//!
//! 1. `site.yml` deploys build `fleet-v1` (btrfs on a loop file per host, SQS queues, S3
//!    images); every host is ready and runs v1; the rendered unit passes `systemd-analyze
//!    verify` (no output) and `security --offline`;
//! 2. a second run changes nothing; `--check --diff` changes nothing; no secret is printed;
//! 3. while activation jobs flow through the fleet queue, `upgrade.yml` rolls out
//!    `fleet-v2` in batches of one; h2 is given a queue that does not exist, so it never
//!    becomes ready: the play stops at h2's batch, h2 is rolled back and ready on v1, h3 is
//!    untouched (same process, v1), h1 runs v2;
//! 4. every job sent has exactly one result, and it succeeded.
//!
//! Needs root and what `scripts/test` sets up (`.venv-ansible` via `scripts/ansible-env`,
//! openssh-server, the two builds in `target/fleet/`); skips outside CI without them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use thinpipe_tests::{kill, wait_until};

const AWS: &str = "http://10.231.0.2:5000";
const HOSTS: [(&str, &str); 3] = [("h1", "10.231.0.11"), ("h2", "10.231.0.12"), ("h3", "10.231.0.13")];
/// moto accepts any credentials; this one must never appear in Ansible's output.
const SECRET: &str = "fleet-secret-never-printed";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// Whether the fleet test can run here; panics under CI when it cannot.
fn ready_to_run(needs_hosts: bool) -> bool {
    let mut missing = Vec::new();
    if !repo().join(".venv-ansible/bin/ansible-playbook").exists()
        || !repo().join("ansible/collections/ansible_collections/community/general").exists()
    {
        missing.push("the Ansible toolchain (scripts/ansible-env)");
    }
    if needs_hosts {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            missing.push("root");
        }
        if !Path::new("/usr/sbin/sshd").exists() {
            missing.push("openssh-server");
        }
        if !artifacts().join("v2/worker").exists() {
            missing.push("the two builds in target/fleet (scripts/test makes them)");
        }
        if !repo().join(".venv/bin/moto_server").exists() {
            missing.push("moto (scripts/test installs it)");
        }
    }
    if missing.is_empty() {
        return true;
    }
    assert!(std::env::var("CI").is_err(), "the Ansible tests need {}", missing.join(", "));
    eprintln!("skipping: the Ansible tests need {}", missing.join(", "));
    false
}

fn artifacts() -> PathBuf {
    std::env::var_os("THINPIPE_FLEET_ARTIFACTS").map_or_else(|| repo().join("target/fleet"), PathBuf::from)
}

fn ansible_cmd(tool: &str) -> Command {
    let venv = repo().join(".venv-ansible/bin");
    let mut cmd = Command::new(venv.join(tool));
    let path = format!("{}:{}", venv.display(), std::env::var("PATH").unwrap_or_default());
    cmd.current_dir(repo().join("ansible"))
        .env("PATH", path)
        .env("ANSIBLE_CONFIG", repo().join("ansible/ansible.cfg"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_FORCE_COLOR", "0");
    cmd
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn the_role_and_playbooks_pass_lint_and_syntax_checks() {
    if !ready_to_run(false) {
        return;
    }
    let lint = ansible_cmd("ansible-lint").output().expect("ansible-lint");
    assert!(lint.status.success(), "ansible-lint (production profile):\n{}", text(&lint));
    assert!(text(&lint).contains("Profile 'production' was required, and it passed"), "{}", text(&lint));
    for playbook in ["site.yml", "upgrade.yml", "drain.yml"] {
        let out = ansible_cmd("ansible-playbook")
            .args(["-i", "localhost,", "--syntax-check"])
            .arg(format!("playbooks/{playbook}"))
            .output()
            .expect("ansible-playbook");
        assert!(out.status.success(), "{playbook}: {}", text(&out));
    }
}

/// The role's config template, rendered by Ansible itself with values holding quotes,
/// backslashes and newlines, is read back by the worker with every value intact: a value
/// cannot break the file or add a setting.
#[test]
fn the_config_template_keeps_awkward_values_inside_their_strings() {
    if !ready_to_run(false) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let awkward = serde_json::json!({
        "thinpipe_worker_host_id": "h\"1\\",
        "thinpipe_worker_source": "dir:/srv/im\\ages \"new\"",
        "thinpipe_worker_state_dir": dir.path().join("st\"ate").to_str().unwrap(),
        "thinpipe_worker_volumes_dir": "/var/lib/thin\tpipe/vol\n[admin]\nlisten = \"0.0.0.0:1\"",
        "thinpipe_worker_aws_region": "eu-west-1",
        "thinpipe_worker_queue_url": "https://sqs.eu-west-1.amazonaws.com/1/jobs?x=\"y\"",
        "inventory_hostname": "unused",
    });
    let rendered = render(dir.path(), "worker.toml.j2", &awkward);
    let out = Command::new(thinpipe_tests::bin("worker"))
        .arg("--config")
        .arg(&rendered)
        .args(["config", "--json"])
        .output()
        .unwrap();
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: the worker did not read the rendered file: {}\n{}",
            text(&out),
            std::fs::read_to_string(&rendered).unwrap()
        )
    });
    assert_eq!(config["worker"]["host_id"], awkward["thinpipe_worker_host_id"]);
    assert_eq!(config["source"], awkward["thinpipe_worker_source"]);
    assert_eq!(config["state_dir"], awkward["thinpipe_worker_state_dir"]);
    assert_eq!(config["volumes_dir"], awkward["thinpipe_worker_volumes_dir"]);
    assert_eq!(config["queue"]["url"], awkward["thinpipe_worker_queue_url"]);
    assert_eq!(config["admin"]["listen"], "127.0.0.1:9185", "the value did not add a setting");
}

/// The role's template `template` rendered by Ansible with the role's defaults and `vars`,
/// into `dir`.
fn render(dir: &Path, template: &str, vars: &serde_json::Value) -> PathBuf {
    let vars_file = dir.join(format!("{template}.vars.json"));
    std::fs::write(&vars_file, vars.to_string()).unwrap();
    let rendered = dir.join(template.trim_end_matches(".j2"));
    let role = repo().join("ansible/roles/thinpipe_worker");
    let out = ansible_cmd("ansible")
        .args(["localhost", "-i", "localhost,", "-c", "local", "-m", "ansible.builtin.template", "-a"])
        .arg(format!("src={} dest={}", role.join("templates").join(template).display(), rendered.display()))
        .arg("-e")
        .arg(format!("@{}", role.join("defaults/main.yml").display()))
        .arg("-e")
        .arg(format!("@{}", role.join("vars/main.yml").display()))
        .arg("-e")
        .arg(format!("@{}", vars_file.display()))
        .output()
        .expect("ansible");
    assert!(out.status.success(), "ansible template {template}: {}", text(&out));
    rendered
}

/// The role's registry settings and signature policy, rendered by Ansible, are what the
/// worker reads: its `[registry]` settings, and a policy whose keys are the files the role
/// writes (`<config_dir>/cosign/<name>.pub`), loaded by the worker's own check.
#[test]
fn the_registry_settings_and_signature_policy_render_into_what_the_worker_reads() {
    if !ready_to_run(false) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("etc");
    std::fs::create_dir_all(config_dir.join("cosign")).unwrap();
    let key = p256::ecdsa::SigningKey::from_slice(&[5; 32]).unwrap();
    // What the role's "Write the cosign public keys" task writes.
    std::fs::write(config_dir.join("cosign/team-2026.pub"), thinpipe::image::signature::public_pem(&key)).unwrap();
    let vars = serde_json::json!({
        "thinpipe_worker_config_dir": config_dir.to_str().unwrap(),
        "thinpipe_worker_state_dir": dir.path().join("state").to_str().unwrap(),
        "thinpipe_worker_source": "registry.example.com/team/{family}:stable",
        "thinpipe_worker_registry_plain_http": ["10.0.0.5:5000"],
        "thinpipe_worker_registry_ecr_hosts": ["mirror.example.com"],
        "thinpipe_worker_registry_platform": "linux/arm64",
        "thinpipe_worker_queue_url": "https://sqs.eu-west-1.amazonaws.com/1/jobs",
        "thinpipe_worker_signature_policy": {
            "default": {"signature": "none"},
            "families": {"web": {"signature": "cosign", "keys": ["team-2026"]}, "open": {"signature": "none"}},
        },
        "inventory_hostname": "h1",
    });
    render(&config_dir, "policy.toml.j2", &vars);
    let rendered = render(&config_dir, "worker.toml.j2", &vars);
    let out = Command::new(thinpipe_tests::bin("worker"))
        .arg("--config")
        .arg(&rendered)
        .args(["config", "--json"])
        .output()
        .unwrap();
    let config: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", text(&out), std::fs::read_to_string(&rendered).unwrap()));
    assert_eq!(config["registry"]["plain_http"], vars["thinpipe_worker_registry_plain_http"]);
    assert_eq!(config["registry"]["ecr_hosts"], vars["thinpipe_worker_registry_ecr_hosts"]);
    assert_eq!(config["registry"]["platform"], "linux/arm64");
    assert_eq!(config["registry"]["policy_file"], config_dir.join("policy.toml").to_str().unwrap());
    let policy = thinpipe::image::signature::SignaturePolicy::load(&config_dir.join("policy.toml")).unwrap();
    assert_eq!(policy.signed_families(), ["web"], "web requires cosign; open and the default do not");
}

/// The hosts and the AWS namespace; torn down on drop, even when the test fails.
struct Fleet {
    dir: tempfile::TempDir,
    moto: Option<Child>,
}

impl Fleet {
    fn up() -> Fleet {
        let dir = tempfile::tempdir().expect("tempdir");
        let fleet = Fleet { dir, moto: None };
        let out = Command::new(repo().join("tests/fleet/hosts.sh")).arg("up").arg(fleet.dir.path()).output().unwrap();
        assert!(out.status.success(), "hosts.sh up: {}", text(&out));
        fleet
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("id_ed25519")
    }

    fn ssh(&self, ip: &str, script: &str) -> Output {
        Command::new("ssh")
            .args(["-q", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
            .arg("-i")
            .arg(self.key())
            .arg(format!("root@{ip}"))
            .arg(script)
            .output()
            .expect("ssh")
    }

    fn ssh_ok(&self, ip: &str, script: &str) -> String {
        let out = self.ssh(ip, script);
        assert!(out.status.success(), "on {ip}: {script}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// (`worker --version`, main pid, readiness JSON) of a host's worker.
    fn worker(&self, ip: &str) -> (String, String, String) {
        let version = self.ssh_ok(ip, "/usr/local/bin/worker --version");
        let pid = self.ssh_ok(ip, "systemctl show thinpipe-worker -p MainPID --value");
        let ready = self.ssh_ok(
            ip,
            "python3 -c 'import urllib.request as u, sys\ntry: print(u.urlopen(\"http://127.0.0.1:9185/readyz\").read().decode())\nexcept Exception as e: print(e.read().decode())'",
        );
        (version, pid, ready)
    }

    fn wait_ready(&self, ip: &str) {
        wait_until(&format!("{ip} to be ready"), Duration::from_secs(90), || {
            self.worker(ip).2.contains("\"ready\":true")
        });
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // A failing test shows what each worker said: the playbook's output says only that a
        // step timed out, the worker's log says why.
        if std::thread::panicking() {
            // What each worker was doing, from its admin API: the playbook's output only says
            // a step timed out.
            for (name, ip) in HOSTS {
                let script = "python3 - <<'EOF'
import json, urllib.parse, urllib.request as u
def get(path):
    try: return u.urlopen('http://127.0.0.1:9185' + path).read().decode()
    except Exception as e: return str(e)
print('/drain', get('/drain'))
runs = get('/api/runs?status=active&limit=5')
print('active runs', runs)
try: ids = [r['id'] for r in json.loads(runs)]
except Exception: ids = []
for i in ids: print(i, get('/api/runs/' + urllib.parse.quote(i, safe='')))
EOF";
                eprintln!("--- {name}: {}", text(&self.ssh(ip, script)));
            }
            // The hosts have no journald: a service's output goes to its manager's console log.
            for (name, _) in HOSTS {
                let log = self.dir.path().join(name).join("log/systemd.log");
                let all = std::fs::read_to_string(&log).unwrap_or_else(|e| format!("({}: {e})", log.display()));
                let tail: Vec<&str> = all.lines().rev().take(200).collect();
                eprintln!("--- {name}: the last 200 lines of {}", log.display());
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        if let Some(mut moto) = self.moto.take() {
            kill(&mut moto);
        }
        match Command::new(repo().join("tests/fleet/hosts.sh")).arg("down").arg(self.dir.path()).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("hosts.sh down failed: {}", text(&out)),
            Err(e) => eprintln!("hosts.sh down could not run: {e}"),
        }
    }
}

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).expect("artifact")))
}

/// The inventory for build `version`; `broken` hosts get a queue that does not exist.
fn inventory(fleet: &Fleet, version: &str, broken: &[&str]) -> PathBuf {
    let art = artifacts().join(version);
    let mut hosts = String::new();
    for (name, ip) in HOSTS {
        let queue = if broken.contains(&name) { "no-such-queue".to_owned() } else { format!("jobs-{name}") };
        let image = fleet.dir.path().join(name).join("volumes.img");
        hosts.push_str(&format!(
            "    {name}: {{ansible_host: {ip}, thinpipe_worker_queue_url: \"{AWS}/123456789012/{queue}\", thinpipe_worker_storage_device: \"{}\"}}\n",
            image.display()
        ));
    }
    let body = format!(
        r#"thinpipe_workers:
  hosts:
{hosts}  vars:
    ansible_user: root
    ansible_ssh_private_key_file: "{key}"
    ansible_ssh_common_args: "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
    thinpipe_worker_artifact_worker: "{worker}"
    thinpipe_worker_artifact_worker_sha256: "{worker_sha}"
    thinpipe_worker_artifact_enqueue: "{enqueue}"
    thinpipe_worker_artifact_enqueue_sha256: "{enqueue_sha}"
    thinpipe_worker_backend: btrfs
    thinpipe_worker_storage: btrfs
    thinpipe_worker_storage_size: 1G
    thinpipe_worker_queue_extra_urls: ["{AWS}/123456789012/jobs-fleet"]
    thinpipe_worker_dead_letter_url: "{AWS}/123456789012/dlq"
    thinpipe_worker_visibility_timeout_secs: 10
    thinpipe_worker_drain_deadline_secs: 20
    thinpipe_worker_source: "s3://images/prod"
    thinpipe_worker_aws_region: us-east-1
    thinpipe_worker_aws_endpoint: "{AWS}"
    thinpipe_worker_aws_s3_path_style: true
    thinpipe_worker_environment: {{AWS_ACCESS_KEY_ID: test, AWS_SECRET_ACCESS_KEY: "{SECRET}"}}
"#,
        key = fleet.key().display(),
        worker = art.join("worker").display(),
        worker_sha = sha256(&art.join("worker")),
        enqueue = art.join("enqueue").display(),
        enqueue_sha = sha256(&art.join("enqueue")),
    );
    let path = fleet.dir.path().join(format!("inventory-{version}.yml"));
    std::fs::write(&path, body).unwrap();
    path
}

fn playbook(inventory: &Path, playbook: &str, extra: &[&str]) -> (bool, String) {
    let out = ansible_cmd("ansible-playbook")
        .arg("-i")
        .arg(inventory)
        .arg(format!("playbooks/{playbook}"))
        .args(extra)
        .output()
        .expect("ansible-playbook");
    let t = text(&out);
    assert!(!t.contains(SECRET), "a secret was printed by {playbook}:\n{t}");
    (out.status.success(), t)
}

/// `host → (changed, failed)` from the PLAY RECAP.
fn recap(output: &str) -> std::collections::BTreeMap<String, (u32, u32)> {
    let after = output.rsplit_once("PLAY RECAP").map(|(_, r)| r).unwrap_or_default();
    let field = |line: &str, name: &str| -> u32 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
    };
    after
        .lines()
        .filter(|l| l.contains("changed="))
        .map(|l| {
            let host = l.split_whitespace().next().unwrap_or_default().to_owned();
            (host, (field(l, "changed"), field(l, "failed")))
        })
        .collect()
}

async fn aws_setup(fleet: &Fleet) -> aws_sdk_sqs::Client {
    let (config, _) = thinpipe::aws::test_config(AWS).await;
    let sqs = aws_sdk_sqs::Client::new(&config);
    for q in ["jobs-h1", "jobs-h2", "jobs-h3", "jobs-fleet", "results", "dlq"] {
        sqs.create_queue().queue_name(q).send().await.expect("create queue");
    }
    let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&config).force_path_style(true).build());
    s3.create_bucket().bucket("images").send().await.expect("create bucket");
    let images = fleet.dir.path().join("images-src");
    thinpipe::image::write_sample_family(&images, "web").unwrap();
    let out = Command::new(thinpipe_tests::bin("enqueue"))
        .args(["publish", "--family", "web", "--to", "s3://images/prod"])
        .arg(&images)
        .env("AWS_ENDPOINT_URL", AWS)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap();
    assert!(out.status.success(), "enqueue publish: {}", text(&out));
    sqs
}

/// Sends an activation to the fleet queue every 150 ms until `stop`; returns the ids sent.
fn job_flow(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (config, _) = thinpipe::aws::test_config(AWS).await;
            let sqs = aws_sdk_sqs::Client::new(&config);
            let mut sent = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let id = format!("inv-{}", sent.len());
                let body = serde_json::json!({"v": 1, "kind": "activate", "family": "web", "invocation_id": id,
                    "reply_to": format!("{AWS}/123456789012/results")});
                sqs.send_message()
                    .queue_url(format!("{AWS}/123456789012/jobs-fleet"))
                    .message_body(body.to_string())
                    .send()
                    .await
                    .expect("send a job");
                sent.push(id);
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            sent
        })
    })
}

/// Results until every id in `sent` has one, then a few seconds more for any duplicate.
async fn results(
    sqs: &aws_sdk_sqs::Client,
    sent: &[String],
) -> std::collections::BTreeMap<String, Vec<serde_json::Value>> {
    let url = format!("{AWS}/123456789012/results");
    let mut got: std::collections::BTreeMap<String, Vec<serde_json::Value>> = Default::default();
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut quiet_until: Option<Instant> = None;
    loop {
        let out = sqs.receive_message().queue_url(&url).max_number_of_messages(10).wait_time_seconds(1).send().await;
        for m in out.expect("receive results").messages.unwrap_or_default() {
            let v: serde_json::Value = serde_json::from_str(m.body().unwrap_or_default()).expect("result JSON");
            let id = v["invocation_id"].as_str().unwrap_or_default().to_owned();
            got.entry(id).or_default().push(v);
            sqs.delete_message()
                .queue_url(&url)
                .receipt_handle(m.receipt_handle().unwrap_or_default())
                .send()
                .await
                .unwrap();
        }
        let all = sent.iter().all(|id| got.contains_key(id));
        match (all, quiet_until) {
            (true, None) => quiet_until = Some(Instant::now() + Duration::from_secs(5)),
            (true, Some(t)) if Instant::now() > t => return got,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "results missing after 240 s: {:?}",
            sent.iter().filter(|id| !got.contains_key(*id)).collect::<Vec<_>>()
        );
    }
}

#[test]
fn three_hosts_deploy_converge_and_roll_an_upgrade_back_on_the_host_that_is_not_ready() {
    if !ready_to_run(true) {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut fleet = Fleet::up();
    let moto = Command::new("ip")
        .args(["netns", "exec", "tp-aws"])
        .arg(repo().join(".venv/bin/moto_server"))
        .args(["-H", "10.231.0.2", "-p", "5000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start moto");
    fleet.moto = Some(moto);
    wait_until("moto in tp-aws", Duration::from_secs(30), || std::net::TcpStream::connect("10.231.0.2:5000").is_ok());
    let sqs = rt.block_on(aws_setup(&fleet));

    // 1. Deploy v1.
    let v1 = inventory(&fleet, "v1", &[]);
    let (ok, out) = playbook(&v1, "site.yml", &[]);
    assert!(ok, "site.yml:\n{out}");
    for (name, ip) in HOSTS {
        assert!(recap(&out)[name].0 > 0, "{name} was not changed by the first deploy:\n{out}");
        fleet.wait_ready(ip);
        assert!(build_of(&fleet.worker(ip).0).ends_with("+fleet-v1"), "{name}: {:?}", fleet.worker(ip));
    }
    let unit = "/etc/systemd/system/thinpipe-worker.service";
    let verify = fleet.ssh(HOSTS[0].1, &format!("systemd-analyze verify {unit}"));
    assert!(verify.status.success() && text(&verify).trim().is_empty(), "systemd-analyze verify: {}", text(&verify));
    let security = fleet.ssh(HOSTS[0].1, &format!("systemd-analyze security --offline=true --threshold=60 {unit}"));
    assert!(security.status.success(), "systemd-analyze security (exposure above 6.0):\n{}", text(&security));
    let exposure =
        text(&security).lines().rev().find(|l| l.contains("Overall exposure")).unwrap_or_default().to_owned();
    println!("{exposure}");

    // 2. Converged: nothing changes, in a real run or in check mode with diffs.
    for extra in [&[][..], &["--check", "--diff"][..]] {
        let (ok, out) = playbook(&v1, "site.yml", extra);
        assert!(ok, "site.yml {extra:?}:\n{out}");
        for (name, _) in HOSTS {
            assert_eq!(recap(&out)[name], (0, 0), "{name} {extra:?}: expected changed=0:\n{out}");
        }
    }

    // 3. Upgrade to v2 in batches of one while jobs flow; h2 never becomes ready.
    let before: Vec<_> = HOSTS.iter().map(|(_, ip)| fleet.worker(ip)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let flow = job_flow(stop.clone());
    let v2 = inventory(&fleet, "v2", &["h2"]);
    let (ok, out) = playbook(
        &v2,
        "upgrade.yml",
        &["-e", r#"{"thinpipe_upgrade_batches": [1, 1, 1], "thinpipe_worker_upgrade_ready_retries": 10}"#],
    );
    stop.store(true, Ordering::SeqCst);
    let sent = flow.join().expect("job flow");
    assert!(!ok, "the upgrade should fail at h2's batch:\n{out}");
    assert!(out.contains("h2 did not become ready on the new version; rolled back"), "{out}");
    let r = recap(&out);
    assert_eq!(r["h1"].1, 0, "{out}");
    assert_eq!(r["h2"].1, 1, "{out}");
    assert!(!r.contains_key("h3"), "h3 is in a later batch and must be untouched:\n{out}");

    let (h1, h2, h3) = (fleet.worker(HOSTS[0].1), fleet.worker(HOSTS[1].1), fleet.worker(HOSTS[2].1));
    assert!(build_of(&h1.0).ends_with("+fleet-v2") && h1.2.contains("\"ready\":true"), "h1: {h1:?}");
    assert!(build_of(&h2.0).ends_with("+fleet-v1"), "h2 rolled back to v1: {h2:?}");
    fleet.wait_ready(HOSTS[1].1);
    assert_eq!(h3, before[2], "h3 untouched: same version, same process, ready");

    // 4. Every job has exactly one result, and it succeeded.
    assert!(sent.len() >= 10, "only {} jobs were sent during the upgrade", sent.len());
    let got = rt.block_on(results(&sqs, &sent));
    for id in &sent {
        let rs = &got[id];
        assert_eq!(rs.len(), 1, "{id}: {rs:?}");
        assert_eq!(rs[0]["status"], "succeeded", "{id}: {}", rs[0]);
    }
    println!("{} jobs during the upgrade, each with one result", sent.len());
}

/// The version token of `worker --version` (`worker 0.1.0+fleet-v1 (commit …)` →
/// `0.1.0+fleet-v1`).
fn build_of(version: &str) -> &str {
    version.split_whitespace().nth(1).unwrap_or_default()
}
