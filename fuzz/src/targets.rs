//! The four fuzz targets: what each feeds its input to, what it asserts beyond "no panic", and
//! its built-in seeds and dictionary.

use gantry_checkpoint::Manifest;
use gantry_collective::tcp::{Identity, OPENING, admit, check_header};
use gantry_coordinator::convert;
use gantry_coordinator::core::{Core, CoreOptions, Resume};
use gantry_coordinator::store::Store;
use gantry_core::{JobSpec, WorkerId};
use gantry_proto::PROTOCOL_VERSION;
use gantry_proto::v1 as pb;
use prost::Message;

/// What is fuzzed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The job-spec loader: TOML or JSON text and `--set` overrides, then validation; a spec
    /// that loads must survive its own wire form unchanged.
    Spec,
    /// Every RPC's request message: protobuf decoding, then the coordinator's conversion and
    /// its core (an in-memory one), as the handlers call them.
    Proto,
    /// The data plane: a stranger's connection opening, and operation headers.
    Frame,
    /// Checkpoint manifests, and what a resume asks of one.
    Manifest,
}

impl Target {
    pub const ALL: [Target; 4] = [Target::Spec, Target::Proto, Target::Frame, Target::Manifest];

    pub fn name(self) -> &'static str {
        match self {
            Target::Spec => "spec",
            Target::Proto => "proto",
            Target::Frame => "frame",
            Target::Manifest => "manifest",
        }
    }

    pub(crate) fn state(self) -> State {
        match self {
            Target::Proto => State::Proto(Box::new(Coordinator::new())),
            other => State::Stateless(other),
        }
    }

    pub(crate) fn dictionary(self) -> &'static [&'static str] {
        match self {
            Target::Spec => &[
                "[model]",
                "[train]",
                "[parallel]",
                "[data]",
                "[checkpoint]",
                "[resources]",
                "kind = ",
                "\"llama\"",
                "\"bert\"",
                "\"gpt\"",
                "dp = ",
                "tp = ",
                "pp = ",
                "steps = ",
                "=",
                "\"",
                "{",
                "}",
                "[",
                "]",
                ",",
                "\n",
                "1e308",
                "nan",
                "inf",
                "-0.0",
                "4294967296",
                "\"dataset:",
                "init_from",
                "checkpoint.url=",
                "parallel.tp=",
                "model.layers=",
                "s3://",
                "file://",
                "http://169.254.169.254",
                "\n--set\n",
            ],
            Target::Manifest => &[
                "\"format\":",
                "\"dp\":",
                "\"tp\":",
                "\"pp\":",
                "\"world_size\":",
                "\"ranks\":",
                "\"files\":",
                "\"writers\":",
                "null",
                "[]",
                "{}",
                "4294967295",
                "18446744073709551615",
            ],
            Target::Proto | Target::Frame => &[],
        }
    }

    pub(crate) fn builtin_seeds(self) -> Vec<Vec<u8>> {
        match self {
            Target::Spec => vec![
                b"\x00name = \"m\"\n[model]\nkind = \"mlp\"\n[train]\nsteps = 10\nglobal_batch = 8\nlr = 0.01\n[parallel]\ndp = 2\n".to_vec(),
                b"\x01{\"name\":\"g\",\"model\":{\"kind\":\"gpt\",\"layers\":2,\"d_model\":32,\"heads\":4},\"train\":{\"steps\":5,\"global_batch\":8,\"lr\":0.001},\"parallel\":{\"dp\":1,\"tp\":2,\"pp\":2}}\n--set\ntrain.steps=7\nparallel.dp=2".to_vec(),
            ],
            Target::Proto => proto_seeds(),
            Target::Frame => {
                let mut opening = identity().hello(1).to_vec();
                opening.extend_from_slice(&[0u8; 16]);
                vec![[&[0u8][..], &opening].concat(), [&[1u8][..], &[0u8; 32]].concat()]
            }
            Target::Manifest => vec![
                br#"{"format":3,"job_id":"j","step":10,"attempt":1,"world_size":2,"dp":2,"tp":1,"pp":1,"ranks":[],"files":[]}"#.to_vec(),
            ],
        }
    }
}

/// A target with what it keeps between inputs.
pub(crate) enum State {
    Stateless(Target),
    Proto(Box<Coordinator>),
}

