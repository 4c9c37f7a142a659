//! Fuzzing what Gantry reads from outside, on stable Rust: job specs (TOML, JSON, `--set`), the
//! messages of every RPC (decoded, then through the coordinator's conversions and core), the
//! data plane's connection opening and operation headers, and checkpoint manifests.
//!
//! A campaign mutates inputs from a corpus (kept in `fuzz/corpus/<target>/`) the way AFL's havoc
//! stage does: bit flips, random and "interesting" bytes and integers, insertions, deletions,
//! duplications, splices with other inputs and tokens from a dictionary, several at once. No
//! coverage instrumentation (cargo-fuzz and cargo-afl need nightly or a C toolchain of their
//! own); as feedback, an input whose outcome is new (a new error, by field and message with the
//! numbers taken out) joins the corpus, which steers mutation toward new validation paths. A
//! panic or a hang (an input running over `hang_after`) is a finding, reported with the input.

use rand::{Rng, RngCore, SeedableRng};
use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod targets;

pub use targets::Target;

/// What a campaign found.
#[derive(Debug, Default)]
pub struct Report {
    pub execs: u64,
    pub elapsed: Duration,
    /// Inputs whose outcome was new (they joined the corpus), seeds included.
    pub corpus: usize,
    /// Distinct outcomes seen.
    pub outcomes: usize,
    /// Inputs that panicked, with the panic's message.
    pub panics: Vec<(Vec<u8>, String)>,
    /// The slowest input's time.
    pub slowest: Duration,
}

impl Report {
    pub fn execs_per_sec(&self) -> f64 {
        self.execs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The seeds of `target`: the files of `dir` (none if it is missing) and the target's built-in
/// ones.
pub fn seeds(target: Target, dir: Option<&Path>) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut seeds = target.builtin_seeds();
    if let Some(dir) = dir
        && dir.exists()
    {
        let mut files: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for file in files {
            seeds.push(std::fs::read(file)?);
        }
    }
    Ok(seeds)
}

/// Runs `target` on mutations of `seeds` for `duration`. Returns at the first panic when
/// `stop_at_panic`. An input that runs longer than `hang_after` aborts the process after writing
/// it to `hang_file` (it cannot be interrupted in this process), so a hang is never silent.
pub fn campaign(
    target: Target,
    seeds: Vec<Vec<u8>>,
    duration: Duration,
    seed: u64,
    hang_after: Duration,
    hang_file: Option<std::path::PathBuf>,
) -> Report {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut state = target.state();
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    let mut outcomes = HashSet::new();
    let mut report = Report::default();
    let started = Instant::now();
    let current: Arc<Mutex<(Option<Instant>, Vec<u8>)>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let (current, done) = (current.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let current = current.lock().unwrap_or_else(|p| p.into_inner());
                if let (Some(since), input) = (&current.0, &current.1)
                    && since.elapsed() > hang_after
                {
                    if let Some(file) = &hang_file {
                        let _ = std::fs::write(file, input);
                    }
                    eprintln!(
                        "HANG: {target:?} ran an input for over {hang_after:?}: {:?}",
                        String::from_utf8_lossy(input)
                    );
                    std::process::abort();
                }
            }
        })
    };
    // Panics are findings, reported with their input, not printed as they happen.
    install_panic_hook();
    IN_CAMPAIGN.set(true);
    let mut queue = seeds.into_iter();
    while started.elapsed() < duration {
        let input = match queue.next() {
            Some(seed) => seed,
            None if corpus.is_empty() => Vec::new(),
            None => mutate(&mut rng, &corpus, target.dictionary()),
        };
        {
            let mut current = current.lock().unwrap_or_else(|p| p.into_inner());
            *current = (Some(Instant::now()), input.clone());
        }
        let began = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| state.run(&input)));
        let took = began.elapsed();
        current.lock().unwrap_or_else(|p| p.into_inner()).0 = None;
        report.execs += 1;
        report.slowest = report.slowest.max(took);
        match outcome {
            Ok(outcome) => {
                let key = normalise(&outcome);
                if std::env::var_os("GANTRY_FUZZ_SHOW").is_some() && !outcomes.contains(&key) {
                    eprintln!("new outcome: {key}");
                }
                // Past MAX_OUTCOMES, nothing more counts as new (memory stays bounded).
                if outcomes.len() < MAX_OUTCOMES && outcomes.insert(key) {
                    if corpus.len() < MAX_CORPUS {
                        corpus.push(input);
                    } else {
                        let i = rng.random_range(0..MAX_CORPUS);
                        corpus[i] = input;
                    }
                }
            }
            Err(_) => {
                let why = LAST_PANIC.take();
                report.panics.push((input, why));
                state = target.state();
            }
        }
    }
    IN_CAMPAIGN.set(false);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = watchdog.join();
    report.elapsed = started.elapsed();
    report.corpus = corpus.len();
    report.outcomes = outcomes.len();
    report
}

