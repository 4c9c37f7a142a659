//! `prepare` on real text (the King James Bible, the Jargon File; `scripts/test` fetches them
//! from the package registries into `GANTRY_TEST_CORPORA`), read back through the reader, on
//! the local disk and in S3 (moto on loopback), and every bad input refused by name with
//! nothing written.

use gantry_data::clean::CleanOptions;
use gantry_data::input::{InvalidUtf8, TxtDocuments};
use gantry_data::prepare::{PrepareConfig, Quiet, TokenizerChoice};
use gantry_data::{DatasetReader, SplitName, prepare};
use gantry_testkit::Moto;
use object_store::ObjectStoreExt;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

fn corpora() -> PathBuf {
    PathBuf::from(std::env::var("GANTRY_TEST_CORPORA").expect(
        "GANTRY_TEST_CORPORA: the folder scripts/test-corpora fills (scripts/test sets it)",
    ))
}

fn corpus(name: &str) -> String {
    corpora().join(name).to_str().unwrap().to_string()
}

fn bible(out: &Path) -> PrepareConfig {
    let mut config = PrepareConfig::new(
        vec![corpus("kjv.txt")],
        out.to_str().unwrap().into(),
        TokenizerChoice::Train { vocab_size: 4096 },
    );
    config.input.txt_documents = TxtDocuments::Line;
    config
}

