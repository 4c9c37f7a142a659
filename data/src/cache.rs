//! A split's tokens, read by range: a training rank reads each sample's window with one
//! positioned read instead of holding the corpus in memory.
//!
//! A dataset on the local disk is read where it is, each shard checked against its CRC-32C when
//! it is opened. One in an object store is read block by block (the manifest's `block_bytes`,
//! each with its own CRC-32C) with ranged reads, into a sparse copy of each shard in a cache
//! folder that the ranks of a machine share and that later attempts reuse: a block already
//! there is checked, not fetched again. The fetches run on a thread of their own, so a trainer
//! that says which samples it will read next ([`SplitTokens::prefetch`]) finds them on disk
//! when it gets there; [`IoStats`] counts how often, and how long, a read still waited.

use crate::manifest::{Dtype, ShardEntry, SplitName};
use crate::read::DatasetReader;
use crate::store::Location;
use object_store::ObjectStoreExt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where copies of remote datasets go: `GANTRY_DATA_CACHE`, else a folder in the temp dir.
pub fn default_dir() -> PathBuf {
    std::env::var_os("GANTRY_DATA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("gantry-datasets"))
}

/// Fetches at once ahead of need (a read that waits for a block is never queued behind them).
const PREFETCH_CONCURRENCY: usize = 4;

/// A dataset's three splits, ready to read.
pub struct Splits {
    pub train: SplitTokens,
    pub validation: SplitTokens,
    pub test: SplitTokens,
    /// What reading a remote dataset cost so far (none for a local one).
    pub io: Option<IoStats>,
}

/// One split's token stream.
pub struct SplitTokens {
    dtype: Dtype,
    /// Each shard and the stream offset of its first token.
    shards: Vec<(Shard, u64)>,
    total: u64,
}

enum Shard {
    /// A local dataset's file, checked when opened.
    Local(File),
    Remote(Arc<RemoteShard>),
}

impl SplitTokens {
    /// Tokens in the split's stream.
    pub fn len(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The shards holding tokens `[start, start + len)`, each with the byte range wanted of it.
    fn pieces(&self, start: u64, len: usize) -> Vec<(&Shard, u64, u64)> {
        assert!(start + len as u64 <= self.total, "read past the stream");
        let width = self.dtype.bytes() as u64;
        let end = start + len as u64;
        let mut pieces = Vec::new();
        if len == 0 {
            return pieces;
        }
        let mut i = self.shards.partition_point(|(_, first)| *first <= start) - 1;
        let mut at = start;
        while at < end {
            let (shard, first) = &self.shards[i];
            let shard_end = self.shards.get(i + 1).map_or(self.total, |(_, f)| *f);
            let to = end.min(shard_end);
            if to > at {
                pieces.push((shard, (at - first) * width, (to - first) * width));
            }
            at = to;
            i += 1;
        }
        pieces
    }

    /// Tokens `[start, start + len)` of the stream (which may span shards).
    pub fn read(&self, start: u64, len: usize) -> std::io::Result<Vec<u32>> {
        let mut out = Vec::with_capacity(len);
        for (shard, from, to) in self.pieces(start, len) {
            let mut bytes = vec![0u8; (to - from) as usize];
            match shard {
                Shard::Local(file) => file.read_exact_at(&mut bytes, from)?,
                Shard::Remote(remote) => remote.read(from, &mut bytes)?,
            }
            crate::read::decode(self.dtype, &bytes, &mut out);
        }
        Ok(out)
    }

    /// Starts fetching what a later `read(start, len)` needs, without waiting for it (nothing to
    /// do for a local dataset).
    pub fn prefetch(&self, start: u64, len: usize) {
        for (shard, from, to) in self.pieces(start, len) {
            if let Shard::Remote(remote) = shard {
                remote.prefetch(from, to);
            }
        }
    }
}

impl DatasetReader {
    /// Every split's tokens: a local dataset's own files (each checked against its checksum
    /// now), or a remote one's, fetched block by block as they are read or prefetched into
    /// `cache` (under the manifest's hash) and checked block by block.
    pub fn splits(&self, cache: &Path) -> anyhow::Result<Splits> {
        let io = IoStats::default();
        let fetcher = match self.location.local_root {
            Some(_) => None,
            None => Some(Fetcher::start(&self.location, &self.options, io.clone())?),
        };
        let split = |name| self.split_tokens(name, cache, fetcher.as_ref());
        Ok(Splits {
            train: split(SplitName::Train)?,
            validation: split(SplitName::Validation)?,
            test: split(SplitName::Test)?,
            io: fetcher.is_some().then_some(io),
        })
    }

    fn split_tokens(
        &self,
        split: SplitName,
        cache: &Path,
        fetcher: Option<&Fetcher>,
    ) -> anyhow::Result<SplitTokens> {
        let entry = self.manifest.split(split);
        let width = self.manifest.dtype.bytes() as u64;
        let mut shards = Vec::with_capacity(entry.shards.len());
        let mut first = 0;
        for shard in &entry.shards {
            // A manifest names files inside the dataset, never a path out of it (or of the cache).
            let name = Path::new(&shard.tokens_file);
            anyhow::ensure!(
                name.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_))),
                "dataset {}: manifest.json names shard {:?}, a path outside the dataset",
                self.location.url,
                shard.tokens_file
            );
            let bytes = shard.tokens * width;
            let opened = match (&self.location.local_root, fetcher) {
                (Some(root), _) => {
                    let path = root.join(&shard.tokens_file);
                    let got = file_checksum(&path)?;
                    let want = (shard.tokens_crc32c, bytes);
                    anyhow::ensure!(
                        got == want,
                        "dataset {}: {} fails its checksum (CRC-32C {:08x} of {} bytes, the \
                         manifest says {:08x} of {}): the file is truncated or corrupt",
                        self.location.url,
                        shard.tokens_file,
                        got.0,
                        got.1,
                        want.0,
                        want.1
                    );
                    Shard::Local(open(&path)?)
                }
                (None, Some(fetcher)) => {
                    let path = cache.join(&self.manifest_sha256).join(&shard.tokens_file);
                    Shard::Remote(Arc::new(RemoteShard::new(
                        self,
                        shard,
                        bytes,
                        path,
                        fetcher.clone(),
                    )?))
                }
                (None, None) => unreachable!("a remote dataset has a fetcher"),
            };
            shards.push((opened, first));
            first += shard.tokens;
        }
        Ok(SplitTokens {
            dtype: self.manifest.dtype,
            shards,
            total: first,
        })
    }
}

