//! Options for a checkpoint store's client: endpoints, regions, timeouts, named by
//! object_store's configuration keys (`aws_region`, `azure_storage_account_name`,
//! `google_bucket`, `timeout`…). A job spec and a worker's config file may set them; neither may
//! hold a secret, since the coordinator stores specs and config files get printed and copied.
//! Keys, tokens and passwords reach a worker through its environment (or `*_FILE`) only.

use object_store::aws::AmazonS3ConfigKey;
use object_store::azure::AzureConfigKey;
use object_store::gcp::GoogleConfigKey;
use std::str::FromStr;

/// Parts of a canonical key that mark its value as a credential.
const SECRET_PARTS: [&str; 7] = [
    "secret",
    "token",
    "access_key",
    "account_key",
    "sas",
    "service_account_key",
    "password",
];

/// The canonical name of option `key` for a store of URL `scheme`, or for any cloud's store
/// when `scheme` is `None` (a worker serves jobs on any of them). Refuses unknown keys, keys
/// for another cloud, any option for a local store, and credentials.
pub fn canonical(scheme: Option<&str>, key: &str) -> Result<String, String> {
    let s3 = || AmazonS3ConfigKey::from_str(key).map(|k| k.as_ref().to_string());
    let az = || AzureConfigKey::from_str(key).map(|k| k.as_ref().to_string());
    let gs = || GoogleConfigKey::from_str(key).map(|k| k.as_ref().to_string());
    let found = match scheme {
        Some("s3") => s3().ok(),
        Some("az" | "abfs" | "abfss" | "azure") => az().ok(),
        Some("gs") => gs().ok(),
        Some(other) => return Err(format!("a {other}:// store takes no options")),
        None => s3().or_else(|_| az()).or_else(|_| gs()).ok(),
    };
    let scope = scheme.map_or("any object store".into(), |s| format!("{s}:// stores"));
    let canonical = found.ok_or_else(|| {
        format!(
            "not an option of {scope} (object_store's configuration keys, such as aws_region, \
             azure_storage_account_name or timeout)"
        )
    })?;
    if SECRET_PARTS.iter().any(|part| canonical.contains(part)) {
        return Err(format!(
            "{canonical} is a credential: give it to the workers through their environment \
             (or a {}_FILE), never in a spec or config file",
            canonical.to_uppercase()
        ));
    }
    Ok(canonical)
}

/// Whether option `key` (already checked by [`canonical`] for any store) applies to a store of
/// URL `scheme`.
pub fn applies(scheme: &str, key: &str) -> bool {
    canonical(Some(scheme), key).is_ok()
}

/// The scheme of a store URL (`s3`, `az`, …); `file` for a local path.
pub fn scheme_of(url: &str) -> String {
    match url.split_once("://") {
        Some(_) => url::Url::parse(url).map_or(String::new(), |u| u.scheme().to_string()),
        None => "file".into(),
    }
}

/// The options of the client of the store at `url`: the worker's that apply to its scheme, then
/// the spec's own over them.
pub fn for_url(
    url: &str,
    worker: &std::collections::BTreeMap<String, String>,
    spec: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<String, String> {
    let scheme = scheme_of(url);
    let mut options: std::collections::BTreeMap<String, String> = worker
        .iter()
        .filter(|(k, _)| applies(&scheme, k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    options.extend(spec.clone());
    options
}

/// A table of strings that also takes numbers and booleans (`aws_allow_http = true`), as
/// object_store's configuration takes every value as a string.
pub fn scalars_as_strings<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<String, String>, D::Error> {
    use serde::Deserialize;
    use serde::de::Error;
    let table = std::collections::BTreeMap::<String, serde_json::Value>::deserialize(d)?;
    table
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            serde_json::Value::Bool(_) | serde_json::Value::Number(_) => Ok((k, v.to_string())),
            other => Err(D::Error::custom(format!(
                "{k}: expected a string, number or boolean, found {other}"
            ))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_against_the_store_and_never_hold_secrets() {
        assert_eq!(canonical(Some("s3"), "aws_region").unwrap(), "aws_region");
        assert_eq!(canonical(Some("s3"), "endpoint").unwrap(), "aws_endpoint");
        assert_eq!(
            canonical(Some("az"), "azure_storage_account_name").unwrap(),
            "azure_storage_account_name"
        );
        assert!(canonical(Some("gs"), "timeout").is_ok());
        assert!(canonical(None, "azure_storage_use_emulator").is_ok());
        let no = |scheme, key| canonical(scheme, key).unwrap_err();
        assert!(no(Some("s3"), "aws_regoin").contains("not an option of s3:// stores"));
        assert!(no(Some("gs"), "aws_region").contains("gs://"));
        assert!(no(Some("file"), "timeout").contains("takes no options"));
        for secret in [
            "aws_secret_access_key",
            "aws_session_token",
            "azure_storage_account_key",
            "azure_storage_sas_key",
        ] {
            assert!(no(None, secret).contains("is a credential"), "{secret}");
        }
        assert!(applies("s3", "aws_endpoint") && !applies("az", "aws_endpoint"));
    }
}