/// Each document of a split as the reader gives it back: the token stream cut at every
/// end-of-text token, decoded.
async fn documents(reader: &DatasetReader, split: SplitName) -> Vec<String> {
    let tokenizer = reader.tokenizer().await.unwrap();
    let eot = reader.manifest.tokenizer.end_of_text_id;
    let tokens = reader.tokens(split).await.unwrap();
    assert_eq!(
        tokens.last(),
        Some(&eot),
        "every document ends with end-of-text"
    );
    let mut docs: Vec<&[u32]> = tokens.split(|&t| t == eot).collect();
    docs.pop(); // what follows the last end-of-text: nothing
    docs.into_iter()
        .map(|ids| tokenizer.decode(ids, false).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bible_prepares_verifies_and_round_trips_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("kjv");
    let summary = prepare(&bible(&out), &Quiet).await.unwrap();
    let report = &summary.manifest.report;
    let text = std::fs::read_to_string(corpus("kjv.txt")).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(report.input.documents, lines.len() as u64);
    let c = &report.cleaning;
    // The Bible repeats some verses word for word ("And the LORD spake unto Moses, saying,").
    assert!(c.exact_duplicates > 50, "{c:?}");
    assert!(c.near_duplicates > 0, "{c:?}");
    assert_eq!(
        c.read,
        c.too_short + c.non_text + c.exact_duplicates + c.near_duplicates + c.kept
    );
    // The verses as cleaning leaves them (this text is ASCII: NFC changes nothing, runs of
    // spaces become one).
    let distinct: HashSet<String> = lines
        .iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert!(
        c.kept as usize <= distinct.len() && c.kept > 25_000,
        "{c:?}"
    );

    // The reader verifies every shard; decoded, each document is a verse of the input, byte
    // for byte, and no verse is in two splits.
    let reader = DatasetReader::open(out.to_str().unwrap(), &Default::default())
        .await
        .unwrap();
    assert_eq!(reader.manifest_sha256, summary.manifest_sha256);
    let mut seen: HashSet<String> = HashSet::new();
    let mut total = 0;
    for split in SplitName::ALL {
        let docs = documents(&reader, split).await;
        assert_eq!(docs.len() as u64, reader.manifest.split(split).documents);
        for doc in docs {
            assert!(distinct.contains(&doc), "not a verse: {doc:?}");
            assert!(seen.insert(doc), "a verse in two splits");
            total += 1;
        }
    }
    assert_eq!(total, c.kept);
    let train = reader.manifest.split(SplitName::Train).documents as f64 / total as f64;
    assert!((train - 0.8).abs() < 0.02, "train share {train}");
    // The manifest's tokenizer hash is the stored file's.
    let stored = std::fs::read(out.join("tokenizer.json")).unwrap();
    let hex: String = Sha256::digest(&stored)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(reader.manifest.tokenizer.sha256, hex);
    assert_eq!(reader.manifest.tokenizer.vocab_size, 4096);

    // Deterministic: the same input and settings give the same dataset.
    let again = dir.path().join("kjv-again");
    let mut config = bible(&again);
    config.out = out.to_str().unwrap().into();
    let refused = prepare(&config, &Quiet).await.unwrap_err().to_string();
    assert!(refused.contains("already holds a dataset"), "{refused}");
    config.out = again.to_str().unwrap().into();
    let second = prepare(&config, &Quiet).await.unwrap();
    for split in SplitName::ALL {
        assert_eq!(
            summary.manifest.split(split),
            second.manifest.split(split),
            "{split:?}"
        );
    }
    assert_eq!(summary.manifest.tokenizer, second.manifest.tokenizer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpt2s_tokenizer_gives_the_reference_ids() {
    let dir = tempfile::tempdir().unwrap();
    let gpt2 = corpora().join("gpt2");
    let tokenizer = gantry_data::tokenizer::gpt2(
        gpt2.join("encoder.json").to_str().unwrap(),
        gpt2.join("vocab.bpe").to_str().unwrap(),
    )
    .unwrap();
    let file = dir.path().join("tokenizer.json");
    tokenizer.save(&file, false).unwrap();
    let input = dir.path().join("hello.jsonl");
    std::fs::write(&input, "{\"text\": \"Hello world\"}\n").unwrap();
    let out = dir.path().join("ds");
    let mut config = PrepareConfig::new(
        vec![input.to_str().unwrap().into()],
        out.to_str().unwrap().into(),
        TokenizerChoice::File(file.to_str().unwrap().into()),
    );
    config.clean.min_chars = 1;
    config.split = [1.0, 0.0, 0.0];
    let summary = prepare(&config, &Quiet).await.unwrap();
    assert_eq!(summary.manifest.tokenizer.end_of_text_id, 50256);
    assert_eq!(summary.manifest.tokenizer.vocab_size, 50257);
    let reader = DatasetReader::open(out.to_str().unwrap(), &Default::default())
        .await
        .unwrap();
    assert_eq!(
        reader.tokens(SplitName::Train).await.unwrap(),
        [15496, 995, 50256]
    );
}

/// Everything under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flat_map(|e| {
            let path = e.unwrap().path();
            if path.is_dir() {
                files_under(&path)
            } else {
                vec![path]
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_by_name_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path.to_str().unwrap().to_string()
    };
    let empty = write("empty.txt", b"");
    let latin1 = write(
        "latin1.txt",
        b"caf\xe9 au lait, a long enough line\nsecond line here\n",
    );
    let array = write(
        "array.jsonl",
        b"{\"text\":\"a fine first document\"}\n[1, 2]\n",
    );
    let untexted = write("body.jsonl", b"{\"body\":\"no text field in this one\"}\n");
    let broken_tokenizer = write("tokenizer.json", b"{\"not\": \"a tokenizer\"}");
    let good = write(
        "good.txt",
        b"A first paragraph of plain text.\n\nA second paragraph of text.\n",
    );
    let out = dir.path().join("out");
    let config = |inputs: Vec<String>| {
        PrepareConfig::new(
            inputs,
            out.to_str().unwrap().into(),
            TokenizerChoice::Train { vocab_size: 300 },
        )
    };
    let cases: Vec<(PrepareConfig, String)> = vec![
        (
            config(vec![empty.clone()]),
            format!("inputs: {empty} held no document"),
        ),
        (
            config(vec![latin1.clone()]),
            format!("{latin1}:1: not valid UTF-8"),
        ),
        (
            config(vec![array.clone()]),
            format!("{array}:2: not a JSON object"),
        ),
        (
            config(vec![untexted.clone()]),
            format!("{untexted}:1: no \"text\" field with a string"),
        ),
        (
            config(vec![
                dir.path().join("missing.txt").to_str().unwrap().into(),
            ]),
            "missing.txt: no such file or folder".into(),
        ),
        (
            PrepareConfig {
                tokenizer: TokenizerChoice::File(broken_tokenizer.clone()),
                ..config(vec![good.clone()])
            },
            format!("tokenizer {broken_tokenizer}: does not parse as a tokenizer.json"),
        ),
        (
            PrepareConfig {
                split: [0.5, 0.5, 0.5],
                ..config(vec![good.clone()])
            },
            "split: [0.5, 0.5, 0.5] must be three fractions".into(),
        ),
    ];
    for (config, message) in cases {
        let err = format!("{:#}", prepare(&config, &Quiet).await.unwrap_err());
        assert!(err.contains(&message), "want {message:?}, got {err:?}");
        assert!(
            files_under(&out).is_empty(),
            "{message}: wrote {:?}",
            files_under(&out)
        );
    }
    // Skipping invalid UTF-8 instead counts it.
    let mut skip = config(vec![latin1, good]);
    skip.input.invalid_utf8 = InvalidUtf8::Skip;
    skip.clean = CleanOptions {
        min_chars: 1,
        ..CleanOptions::default()
    };
    skip.split = [1.0, 0.0, 0.0];
    let summary = prepare(&skip, &Quiet).await.unwrap();
    assert_eq!(summary.manifest.report.input.invalid_utf8, 1);
    assert_eq!(summary.manifest.report.input.documents, 2);

    // A dataset that is not there, and a shard damaged after the prepare.
    let missing = dir.path().join("nowhere");
    let err = DatasetReader::open(missing.to_str().unwrap(), &Default::default())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no manifest.json there"), "{err}");
    assert!(!missing.exists(), "opening created the folder");
    let shard = out.join("train/00000.tokens");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&shard, &bytes).unwrap();
    let reader = DatasetReader::open(out.to_str().unwrap(), &Default::default())
        .await
        .unwrap();
    let err = reader
        .tokens(SplitName::Train)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train/00000.tokens fails its checksum"),
        "{err}"
    );
    // A manifest that names a shard outside the dataset is refused before anything is read.
    let manifest = out.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace("train/00000.tokens", "../../etc/passwd"),
    )
    .unwrap();
    let reader = DatasetReader::open(out.to_str().unwrap(), &Default::default())
        .await
        .unwrap();
    let err = reader
        .splits(&dir.path().join("cache"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("a path outside the dataset"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_in_s3_reads_back_as_the_one_on_disk() {
    let moto = Moto::start("datasets");
    let options: gantry_data::Options = moto.options().into_iter().collect();
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("jargon");
    let config = |out: &str| {
        let mut c = PrepareConfig::new(
            vec![corpus("jargon.txt")],
            out.into(),
            TokenizerChoice::Train { vocab_size: 1024 },
        );
        c.store_options = options.clone();
        c
    };
    let on_disk = prepare(&config(local.to_str().unwrap()), &Quiet)
        .await
        .unwrap();
    let in_s3 = prepare(&config("s3://datasets/jargon"), &Quiet)
        .await
        .unwrap();
    assert!(on_disk.manifest.report.cleaning.kept > 1000);
    let disk = DatasetReader::open(local.to_str().unwrap(), &Default::default())
        .await
        .unwrap();
    let s3 = DatasetReader::open("s3://datasets/jargon", &options)
        .await
        .unwrap();
    assert_eq!(disk.manifest.tokenizer, s3.manifest.tokenizer);
    assert_eq!(in_s3.manifest_sha256, s3.manifest_sha256);
    for split in SplitName::ALL {
        assert_eq!(
            disk.tokens(split).await.unwrap(),
            s3.tokens(split).await.unwrap(),
            "{split:?}"
        );
    }
    let keys = moto.list("datasets", "jargon/");
    assert!(keys.contains("jargon/manifest.json") && keys.contains("jargon/train/00000.tokens"));

    // A local dataset is read where it is, nothing copied.
    let cache = dir.path().join("cache");
    let want = s3.tokens(SplitName::Train).await.unwrap();
    let in_place = disk.splits(&cache).unwrap();
    assert_eq!(in_place.train.read(0, want.len()).unwrap(), want);
    assert!(in_place.io.is_none());
    assert!(
        !cache.join(&disk.manifest_sha256).exists(),
        "a local dataset was copied"
    );
}

/// Training reads an S3 dataset block by block with ranged reads, into a cache: a window
/// fetches only the blocks it touches, a prefetched range is there before it is read, a block
/// already in the cache is checked and not fetched again (fetched again when the copy is
/// damaged), and a block damaged in the store is refused, naming the shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_in_s3_is_read_by_ranged_reads_through_a_cache() {
    let moto = Moto::start("ranged");
    let options: gantry_data::Options = moto.options().into_iter().collect();
    let dir = tempfile::tempdir().unwrap();
    let mut config = PrepareConfig::new(
        vec![corpus("jargon.txt")],
        "s3://ranged/jargon".into(),
        TokenizerChoice::Train { vocab_size: 1024 },
    );
    config.store_options = options.clone();
    config.block_bytes = 16 << 10;
    prepare(&config, &Quiet).await.unwrap();
    let s3 = DatasetReader::open("s3://ranged/jargon", &options)
        .await
        .unwrap();
    let want = s3.tokens(SplitName::Train).await.unwrap();
    let blocks = s3.manifest.train.shards[0].block_crc32c.len();
    assert!(blocks > 20, "{blocks} blocks");
    let cache = dir.path().join("cache");
    // Blocks of 8,192 u16 tokens: a window inside the third fetches it alone.
    let splits = s3.splits(&cache).unwrap();
    let io = splits.io.clone().unwrap();
    let at = 2 * 8192 + 100;
    assert_eq!(
        splits.train.read(at, 65).unwrap(),
        want[at as usize..][..65]
    );
    assert_eq!((io.fetched_blocks(), io.fetched_bytes()), (1, 16 << 10));
    assert_eq!(io.waits(), 1, "the read waited for its block");
    // A window across a block boundary fetches the next block only.
    let at = 3 * 8192 - 10;
    assert_eq!(
        splits.train.read(at, 65).unwrap(),
        want[at as usize..][..65]
    );
    assert_eq!(io.fetched_blocks(), 2);
    // Prefetched, a range is read without waiting.
    splits.train.prefetch(10 * 8192, 4 * 8192);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while io.fetched_blocks() < 6 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(io.fetched_blocks(), 6);
    let got = splits.train.read(10 * 8192, 4 * 8192).unwrap();
    assert_eq!(got, want[10 * 8192..14 * 8192]);
    assert_eq!(io.waits(), 2, "a prefetched read waited");
    drop(splits);

    // Later attempts find the blocks in the cache, checked; a damaged one is fetched again.
    let copy = cache.join(&s3.manifest_sha256).join("train/00000.tokens");
    let mut bytes = std::fs::read(&copy).unwrap();
    bytes[10 * (16 << 10) + 7] ^= 0xff;
    std::fs::write(&copy, &bytes).unwrap();
    let again = s3.splits(&cache).unwrap();
    let io = again.io.clone().unwrap();
    let got = again.train.read(10 * 8192, 4 * 8192).unwrap();
    assert_eq!(got, want[10 * 8192..14 * 8192]);
    assert_eq!((io.cached_blocks(), io.fetched_blocks()), (3, 1));
    // The whole stream, fetched block by block, is the stream.
    assert_eq!(again.train.read(0, want.len()).unwrap(), want);
    drop(again);

    // A shard damaged in the store: the block that holds the damage is refused, by name.
    let (store, prefix) = gantry_checkpoint::open_url("s3://ranged/jargon", &options).unwrap();
    let object = prefix.join("train").join("00000.tokens");
    let mut damaged = store
        .get(&object)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    damaged[30 * (16 << 10) + 1] ^= 0xff;
    store.put(&object, damaged.into()).await.unwrap();
    let fresh = s3.splits(&dir.path().join("fresh-cache")).unwrap();
    let err = fresh.train.read(30 * 8192, 65).unwrap_err().to_string();
    assert!(
        err.contains("train/00000.tokens: bytes 491520..507904 fail their checksum"),
        "{err}"
    );
    // The blocks around it still read.
    assert_eq!(
        fresh.train.read(29 * 8192, 65).unwrap(),
        want[29 * 8192..][..65]
    );
}

/// A window of the token stream read from the local files is the same slice of the stream
/// wherever it falls, across shard boundaries too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_read_across_shards_are_slices_of_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("jargon");
    let mut config = PrepareConfig::new(
        vec![corpus("jargon.txt")],
        out.to_str().unwrap().into(),
        TokenizerChoice::Train { vocab_size: 512 },
    );
    config.shard_tokens = 5_000;
    prepare(&config, &Quiet).await.unwrap();
    let reader = DatasetReader::open(out.to_str().unwrap(), &Default::default())
        .await
        .unwrap();
    let shards = reader.manifest.split(SplitName::Train).shards.len();
    assert!(shards > 10, "{shards} shards");
    let stream = reader.tokens(SplitName::Train).await.unwrap();
    let local = reader.splits(&dir.path().join("cache")).unwrap().train;
    assert_eq!(local.len(), stream.len() as u64);
    for start in (0..stream.len() - 70).step_by(997) {
        assert_eq!(
            local.read(start as u64, 65).unwrap(),
            stream[start..start + 65],
            "at {start}"
        );
    }
}

/// A vocabulary of more than 65,536 tokens does not fit u16: asked for, it is refused before
/// anything is written; by default the dataset is written in u32 and reads back the same ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vocabulary_past_u16_is_written_as_u32() {
    let dir = tempfile::tempdir().unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> =
        std::iter::once(("[UNK]".into(), 0.into()))
            .chain((1..70_000u32).map(|i| (format!("w{i}"), i.into())))
            .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    let file = dir.path().join("tokenizer.json");
    std::fs::write(&file, tokenizer.to_string()).unwrap();
    let input = dir.path().join("words.txt");
    std::fs::write(&input, "w1 w65535 w65536 w69999 w3\n").unwrap();
    let out = dir.path().join("ds");
    let mut config = PrepareConfig::new(
        vec![input.to_str().unwrap().into()],
        out.to_str().unwrap().into(),
        TokenizerChoice::File(file.to_str().unwrap().into()),
    );
    config.split = [1.0, 0.0, 0.0];
    config.dtype = Some(gantry_data::Dtype::U16);
    let err = prepare(&config, &Quiet).await.unwrap_err().to_string();
    assert!(
        err.starts_with("dtype: U16 cannot hold the ids of a vocabulary of 70001 tokens"),
        "{err}"
    );
    assert!(files_under(&out).is_empty());
    config.dtype = None;
    let summary = prepare(&config, &Quiet).await.unwrap();
    assert_eq!(summary.manifest.dtype, gantry_data::Dtype::U32);
    let reader = DatasetReader::open(out.to_str().unwrap(), &Default::default())
        .await
        .unwrap();
    // The end-of-text token was added after the 70,000 words.
    assert_eq!(
        reader.tokens(SplitName::Train).await.unwrap(),
        [1, 65535, 65536, 69999, 3, 70000]
    );
}
