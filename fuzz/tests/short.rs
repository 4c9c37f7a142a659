//! A short fuzzing run of every target, from the corpus kept in the repository: no input may
//! panic or hang. (`gantry-fuzz TARGET --seconds 600` is the long run; README has its figures.)

use gantry_fuzz::{Target, campaign, seeds};
use std::path::Path;
use std::time::Duration;

fn short_run(target: Target) {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target.name());
    let seeds = seeds(target, Some(&corpus)).unwrap();
    assert!(seeds.len() >= 2, "{target:?}: a corpus of {}", seeds.len());
    let report = campaign(
        target,
        seeds,
        Duration::from_secs(8),
        7,
        Duration::from_secs(20),
        None,
    );
    assert!(
        report.execs > 100,
        "{target:?}: only {} execs",
        report.execs
    );
    assert!(
        report.outcomes > 3,
        "{target:?}: {} outcomes",
        report.outcomes
    );
    let panics: Vec<String> = report
        .panics
        .iter()
        .map(|(input, why)| format!("{why} on {:?}", String::from_utf8_lossy(input)))
        .collect();
    assert!(panics.is_empty(), "{target:?}: {panics:#?}");
}

#[test]
fn job_specs() {
    short_run(Target::Spec);
}

#[test]
fn rpc_messages() {
    short_run(Target::Proto);
}

#[test]
fn data_plane_openings_and_headers() {
    short_run(Target::Frame);
}

#[test]
fn checkpoint_manifests() {
    short_run(Target::Manifest);
}