thread_local! {
    /// Whether this thread runs a campaign (its panics are findings, kept quiet).
    static IN_CAMPAIGN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The message of this thread's last panic in a campaign.
    static LAST_PANIC: std::cell::Cell<String> = const { std::cell::Cell::new(String::new()) };
}

/// One process-wide hook: a campaign thread's panic is recorded for its report; any other
/// thread's goes to the hook that was there before.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_CAMPAIGN.get() {
                LAST_PANIC.set(info.to_string());
            } else {
                previous(info);
            }
        }));
    });
}

/// An outcome without what the input put in it: its first line, without quoted text and
/// without words that hold a digit (numbers, hex ids), capped. "step 7" and "step 8", or two
/// unknown keys, are one outcome; a different field or check is another.
fn normalise(outcome: &str) -> String {
    let line = outcome.lines().next().unwrap_or_default();
    let mut unquoted = String::new();
    let mut quote = None;
    for c in line.chars() {
        match (quote, c) {
            (None, '"' | '`' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, c) => unquoted.push(c),
            _ => {}
        }
    }
    // Words an input can spell (keys, ids, hex) are not the outcome: keep short words of
    // letters, and up to the second colon (after it, messages quote what they were given).
    let head: String = unquoted.split(':').take(4).collect::<Vec<_>>().join(":");
    head.split_whitespace()
        .filter(|w| {
            w.len() <= 16
                && w.chars()
                    .all(|c| c.is_ascii_alphabetic() || "_.,-()".contains(c))
                && !w.chars().all(|c| c.is_ascii_hexdigit())
        })
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(80)
        .collect()
}

/// The most distinct outcomes a campaign remembers.
const MAX_OUTCOMES: usize = 1 << 20;

/// The most inputs a campaign keeps to mutate (a new one then replaces a random one).
const MAX_CORPUS: usize = 4096;

/// Integers that find boundary bugs, as AFL's "interesting values".
const INTERESTING: [i64; 12] = [
    0,
    1,
    -1,
    127,
    128,
    255,
    256,
    65_535,
    i32::MAX as i64,
    i32::MIN as i64,
    i64::MAX,
    i64::MIN,
];

/// One mutant of a corpus entry: one to eight havoc operations.
pub fn mutate(rng: &mut impl RngCore, corpus: &[Vec<u8>], dictionary: &[&str]) -> Vec<u8> {
    let mut out = corpus[rng.random_range(0..corpus.len())].clone();
    for _ in 0..rng.random_range(1..=8) {
        let len = out.len();
        match rng.random_range(0..9) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] = rng.random();
            }
            2 => {
                let at = rng.random_range(0..=len);
                let n = rng.random_range(1..=16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                out.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let from = rng.random_range(0..len);
                let to = rng.random_range(from..=len.min(from + 64));
                out.drain(from..to);
            }
            4 if len > 0 => {
                let from = rng.random_range(0..len);
                let to = rng.random_range(from..=len.min(from + 64));
                let piece = out[from..to].to_vec();
                let at = rng.random_range(0..=len);
                out.splice(at..at, piece);
            }
            5 => {
                let other = &corpus[rng.random_range(0..corpus.len())];
                if !other.is_empty() {
                    let from = rng.random_range(0..other.len());
                    let to = rng.random_range(from..=other.len());
                    let at = rng.random_range(0..=len);
                    out.truncate(at);
                    out.extend_from_slice(&other[from..to]);
                }
            }
            6 if !dictionary.is_empty() => {
                let word = dictionary[rng.random_range(0..dictionary.len())];
                let at = rng.random_range(0..=len);
                out.splice(at..at, word.bytes());
            }
            7 => {
                let value = INTERESTING[rng.random_range(0..INTERESTING.len())];
                let text = value.to_string();
                let at = rng.random_range(0..=len);
                if rng.random_bool(0.5) {
                    out.splice(at..at, text.bytes());
                } else {
                    let width = [1, 2, 4, 8][rng.random_range(0..4)];
                    let bytes = value.to_le_bytes();
                    let end = (at + width).min(out.len());
                    out.splice(at..end, bytes[..width].iter().copied());
                }
            }
            _ if len > 0 => {
                // A byte run: a long repeat finds quadratic paths and deep nesting.
                let at = rng.random_range(0..len);
                let n = rng.random_range(1..=512);
                let byte = out[at];
                out.splice(at..at, std::iter::repeat_n(byte, n));
            }
            _ => out.push(rng.random()),
        }
        out.truncate(1 << 16);
    }
    out
}
