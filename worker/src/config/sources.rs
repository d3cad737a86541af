//! Where settings come from, in order: the defaults, a TOML file, `THINPIPE_*` environment
//! variables, then `--set key=value` flags. Every source is checked against the known
//! settings: an unknown key, a misspelt variable or a bad value is an error naming it.

use std::path::Path;

use anyhow::{Context, bail};

use super::Config;

impl Config {
    /// Loads the file (if any), then the environment, then `--set key=value` flags.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        sets: &[String],
    ) -> anyhow::Result<Config> {
        let mut value = toml::Value::try_from(Config::default()).context("encoding the defaults")?;
        let keys = leaf_keys(&value, "");
        if let Some(file) = file {
            let text =
                std::fs::read_to_string(file).with_context(|| format!("reading config file {}", file.display()))?;
            let from_file: toml::Value =
                toml::from_str(&text).with_context(|| format!("config file {} is not valid TOML", file.display()))?;
            merge(&mut value, from_file);
        }
        let env: std::collections::HashMap<String, String> = env.into_iter().collect();
        check_env_names(&value, &keys, env.keys())?;
        for key in &keys {
            let var = env_name(key);
            if let Some(v) = env.get(&var) {
                set(&mut value, key, v).with_context(|| format!("environment variable {var}"))?;
            }
        }
        for s in sets {
            let (key, v) = s.split_once('=').with_context(|| format!("--set {s:?}: expected KEY=VALUE"))?;
            if !keys.iter().any(|k| k == key) {
                let nearest = keys.iter().min_by_key(|k| strsim::levenshtein(k, key));
                match nearest.filter(|k| strsim::levenshtein(k, key) <= 2) {
                    Some(k) => {
                        bail!("--set {key}: unknown setting (did you mean {k}?); `worker config` lists every setting")
                    }
                    None => bail!("--set {key}: unknown setting; known settings: {}", keys.join(", ")),
                }
            }
            set(&mut value, key, v).with_context(|| format!("--set {key}"))?;
        }
        let mut config: Config = value.try_into().context("invalid configuration")?;
        config.resolve_paths();
        config.validate()?;
        Ok(config)
    }
}

/// `THINPIPE_*` variables that are not settings but are read by name elsewhere.
const NOT_SETTINGS: [&str; 6] = [
    "THINPIPE_CONFIG",     // --config
    "THINPIPE_QUEUE_PATH", // enqueue's --queue-path
    "THINPIPE_BUILD_ID",   // stamped into builds
    "THINPIPE_FAULT",      // fault points of test builds
    "THINPIPE_PAUSE",
    "THINPIPE_FAIL",
];

/// The environment variable of setting `key`: `queue.name` → `THINPIPE_QUEUE_NAME`.
fn env_name(key: &str) -> String {
    format!("THINPIPE_{}", key.replace('.', "_").to_uppercase())
}

/// Refuses a `THINPIPE_*` variable that looks like a setting but is none (a typo in an
/// EnvironmentFile must not pass silently, as `--set queue.nmae=x` does not): one in a
/// section's namespace (`THINPIPE_QUEUE_...`), or within two edits of a setting's name.
fn check_env_names<'a>(
    defaults: &toml::Value,
    keys: &[String],
    vars: impl Iterator<Item = &'a String>,
) -> anyhow::Result<()> {
    let known: Vec<String> = keys.iter().map(|k| env_name(k)).collect();
    let sections: Vec<String> = match defaults {
        toml::Value::Table(t) => t.iter().filter(|(_, v)| v.is_table()).map(|(k, _)| env_name(k) + "_").collect(),
        _ => Vec::new(),
    };
    let mut vars: Vec<&String> = vars.filter(|v| v.starts_with("THINPIPE_")).collect();
    vars.sort();
    for var in vars {
        if known.contains(var) || NOT_SETTINGS.contains(&var.as_str()) {
            continue;
        }
        let nearest = known.iter().min_by_key(|k| strsim::levenshtein(k, var));
        let close = nearest.filter(|k| strsim::levenshtein(k, var) <= 2);
        if close.is_some() || sections.iter().any(|s| var.starts_with(s.as_str())) {
            let hint = match nearest {
                Some(k) => format!(" (did you mean {k}?)"),
                None => String::new(),
            };
            bail!(
                "environment variable {var} is not a setting{hint}: fix its name or unset it; `worker config` lists every setting"
            );
        }
    }
    Ok(())
}

fn leaf_keys(v: &toml::Value, prefix: &str) -> Vec<String> {
    match v {
        toml::Value::Table(t) => t
            .iter()
            .flat_map(|(k, v)| {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                leaf_keys(v, &key)
            })
            .collect(),
        _ => vec![prefix.to_owned()],
    }
}

fn merge(into: &mut toml::Value, from: toml::Value) {
    match (into, from) {
        (toml::Value::Table(a), toml::Value::Table(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Sets dotted `key` to `raw`, read as a TOML value of the default's type.
fn set(root: &mut toml::Value, key: &str, raw: &str) -> anyhow::Result<()> {
    let mut cur = root;
    let parts: Vec<&str> = key.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        cur = cur.get_mut(*part).with_context(|| format!("unknown setting {key}"))?;
    }
    let last = parts[parts.len() - 1];
    let table = cur.as_table_mut().with_context(|| format!("unknown setting {key}"))?;
    let old = table.get(last).with_context(|| format!("unknown setting {key}"))?;
    let new = match old {
        toml::Value::String(_) => toml::Value::String(raw.to_owned()),
        toml::Value::Integer(_) => {
            toml::Value::Integer(raw.parse().with_context(|| format!("{key}: {raw:?} is not an integer"))?)
        }
        toml::Value::Boolean(_) => {
            toml::Value::Boolean(raw.parse().with_context(|| format!("{key}: {raw:?} is not true or false"))?)
        }
        toml::Value::Float(_) => {
            toml::Value::Float(raw.parse().with_context(|| format!("{key}: {raw:?} is not a number"))?)
        }
        toml::Value::Array(_) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
        _ => bail!("{key} cannot be set from text"),
    };
    table.insert(last.to_owned(), new);
    Ok(())
}