impl State {
    /// Runs one input; returns its outcome, in words.
    pub(crate) fn run(&mut self, input: &[u8]) -> String {
        match self {
            State::Stateless(Target::Spec) => spec(input),
            State::Stateless(Target::Frame) => frame(input),
            State::Stateless(Target::Manifest) => manifest(input),
            State::Proto(c) => c.run(input),
            State::Stateless(Target::Proto) => unreachable!("proto has a state"),
        }
    }
}

fn outcome<T, E: std::fmt::Display>(r: &Result<T, E>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("err: {e}"),
    }
}

/// The first byte picks JSON or TOML; the text may end with `\n--set\n` and one override a line.
fn spec(input: &[u8]) -> String {
    let Some((&kind, rest)) = input.split_first() else {
        return "empty".into();
    };
    let text = String::from_utf8_lossy(rest);
    let (text, overrides) = match text.split_once("\n--set\n") {
        Some((text, sets)) => (text, sets.lines().map(str::to_owned).collect()),
        None => (text.as_ref(), Vec::new()),
    };
    let loaded = JobSpec::from_text(text, kind & 1 == 1, "fuzz", &overrides);
    if let Ok(spec) = &loaded {
        // What the CLI sends is what the coordinator reads back.
        let wire = JobSpec::from_json(&spec.to_json());
        assert_eq!(
            wire.as_ref().ok(),
            Some(spec),
            "the wire form changed the spec"
        );
        let _ = spec.for_resume(&overrides);
    }
    match loaded {
        Ok(_) => "ok".into(),
        Err(e) => format!("err {}: {}", e.field, e.message),
    }
}

fn identity() -> Identity {
    Identity::new("fuzz-job", 3, [9; 32])
}

/// The first byte picks the opening of a connection (to rank 0 of 4, rank 2 already linked) or
/// an operation header.
fn frame(input: &[u8]) -> String {
    let Some((&kind, rest)) = input.split_first() else {
        return "empty".into();
    };
    if kind & 1 == 0 {
        let admitted = admit(rest, &identity(), 0, 4, &[true, false, true, false]);
        if let Some(peer) = admitted {
            assert!(
                rest.len() == OPENING && (peer == 1 || peer == 3),
                "admitted {peer}"
            );
        }
        format!("admit {admitted:?}")
    } else {
        let want = [7u8; 32];
        outcome(&check_header(rest, &want))
    }
}

fn manifest(input: &[u8]) -> String {
    let parsed = Manifest::parse(input);
    if let Ok(m) = &parsed {
        let mesh = m.mesh();
        let _ = m.writers();
        if mesh.world_size() <= 4096 {
            for rank in 0..mesh.world_size() {
                let _ = m.holder(mesh.coords(rank));
            }
        }
    }
    outcome(&parsed)
}

/// An in-memory coordinator core with one registered worker, fed decoded requests as the
/// handlers feed them.
pub(crate) struct Coordinator {
    core: Core,
    worker: WorkerId,
    now: i64,
    runs: u64,
}

