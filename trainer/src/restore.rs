//! Where a rank resumes: the newest checkpoint every rank can use, read and verified shard by
//! shard, resharded when it was written at another layout.

use crate::job::RankJob;
use crate::report::Reporter;
use crate::reshard::{reshard, sources};
use gantry_checkpoint::{CheckpointError, CheckpointStore, Manifest, Shard};
use gantry_collective::{ReduceOp, World};
use gantry_core::{Mesh, Rank};
use std::collections::BTreeMap;

/// The checkpoint to resume from and this rank's shard of it: the newest committed step
/// (or `job.resume_step`) whose shards every rank read and found intact. Each rank reads only
/// the shard it needs and checks it against the manifest; an all-reduce of "mine is damaged"
/// makes every rank skip a step that any rank cannot use, so all resume from the same one.
///
/// A checkpoint written at another tensor- or pipeline-parallel layout is resharded: the rank
/// reads the shards that hold its stage's blocks (`sources`) and cuts its own from them
/// (`reshard`), for which `fresh` gives the record of its freshly built stage.
pub fn restore_point(
    job: &RankJob,
    mesh: Mesh,
    fresh: &dyn Fn() -> anyhow::Result<bytes::Bytes>,
    comm: &mut dyn World,
    reporter: &Reporter,
    store: &CheckpointStore,
    io: &tokio::runtime::Runtime,
) -> anyhow::Result<Option<(Manifest, Shard)>> {
    // A damaged checkpoint is skipped for the one before; a store that cannot
    // be read fails the attempt, whose restart tries again, rather than resume from further
    // back than it must.
    let unusable = |e: CheckpointError| {
        let partial = matches!(e, CheckpointError::Partial { .. });
        Unusable::of(store.is_damage(&e), partial, e.detail())
    };
    // `latest` first; the listing only when there is no pointer, or the step it names turns
    // out unusable (then the older listed steps follow it).
    let (mut candidates, mut listed) = match job.resume_step {
        Some(step) => (vec![step], true),
        None => match io.block_on(store.resume_pointer())? {
            Some(latest) => (vec![latest], false),
            None => (io.block_on(store.steps())?, true),
        },
    };
    let mut next = 0;
    while let Some(&step) = candidates.get(next) {
        next += 1;
        // Damage anywhere makes the step unusable for every rank; a store that cannot be read
        // anywhere, or a layout that cannot be resumed at all, is an error.
        let mine = match io.block_on(store.committed(step)) {
            Ok(manifest) if manifest.tp == mesh.tp && manifest.pp == mesh.pp => {
                // The layout is the same: the shard of this rank's position, whichever
                // replica wrote it, at whatever data-parallel degree.
                let source = manifest.holder(mesh.coords(job.rank.get()));
                io.block_on(store.read_verified_shard(&manifest, source))
                    .map(|shard| (manifest, shard))
                    .map_err(unusable)
            }
            Ok(manifest) => {
                let saved = manifest.mesh();
                let read = io.block_on(async {
                    let mut shards = BTreeMap::new();
                    for rank in sources(&job.spec, saved, mesh, job.rank.get()) {
                        shards.insert(
                            rank,
                            store.read_verified_shard(&manifest, Rank(rank)).await?,
                        );
                    }
                    Ok(shards)
                });
                match read {
                    // A checkpoint that cannot be resharded is an error, not damage: every
                    // older one has the same layout.
                    Ok(shards) => {
                        let shard =
                            reshard(&job.spec, saved, &shards, mesh, job.rank.get(), fresh()?)
                                .map_err(|e| {
                                    e.context(format!(
                                        "resharding the checkpoint at step {} from tp={} pp={} to \
                                     tp={} pp={}",
                                        manifest.step, saved.tp, saved.pp, mesh.tp, mesh.pp
                                    ))
                                })?;
                        Ok((manifest, shard))
                    }
                    Err(e) => Err(unusable(e)),
                }
            }
            Err(e) => Err(unusable(e)),
        };
        // 0: usable here, 1: damaged, 2: unreadable; the worst over every rank decides.
        let mut verdict = [match &mine {
            Ok(_) => 0.0,
            Err(u) if u.damaged => 1.0,
            Err(_) => 2.0,
        }];
        comm.world().all_reduce(&mut verdict, ReduceOp::Max)?;
        let (why, partial) = match mine {
            Ok(found) if verdict[0] == 0.0 => return Ok(Some(found)),
            Err(u) if !u.damaged => anyhow::bail!(
                "could not read the checkpoint at step {step} from its store: {}",
                u.why
            ),
            _ if verdict[0] == 2.0 => anyhow::bail!(
                "another rank could not read the checkpoint at step {step} from its store"
            ),
            Ok(_) => ("another rank's shard is damaged".to_string(), false),
            Err(u) => (u.why, u.partial),
        };
        if job.resume_step.is_some() {
            anyhow::bail!("checkpoint at step {step} cannot be resumed from: {why}");
        }
        // A partial step (no manifest) is the same for every rank: rank 0 reports it.
        if job.rank == Rank::LEADER || !partial {
            reporter.log(&format!("skipping checkpoint at step {step}: {why}"));
        }
        if !listed {
            candidates.extend(io.block_on(store.older_steps(step))?);
            listed = true;
        }
    }
    Ok(None)
}

/// Why a checkpoint cannot be resumed from here.
struct Unusable {
    /// The checkpoint is damaged (skip it for the one before), rather than unreadable.
    damaged: bool,
    /// It has no manifest.
    partial: bool,
    why: String,
}

impl Unusable {
    fn of(damaged: bool, partial: bool, why: String) -> Self {
        Self {
            damaged,
            partial,
            why,
        }
    }
}
