//! Reading a dataset back: its manifest (and that manifest's hash, which a job's checkpoints
//! keep), and each split's tokens with every shard's checksum verified.

use crate::manifest::{Dtype, FORMAT, Manifest, SplitName};
use crate::store::Location;
use gantry_checkpoint::Options;
use object_store::ObjectStoreExt;
use sha2::{Digest, Sha256};

pub struct DatasetReader {
    pub(crate) location: Location,
    /// What the store was opened with (a fetcher thread opens its own client with them).
    pub(crate) options: Options,
    pub manifest: Manifest,
    /// SHA-256 of `manifest.json`, in hex.
    pub manifest_sha256: String,
}

/// Appends the token ids of little-endian `bytes` of `dtype` to `out`.
pub(crate) fn decode(dtype: Dtype, bytes: &[u8], out: &mut Vec<u32>) {
    match dtype {
        Dtype::U16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]]))),
        ),
        Dtype::U32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
    }
}

/// SHA-256 of a manifest's bytes, in hex.
pub fn manifest_sha256(bytes: &[u8]) -> String {
    crate::tokenizer::hex(&Sha256::digest(bytes))
}

impl DatasetReader {
    /// Opens the dataset at `url` (a local path or an object-store URL).
    pub async fn open(url: &str, options: &Options) -> anyhow::Result<Self> {
        let location = Location::open(url, options)?;
        let bytes = match location.store.get(&location.path("manifest.json")).await {
            Ok(got) => got.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => anyhow::bail!(
                "dataset {url}: no manifest.json there (not a dataset, or its prepare did not \
                 finish)"
            ),
            Err(e) => anyhow::bail!("dataset {url}: {e}"),
        };
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| anyhow::anyhow!("dataset {url}: manifest.json: {e}"))?;
        anyhow::ensure!(
            manifest.format == FORMAT,
            "dataset {url}: format {} (this build reads format {FORMAT})",
            manifest.format
        );
        Ok(Self {
            location,
            options: options.clone(),
            manifest_sha256: manifest_sha256(&bytes),
            manifest,
        })
    }

    /// The bytes of the dataset's file `name`.
    pub(crate) async fn get(&self, name: &str) -> anyhow::Result<bytes::Bytes> {
        let url = &self.location.url;
        let failed = |e: object_store::Error| anyhow::anyhow!("dataset {url}: {name}: {e}");
        let got = self
            .location
            .store
            .get(&self.location.path(name))
            .await
            .map_err(failed)?;
        got.bytes().await.map_err(failed)
    }

    pub(crate) async fn verified(&self, name: &str, crc: u32) -> anyhow::Result<bytes::Bytes> {
        let url = &self.location.url;
        let bytes = self.get(name).await?;
        let got = crc32c::crc32c(&bytes);
        anyhow::ensure!(
            got == crc,
            "dataset {url}: {name} fails its checksum (CRC-32C {got:08x}, the manifest says \
             {crc:08x}): the file is truncated or corrupt"
        );
        Ok(bytes)
    }

    /// The split's packed token stream: its documents in order, each followed by the
    /// end-of-text token.
    pub async fn tokens(&self, split: SplitName) -> anyhow::Result<Vec<u32>> {
        let entry = self.manifest.split(split);
        let mut out = Vec::with_capacity(entry.tokens as usize);
        for shard in &entry.shards {
            let bytes = self
                .verified(&shard.tokens_file, shard.tokens_crc32c)
                .await?;
            let width = self.manifest.dtype.bytes();
            anyhow::ensure!(
                bytes.len() as u64 == shard.tokens * width as u64,
                "dataset {}: {} holds {} bytes, not the manifest's {} tokens",
                self.location.url,
                shard.tokens_file,
                bytes.len(),
                shard.tokens
            );
            decode(self.manifest.dtype, &bytes, &mut out);
        }
        Ok(out)
    }

    /// The dataset's `tokenizer.json`, checked against the manifest's hash.
    pub async fn tokenizer_json(&self) -> anyhow::Result<String> {
        let entry = &self.manifest.tokenizer;
        let url = &self.location.url;
        let bytes = self.get(&entry.file).await?;
        let json = String::from_utf8(bytes.to_vec())
            .map_err(|e| anyhow::anyhow!("dataset {url}: {}: {e}", entry.file))?;
        anyhow::ensure!(
            crate::tokenizer::sha256(&json) == entry.sha256,
            "dataset {url}: {} does not match the manifest's hash",
            entry.file
        );
        Ok(json)
    }

    /// The dataset's tokenizer, checked against the manifest's hash.
    pub async fn tokenizer(&self) -> anyhow::Result<tokenizers::Tokenizer> {
        let entry = &self.manifest.tokenizer;
        let url = &self.location.url;
        self.tokenizer_json()
            .await?
            .parse()
            .map_err(|e| anyhow::anyhow!("dataset {url}: {}: {e}", entry.file))
    }
}
