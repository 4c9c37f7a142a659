//! What a job spec may make workers reach: every store URL (the checkpoint store, the dataset,
//! `init_from`) and every endpoint among its store options.
//!
//! Workers fetch what a spec names with the cluster's credentials and from inside its network,
//! so a submitter who may name any address could point them at internal services: the cloud
//! metadata address above all (169.254.169.254, which hands out the node's credentials). That
//! address and the rest of the link-local ranges are always refused. With a cluster allow-list
//! (`allowed_stores` in the coordinator's config), every URL and endpoint must also start with
//! one of its prefixes, at a path boundary: `s3://team-a/` admits `s3://team-a/run1`, not
//! `s3://team-a-evil/`.

use gantry_core::JobSpec;
use std::net::IpAddr;

/// Why a spec names something workers may not reach: the field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub field: String,
    pub why: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.why)
    }
}

/// Every place a spec names that workers will reach, by field: URLs, and the option values that
/// are endpoints (an object_store key ending in `endpoint` or `url`).
pub fn destinations(spec: &JobSpec) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if !spec.checkpoint.url.is_empty() {
        out.push(("checkpoint.url".to_string(), spec.checkpoint.url.clone()));
    }
    if let Some(dataset) = spec.dataset() {
        out.push(("data.source".to_string(), dataset.to_string()));
    }
    if let Some(from) = &spec.model.init_from {
        out.push(("model.init_from".to_string(), from.clone()));
    }
    for (section, options) in [
        ("checkpoint.options", &spec.checkpoint.options),
        ("data.options", &spec.data.options),
    ] {
        for (key, value) in options {
            let key_lower = key.to_ascii_lowercase();
            if key_lower.ends_with("endpoint") || key_lower.ends_with("url") {
                out.push((format!("{section}.{key}"), value.clone()));
            }
        }
    }
    out
}

/// A path without a scheme, as the URL a prefix is matched against.
fn as_url(place: &str) -> String {
    if place.contains("://") {
        place.to_string()
    } else {
        format!("file://{place}")
    }
}

/// Whether a host is a link-local or metadata address.
fn forbidden_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("metadata.google.internal")
        || host.eq_ignore_ascii_case("metadata")
    {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_link_local(),
        // fe80::/10, and AWS's IPv6 metadata address fd00:ec2::254.
        Ok(IpAddr::V6(ip)) => {
            (ip.segments()[0] & 0xffc0) == 0xfe80
                || ip == "fd00:ec2::254".parse::<IpAddr>().unwrap()
        }
        Err(_) => false,
    }
}

/// Whether `place` starts with `prefix` at a path boundary.
fn under(place: &str, prefix: &str) -> bool {
    match place.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Checks every destination of `spec` against the rules and the cluster's `allowed` prefixes
/// (none: only the rules).
pub fn check(spec: &JobSpec, allowed: &[String]) -> Result<(), Refused> {
    for (field, place) in destinations(spec) {
        let refuse = |why: String| Refused {
            field: field.clone(),
            why,
        };
        let url = as_url(&place);
        if url.split(['/', '\\']).any(|segment| segment == "..") {
            return Err(refuse(format!(
                "{place:?} climbs out of its directory (..)"
            )));
        }
        if let Ok(parsed) = url::Url::parse(&url)
            && let Some(host) = parsed.host_str()
            && forbidden_host(host)
        {
            return Err(refuse(format!(
                "{place:?} is a link-local or cloud metadata address, which workers never reach"
            )));
        }
        if !allowed.is_empty() && !allowed.iter().any(|prefix| under(&url, prefix)) {
            return Err(refuse(format!(
                "{place:?} is outside this cluster's allowed stores ({})",
                allowed.join(", ")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(set: &[&str]) -> JobSpec {
        let mut doc = serde_json::json!({
            "name": "t",
            "model": {"kind": "mlp"},
            "train": {"steps": 1, "global_batch": 8, "lr": 0.1},
        });
        for s in set {
            gantry_core::spec::apply_override(&mut doc, s).unwrap();
        }
        JobSpec::from_json(&serde_json::to_string(&doc).unwrap()).unwrap()
    }

    #[test]
    fn metadata_addresses_are_refused_by_field_whatever_the_allow_list() {
        for (set, field) in [
            (
                vec![
                    "checkpoint.url=\"s3://bucket/x\"",
                    "checkpoint.options.aws_endpoint=\"http://169.254.169.254/latest\"",
                ],
                "checkpoint.options.aws_endpoint",
            ),
            (
                vec![
                    "checkpoint.url=\"s3://bucket/x\"",
                    "checkpoint.options.aws_endpoint=\"http://[fd00:ec2::254]\"",
                ],
                "checkpoint.options.aws_endpoint",
            ),
            (
                vec![
                    "checkpoint.url=\"s3://b/x\"",
                    "checkpoint.options.aws_endpoint=\"http://metadata.google.internal/\"",
                ],
                "checkpoint.options.aws_endpoint",
            ),
        ] {
            let refused = check(&spec(&set), &[]).unwrap_err();
            assert_eq!(refused.field, field, "{refused}");
            assert!(refused.why.contains("metadata"), "{refused}");
        }
        assert!(check(&spec(&["checkpoint.url=\"s3://bucket/x\""]), &[]).is_ok());
    }

    #[test]
    fn an_allow_list_admits_its_prefixes_at_a_path_boundary_only() {
        let allowed = vec![
            "s3://team-a".to_string(),
            "http://minio.storage:9000".to_string(),
        ];
        let ok = spec(&[
            "checkpoint.url=\"s3://team-a/run-1\"",
            "checkpoint.options.aws_endpoint=\"http://minio.storage:9000\"",
        ]);
        assert_eq!(check(&ok, &allowed), Ok(()));
        for (set, field) in [
            (
                vec!["checkpoint.url=\"s3://team-a-evil/run\""],
                "checkpoint.url",
            ),
            (
                vec!["checkpoint.url=\"s3://team-a/../team-b\""],
                "checkpoint.url",
            ),
            (
                vec![
                    "checkpoint.url=\"s3://team-a/x\"",
                    "checkpoint.options.aws_endpoint=\"http://10.0.0.5:9000\"",
                ],
                "checkpoint.options.aws_endpoint",
            ),
            (vec!["checkpoint.url=\"file:///etc\""], "checkpoint.url"),
        ] {
            let refused = check(&spec(&set), &allowed).unwrap_err();
            assert_eq!(refused.field, field, "{set:?}: {refused}");
        }
    }
}