fn open(path: &Path) -> anyhow::Result<File> {
    File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// What reading a remote dataset cost: blocks fetched and found in the cache, and the reads
/// that had to wait for a block (a step waits for I/O only if the prefetch fell behind).
#[derive(Clone, Default)]
pub struct IoStats(Arc<Counters>);

#[derive(Default)]
struct Counters {
    fetched: AtomicU64,
    fetched_bytes: AtomicU64,
    cached: AtomicU64,
    waits: AtomicU64,
    waited_nanos: AtomicU64,
}

impl IoStats {
    pub fn fetched_blocks(&self) -> u64 {
        self.0.fetched.load(Ordering::Relaxed)
    }

    pub fn fetched_bytes(&self) -> u64 {
        self.0.fetched_bytes.load(Ordering::Relaxed)
    }

    pub fn cached_blocks(&self) -> u64 {
        self.0.cached.load(Ordering::Relaxed)
    }

    /// Reads that found their block not yet there.
    pub fn waits(&self) -> u64 {
        self.0.waits.load(Ordering::Relaxed)
    }

    /// How long those reads waited, in all.
    pub fn waited(&self) -> Duration {
        Duration::from_nanos(self.0.waited_nanos.load(Ordering::Relaxed))
    }
}

impl std::fmt::Display for IoStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} blocks ({:.1} MB) fetched by ranged reads, {} found in the cache; reads waited \
             for a block {} times, {:.3} s in all",
            self.fetched_blocks(),
            self.fetched_bytes() as f64 / 1e6,
            self.cached_blocks(),
            self.waits(),
            self.waited().as_secs_f64()
        )
    }
}

#[derive(Debug, Clone)]
enum Block {
    /// Neither checked in the cache nor asked for.
    Unknown,
    Fetching,
    /// In the cache file, checked.
    Ready,
    Failed(String),
}

