//! Where a dataset or an input lives: a local path, or a URL any checkpoint store accepts.

use gantry_checkpoint::Options;
use object_store::ObjectStore;
use object_store::path::Path;
use std::sync::Arc;

/// An object store and a prefix in it.
#[derive(Clone)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
    /// As the user wrote it, for messages.
    pub url: String,
    pub local: bool,
    /// The folder itself, for a local one.
    pub local_root: Option<std::path::PathBuf>,
}

/// A local path becomes a `file://` URL of its absolute form; a URL stays as it is.
pub fn url_of(path_or_url: &str) -> anyhow::Result<String> {
    if path_or_url.contains("://") {
        return Ok(path_or_url.to_string());
    }
    let path =
        std::path::absolute(path_or_url).map_err(|e| anyhow::anyhow!("{path_or_url}: {e}"))?;
    Ok(format!("file://{}", path.display()))
}

impl Location {
    pub fn open(path_or_url: &str, options: &Options) -> anyhow::Result<Self> {
        let url = url_of(path_or_url)?;
        let local = url.starts_with("file://");
        // A local store takes no options (they are for the clouds' clients).
        let options = if local {
            Options::new()
        } else {
            options.clone()
        };
        let (store, prefix) = gantry_checkpoint::open_url(&url, &options)?;
        let local_root = local
            .then(|| url::Url::parse(&url).ok()?.to_file_path().ok())
            .flatten();
        Ok(Self {
            store,
            prefix,
            url: path_or_url.to_string(),
            local,
            local_root,
        })
    }

    /// The path of `name` under the prefix (`name` may hold `/`).
    pub fn path(&self, name: &str) -> Path {
        name.split('/')
            .fold(self.prefix.clone(), |p, part| p.join(part))
    }
}