impl Coordinator {
    fn new() -> Self {
        let options = CoreOptions {
            default_checkpoint_url: "file:///nonexistent/gantry-fuzz".into(),
            heartbeat_interval_ms: 100,
            lease_ttl_ms: 1_000,
            allowed_stores: Vec::new(),
        };
        let mut core = Core::load(Store::in_memory().expect("sqlite"), options, 0).expect("core");
        let registration = convert::registration(pb::RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            hostname: "fuzz".into(),
            slots: 4,
            devices: vec!["cpu".into()],
            ..Default::default()
        })
        .expect("a valid registration");
        let worker = core.register(registration, 0).expect("registers");
        Self {
            core,
            worker,
            now: 0,
            runs: 0,
        }
    }

    /// The first byte picks the request type; the rest is its encoding.
    fn run(&mut self, input: &[u8]) -> String {
        self.runs += 1;
        if self.runs.is_multiple_of(5_000) {
            *self = Self::new(); // keep the state (and memory) bounded
        }
        self.now += 7;
        let now = self.now;
        let Some((&kind, bytes)) = input.split_first() else {
            return "empty".into();
        };
        let core = &mut self.core;
        macro_rules! decoded {
            ($t:ty) => {
                match <$t>::decode(bytes) {
                    Ok(m) => m,
                    Err(e) => return format!("decode {}: {e}", stringify!($t)),
                }
            };
        }
        match kind % 11 {
            0 => {
                let m = decoded!(pb::SubmitJobRequest);
                outcome(&core.submit_as(&m.spec_json, "fuzz", now))
            }
            1 => {
                let m = decoded!(pb::GetJobRequest);
                outcome(&convert::job_id(&m.job_id).and_then(|id| {
                    core.attempts(&id)?;
                    core.job(&id).map(convert::job)
                }))
            }
            2 => {
                let m = decoded!(pb::CancelJobRequest);
                outcome(&convert::job_id(&m.job_id).and_then(|id| core.cancel_as(&id, "f", now)))
            }
            3 => {
                let m = decoded!(pb::ResumeJobRequest);
                let from = Resume {
                    step: m.from_step,
                    in_store: m.from_step_in_store,
                };
                outcome(
                    &convert::job_id(&m.job_id)
                        .and_then(|id| core.resume_as(&id, from, &m.set, "f", now)),
                )
            }
            4 => {
                let m = decoded!(pb::ListCheckpointsRequest);
                outcome(&convert::job_id(&m.job_id).and_then(|id| core.checkpoints(&id)))
            }
            5 => {
                let m = decoded!(pb::WatchJobRequest);
                outcome(
                    &convert::job_id(&m.job_id)
                        .and_then(|id| core.events_after(&id, m.after_seq, 500)),
                )
            }
            6 => {
                let m = decoded!(pb::CreateTokenRequest);
                outcome(&gantry_coordinator::auth::Role::parse(&m.role))
            }
            7 => {
                let m = decoded!(pb::RegisterRequest);
                outcome(&convert::registration(m).and_then(|r| core.register(r, now)))
            }
            8 => {
                let m = decoded!(pb::WorkerMessage);
                let worker = self.worker.clone();
                outcome(
                    &convert::worker_report(m.body)
                        .and_then(|r| core.on_worker_message(&worker, r, now)),
                )
            }
            9 => {
                let m = decoded!(pb::RendezvousRequest);
                let groups = m.nccl_groups.into_iter().map(convert::nccl_group).collect();
                outcome(
                    &convert::rank_key(m.key, "key")
                        .and_then(|key| core.rendezvous(&key, m.address, groups, now)),
                )
            }
            _ => {
                let m = decoded!(pb::RevokeTokenRequest);
                format!("revoke {}", m.id.len())
            }
        }
    }
}

/// Each request type's typical encoding.
fn proto_seeds() -> Vec<Vec<u8>> {
    let spec = r#"{"name":"f","model":{"kind":"mlp"},"train":{"steps":3,"global_batch":8,"lr":0.1},"parallel":{"dp":2}}"#;
    let key = Some(pb::RankKey {
        job_id: "f-000001".into(),
        attempt: 1,
        rank: 0,
    });
    let tagged = |kind: u8, m: &dyn Fn() -> Vec<u8>| [vec![kind], m()].concat();
    vec![
        tagged(0, &|| {
            pb::SubmitJobRequest {
                spec_json: spec.into(),
            }
            .encode_to_vec()
        }),
        tagged(1, &|| {
            pb::GetJobRequest {
                job_id: "f-000001".into(),
            }
            .encode_to_vec()
        }),
        tagged(3, &|| {
            pb::ResumeJobRequest {
                job_id: "f-000001".into(),
                from_step: Some(2),
                from_step_in_store: false,
                set: vec!["parallel.dp=1".into()],
            }
            .encode_to_vec()
        }),
        tagged(7, &|| {
            pb::RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                hostname: "h".into(),
                slots: 2,
                devices: vec!["cpu".into(), "cuda".into()],
                gpus: vec![pb::Gpu {
                    index: 0,
                    name: "g".into(),
                    memory_bytes: 1 << 30,
                }],
                ..Default::default()
            }
            .encode_to_vec()
        }),
        tagged(8, &|| {
            pb::WorkerMessage {
                protocol_version: PROTOCOL_VERSION,
                worker_id: "w".into(),
                body: Some(pb::worker_message::Body::Heartbeat(pb::Heartbeat {})),
            }
            .encode_to_vec()
        }),
        tagged(9, &|| {
            pb::RendezvousRequest {
                protocol_version: PROTOCOL_VERSION,
                key: key.clone(),
                address: "127.0.0.1:1".into(),
                nccl_groups: vec![pb::NcclGroupId {
                    members: vec![0, 1],
                    unique_id: vec![1; 128],
                }],
                attempt_secret: String::new(),
            }
            .encode_to_vec()
        }),
    ]
}