/// A remote shard: its sparse copy in the cache and where each block of it stands.
struct RemoteShard {
    /// As the manifest names it, and the dataset's URL, for messages.
    name: String,
    url: String,
    object: object_store::path::Path,
    file: File,
    block_bytes: u64,
    len: u64,
    crcs: Vec<u32>,
    blocks: Mutex<Vec<Block>>,
    changed: Condvar,
    fetcher: Fetcher,
}

impl RemoteShard {
    fn new(
        reader: &DatasetReader,
        shard: &ShardEntry,
        len: u64,
        path: PathBuf,
        fetcher: Fetcher,
    ) -> anyhow::Result<Self> {
        let url = &reader.location.url;
        // A manifest without block checksums is read a whole shard at a time.
        let (block_bytes, crcs) = if shard.block_crc32c.is_empty() {
            (len.max(1), vec![shard.tokens_crc32c])
        } else {
            let block_bytes = reader.manifest.block_bytes;
            anyhow::ensure!(
                block_bytes > 0 && shard.block_crc32c.len() as u64 == len.div_ceil(block_bytes),
                "dataset {url}: manifest.json: {} has {} block checksums, not one per {} bytes \
                 of its {len}",
                shard.tokens_file,
                shard.block_crc32c.len(),
                block_bytes
            );
            (block_bytes, shard.block_crc32c.clone())
        };
        let dir = path.parent().expect("a cache path has a folder");
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        // Ranks of a machine share the copy: they may write the same block at once, with the
        // same bytes, and each checks a block before it trusts it.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if file.metadata()?.len() != len {
            file.set_len(len)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        let blocks = if len == 0 { 0 } else { crcs.len() };
        Ok(Self {
            name: shard.tokens_file.clone(),
            url: url.clone(),
            object: reader.location.path(&shard.tokens_file),
            file,
            block_bytes,
            len,
            crcs,
            blocks: Mutex::new(vec![Block::Unknown; blocks]),
            changed: Condvar::new(),
            fetcher,
        })
    }

    /// Byte range of block `b`.
    fn range(&self, b: usize) -> std::ops::Range<u64> {
        let start = b as u64 * self.block_bytes;
        start..(start + self.block_bytes).min(self.len)
    }

    fn blocks_of(&self, from: u64, to: u64) -> std::ops::Range<usize> {
        (from / self.block_bytes) as usize..to.div_ceil(self.block_bytes) as usize
    }

    fn prefetch(self: &Arc<Self>, from: u64, to: u64) {
        let mut blocks = self.blocks.lock().expect("block table");
        for b in self.blocks_of(from, to) {
            if matches!(blocks[b], Block::Unknown | Block::Failed(_)) {
                blocks[b] = Block::Fetching;
                self.fetcher.ask(Request {
                    shard: self.clone(),
                    block: b,
                    urgent: false,
                });
            }
        }
    }

    /// Bytes `[from, from + out.len())`, once every block they touch is in the cache file.
    fn read(self: &Arc<Self>, from: u64, out: &mut [u8]) -> std::io::Result<()> {
        let to = from + out.len() as u64;
        for b in self.blocks_of(from, to) {
            self.ensure(b)?;
        }
        self.file.read_exact_at(out, from)
    }

    fn ensure(self: &Arc<Self>, b: usize) -> std::io::Result<()> {
        let mut blocks = self.blocks.lock().expect("block table");
        let mut asked = false;
        let mut waiting: Option<Instant> = None;
        loop {
            match &blocks[b] {
                Block::Ready => break,
                Block::Failed(why) if asked => return Err(std::io::Error::other(why.clone())),
                Block::Fetching => {
                    waiting.get_or_insert_with(Instant::now);
                    blocks = self.changed.wait(blocks).expect("block table");
                }
                // Not asked for yet, or a prefetch failed: this read asks (once) itself.
                Block::Unknown | Block::Failed(_) => {
                    blocks[b] = Block::Fetching;
                    asked = true;
                    self.fetcher.ask(Request {
                        shard: self.clone(),
                        block: b,
                        urgent: true,
                    });
                }
            }
        }
        if let Some(since) = waiting {
            let stats = &self.fetcher.stats.0;
            stats.waits.fetch_add(1, Ordering::Relaxed);
            let nanos = since.elapsed().as_nanos() as u64;
            stats.waited_nanos.fetch_add(nanos, Ordering::Relaxed);
        }
        Ok(())
    }

