//! A split's tokens on the local disk, read by range: a training rank reads each sample's
//! window with one positioned read instead of holding the corpus in memory. A dataset on the
//! local disk is read where it is; one in an object store is first copied, shard by shard and
//! each checked against its CRC-32C, into a cache folder that the ranks of a machine share and
//! that later attempts reuse (a shard already there is checked, not fetched again).

use crate::manifest::{Dtype, SplitName};
use crate::read::DatasetReader;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Where copies of remote datasets go: `GANTRY_DATA_CACHE`, else a folder in the temp dir.
pub fn default_dir() -> PathBuf {
    std::env::var_os("GANTRY_DATA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("gantry-datasets"))
}

/// One split's token stream, on local files.
pub struct SplitTokens {
    dtype: Dtype,
    /// Each shard's file and the stream offset of its first token.
    shards: Vec<(File, u64)>,
    total: u64,
}

impl SplitTokens {
    /// Tokens in the split's stream.
    pub fn len(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Tokens `[start, start + len)` of the stream (which may span shards).
    pub fn read(&self, start: u64, len: usize) -> std::io::Result<Vec<u32>> {
        assert!(start + len as u64 <= self.total, "read past the stream");
        if len == 0 {
            return Ok(Vec::new());
        }
        let width = self.dtype.bytes();
        let mut out = Vec::with_capacity(len);
        let mut at = start;
        let end = start + len as u64;
        let mut shard = self.shards.partition_point(|(_, first)| *first <= at) - 1;
        while at < end {
            let (file, first) = &self.shards[shard];
            let shard_end = self.shards.get(shard + 1).map_or(self.total, |(_, f)| *f);
            let here = (end.min(shard_end) - at) as usize;
            let mut bytes = vec![0u8; here * width];
            file.read_exact_at(&mut bytes, (at - first) * width as u64)?;
            crate::read::decode(self.dtype, &bytes, &mut out);
            at += here as u64;
            shard += 1;
        }
        Ok(out)
    }
}

impl DatasetReader {
    /// The split's tokens on local files: the dataset's own for a local dataset, else copies
    /// in `cache` (under the manifest's hash). Every shard is checked against its checksum.
    pub async fn local_split(&self, split: SplitName, cache: &Path) -> anyhow::Result<SplitTokens> {
        let entry = self.manifest.split(split);
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
            let width = self.manifest.dtype.bytes() as u64;
            let want = (shard.tokens_crc32c, shard.tokens * width);
            let path = if let Some(root) = &self.location.local_root {
                let path = root.join(&shard.tokens_file);
                let got = file_checksum(&path)?;
                anyhow::ensure!(
                    got == want,
                    "dataset {}: {} fails its checksum (CRC-32C {:08x} of {} bytes, the manifest \
                     says {:08x} of {}): the file is truncated or corrupt",
                    self.location.url,
                    shard.tokens_file,
                    got.0,
                    got.1,
                    want.0,
                    want.1
                );
                path
            } else {
                let path = cache.join(&self.manifest_sha256).join(&shard.tokens_file);
                // A copy already there is used if it checks out; otherwise fetched (and checked
                // before it is written).
                if file_checksum(&path).ok() != Some(want) {
                    let bytes = self
                        .verified(&shard.tokens_file, shard.tokens_crc32c)
                        .await?;
                    write_atomically(&path, &bytes)?;
                }
                path
            };
            let file = File::open(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            shards.push((file, first));
            first += shard.tokens;
        }
        Ok(SplitTokens {
            dtype: self.manifest.dtype,
            shards,
            total: first,
        })
    }
}

/// The CRC-32C and length of a file, read in pieces.
fn file_checksum(path: &Path) -> anyhow::Result<(u32, u64)> {
    use std::io::Read;
    let mut file = File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
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

/// Writes `path` through a temporary file renamed into place, so ranks copying the same shard at
/// once never see each other's half-written files.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().expect("a cache path has a folder");
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let tmp = path.with_extension(format!("partial-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}