    fn finish(&self, b: usize, outcome: Result<(), String>) {
        let mut blocks = self.blocks.lock().expect("block table");
        blocks[b] = match outcome {
            Ok(()) => Block::Ready,
            Err(why) => Block::Failed(why),
        };
        self.changed.notify_all();
    }

    /// Block `b` into the cache file: from the copy already there if it checks out, else by a
    /// ranged read, checked before it is written.
    async fn fetch(&self, store: &dyn object_store::ObjectStore, b: usize) -> Result<(), String> {
        let range = self.range(b);
        let want = self.crcs[b];
        let stats = &self.fetcher.stats.0;
        let mut there = vec![0u8; (range.end - range.start) as usize];
        if self.file.read_exact_at(&mut there, range.start).is_ok()
            && crc32c::crc32c(&there) == want
        {
            stats.cached.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let (url, name) = (&self.url, &self.name);
        let bytes = store
            .get_range(&self.object, range.clone())
            .await
            .map_err(|e| format!("dataset {url}: {name}: {e}"))?;
        let got = crc32c::crc32c(&bytes);
        if bytes.len() != there.len() || got != want {
            return Err(format!(
                "dataset {url}: {name}: bytes {}..{} fail their checksum (CRC-32C {got:08x} of \
                 {} bytes, the manifest says {want:08x} of {}): the file is truncated or corrupt",
                range.start,
                range.end,
                bytes.len(),
                there.len()
            ));
        }
        self.file
            .write_all_at(&bytes, range.start)
            .map_err(|e| format!("the dataset cache: {name}: {e}"))?;
        stats.fetched.fetch_add(1, Ordering::Relaxed);
        let len = bytes.len() as u64;
        stats.fetched_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

struct Request {
    shard: Arc<RemoteShard>,
    block: usize,
    /// A read waits for it: not queued behind the prefetches.
    urgent: bool,
}

/// The thread that fetches a remote dataset's blocks, with an object-store client of its own.
#[derive(Clone)]
struct Fetcher {
    ask: tokio::sync::mpsc::UnboundedSender<Request>,
    stats: IoStats,
}

impl Fetcher {
    fn start(
        location: &Location,
        options: &gantry_checkpoint::Options,
        stats: IoStats,
    ) -> anyhow::Result<Self> {
        // Its own client: one made on another runtime may hold connections only that runtime
        // drives.
        let store = Location::open(&location.url, options)?.store;
        let (ask, mut asked) = tokio::sync::mpsc::unbounded_channel::<Request>();
        let io = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("dataset-fetch".into())
            .spawn(move || {
                io.block_on(async move {
                    let ahead = Arc::new(tokio::sync::Semaphore::new(PREFETCH_CONCURRENCY));
                    let mut fetches = tokio::task::JoinSet::new();
                    // Until every split is dropped (and nothing is left to fetch).
                    while let Some(request) = asked.recv().await {
                        while fetches.try_join_next().is_some() {}
                        let (store, ahead) = (store.clone(), ahead.clone());
                        fetches.spawn(async move {
                            let _turn = match request.urgent {
                                true => None,
                                false => ahead.acquire_owned().await.ok(),
                            };
                            let outcome = request.shard.fetch(&*store, request.block).await;
                            request.shard.finish(request.block, outcome);
                        });
                    }
                    while fetches.join_next().await.is_some() {}
                })
            })?;
        Ok(Self { ask, stats })
    }

    fn ask(&self, request: Request) {
        if let Err(unsent) = self.ask.send(request) {
            // The thread is gone (it panicked): whoever waits learns why instead of hanging.
            let request = unsent.0;
            request.shard.finish(
                request.block,
                Err("the dataset's fetch thread stopped".into()),
            );
        }
    }
}

/// The CRC-32C and length of a file, read in pieces.
fn file_checksum(path: &Path) -> anyhow::Result<(u32, u64)> {
    use std::io::Read;
    let mut file = open(path)?;
    let (mut crc, mut len) = (0, 0);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if n == 0 {
            return Ok((crc, len));
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        len += n as u64;
    }
}
