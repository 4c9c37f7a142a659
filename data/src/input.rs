//! Reading documents: `.txt` files (a document per file, per paragraph or per line) and `.jsonl`
//! files (a document per line, its text in a configurable field, an optional label field), given
//! as files or folders, on the local disk or in an object store.

use crate::store::Location;
use futures_util::TryStreamExt;
use gantry_checkpoint::Options;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

/// How a `.txt` file is cut into documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TxtDocuments {
    /// The whole file is one document.
    File,
    /// Documents are separated by blank lines.
    Paragraph,
    /// Every non-empty line is a document.
    Line,
}

/// What to do with a file or line that is not valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InvalidUtf8 {
    /// Leave it out and count it in the report.
    Skip,
    /// Stop with an error naming it.
    Refuse,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputOptions {
    pub txt_documents: TxtDocuments,
    /// The JSONL field that holds a document's text.
    pub text_field: String,
    /// The JSONL field that holds a document's label (classification data), if any.
    pub label_field: Option<String>,
    pub invalid_utf8: InvalidUtf8,
}

impl Default for InputOptions {
    fn default() -> Self {
        Self {
            txt_documents: TxtDocuments::Paragraph,
            text_field: "text".into(),
            label_field: None,
            invalid_utf8: InvalidUtf8::Refuse,
        }
    }
}

/// A document as read, before cleaning.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub text: String,
    pub label: Option<String>,
}

/// What reading found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InputReport {
    pub files: u64,
    pub bytes: u64,
    pub documents: u64,
    /// Files (`.txt`) or lines (`.jsonl`) left out because they were not UTF-8.
    pub invalid_utf8: u64,
}

/// Reads every input (file or folder; folders recursively, `.txt` and `.jsonl` files in name
/// order) into documents. Any input that does not exist, a folder with no such file, and a
/// malformed JSONL line are errors naming the file (and line).
pub async fn read_inputs(
    inputs: &[String],
    options: &InputOptions,
    store_options: &Options,
) -> anyhow::Result<(Vec<Document>, InputReport)> {
    anyhow::ensure!(
        !inputs.is_empty(),
        "inputs: give at least one file or folder"
    );
    let mut documents = Vec::new();
    let mut report = InputReport::default();
    for input in inputs {
        let files = list(input, store_options).await?;
        for (location, path, name) in files {
            let bytes = location
                .store
                .get(&path)
                .await
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?
                .bytes()
                .await
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            report.files += 1;
            report.bytes += bytes.len() as u64;
            let before = documents.len();
            if name.ends_with(".jsonl") {
                read_jsonl(&name, &bytes, options, &mut documents, &mut report)?;
            } else {
                read_txt(&name, &bytes, options, &mut documents, &mut report)?;
            }
            report.documents += (documents.len() - before) as u64;
        }
    }
    anyhow::ensure!(
        !documents.is_empty(),
        "inputs: {} held no document (empty files?)",
        inputs.join(", ")
    );
    Ok((documents, report))
}

/// The files an input names: itself, or the `.txt` and `.jsonl` files under it.
async fn list(
    input: &str,
    store_options: &Options,
) -> anyhow::Result<Vec<(Location, object_store::path::Path, String)>> {
    let location = Location::open(input, store_options)?;
    if location.local {
        let path = std::path::Path::new(input.strip_prefix("file://").unwrap_or(input));
        anyhow::ensure!(path.exists(), "{input}: no such file or folder");
    }
    // A file?
    if location.store.head(&location.prefix).await.is_ok() {
        anyhow::ensure!(is_input(input), "{input}: not a .txt or .jsonl file");
        let prefix = location.prefix.clone();
        return Ok(vec![(location, prefix, input.to_string())]);
    }
    let mut found: Vec<object_store::path::Path> = location
        .store
        .list(Some(&location.prefix))
        .map_ok(|meta| meta.location)
        .try_collect()
        .await
        .map_err(|e| anyhow::anyhow!("{input}: {e}"))?;
    found.retain(|p| is_input(p.as_ref()));
    found.sort();
    anyhow::ensure!(
        !found.is_empty(),
        "{input}: no such file, or a folder with no .txt or .jsonl file"
    );
    Ok(found
        .into_iter()
        .map(|p| {
            let name = format!(
                "{}/{}",
                input.trim_end_matches('/'),
                relative(&location, &p)
            );
            (location.clone(), p, name)
        })
        .collect())
}

fn relative(location: &Location, path: &object_store::path::Path) -> String {
    path.prefix_match(&location.prefix)
        .map(|parts| {
            parts
                .map(|p| p.as_ref().to_string())
                .collect::<Vec<_>>()
                .join("/")
        })
        .unwrap_or_else(|| path.to_string())
}

fn is_input(name: &str) -> bool {
    name.ends_with(".txt") || name.ends_with(".jsonl")
}

fn read_txt(
    name: &str,
    bytes: &[u8],
    options: &InputOptions,
    out: &mut Vec<Document>,
    report: &mut InputReport,
) -> anyhow::Result<()> {
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            return match options.invalid_utf8 {
                InvalidUtf8::Skip => {
                    report.invalid_utf8 += 1;
                    Ok(())
                }
                InvalidUtf8::Refuse => {
                    let line = bytes[..e.valid_up_to()]
                        .iter()
                        .filter(|&&b| b == b'\n')
                        .count()
                        + 1;
                    anyhow::bail!(
                        "{name}:{line}: not valid UTF-8 (byte {}); prepare with \
                         --invalid-utf8 skip to leave such files out",
                        e.valid_up_to()
                    )
                }
            };
        }
    };
    let text = text.replace("\r\n", "\n");
    let mut push = |t: &str| {
        if !t.trim().is_empty() {
            out.push(Document {
                text: t.to_string(),
                label: None,
            });
        }
    };
    match options.txt_documents {
        TxtDocuments::File => push(&text),
        TxtDocuments::Line => text.lines().for_each(push),
        TxtDocuments::Paragraph => paragraphs(&text).into_iter().for_each(push),
    }
    Ok(())
}

/// Runs of lines separated by blank (whitespace-only) lines.
fn paragraphs(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut at) = (None, 0);
    for line in text.split_inclusive('\n') {
        match (line.trim().is_empty(), start) {
            (false, None) => start = Some(at),
            (true, Some(s)) => {
                out.push(&text[s..at]);
                start = None;
            }
            _ => {}
        }
        at += line.len();
    }
    out.extend(start.map(|s| &text[s..]));
    out
}

fn read_jsonl(
    name: &str,
    bytes: &[u8],
    options: &InputOptions,
    out: &mut Vec<Document>,
    report: &mut InputReport,
) -> anyhow::Result<()> {
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let at = format!("{name}:{}", i + 1);
        let line = match std::str::from_utf8(line) {
            Ok(line) => line,
            Err(_) if options.invalid_utf8 == InvalidUtf8::Skip => {
                report.invalid_utf8 += 1;
                continue;
            }
            Err(_) => anyhow::bail!(
                "{at}: not valid UTF-8; prepare with --invalid-utf8 skip to leave such lines out"
            ),
        };
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{at}: not JSON: {e}"))?;
        let object = value
            .as_object()
            .ok_or_else(|| anyhow::anyhow!("{at}: not a JSON object"))?;
        let field = &options.text_field;
        let text = object
            .get(field)
            .and_then(|v| v.as_str())
            .ok_or_else(|| anyhow::anyhow!("{at}: no {field:?} field with a string"))?;
        let label = match &options.label_field {
            None => None,
            Some(field) => Some(match object.get(field) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                    v.to_string()
                }
                _ => anyhow::bail!("{at}: no {field:?} field with a string, number or boolean"),
            }),
        };
        out.push(Document {
            text: text.to_string(),
            label,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paragraphs_are_separated_by_blank_lines() {
        let got = paragraphs("\n\na\nb\n\n  \nc\n\nd");
        assert_eq!(got, ["a\nb\n", "c\n", "d"]);
    }

    fn jsonl(text: &str, options: &InputOptions) -> anyhow::Result<Vec<Document>> {
        let mut out = Vec::new();
        read_jsonl(
            "x.jsonl",
            text.as_bytes(),
            options,
            &mut out,
            &mut InputReport::default(),
        )?;
        Ok(out)
    }

    #[test]
    fn jsonl_lines_name_their_line_when_malformed() {
        let options = InputOptions {
            label_field: Some("label".into()),
            ..InputOptions::default()
        };
        let good = jsonl(
            "{\"text\":\"a\",\"label\":1}\n\n{\"text\":\"b\",\"label\":\"spam\"}\n",
            &options,
        )
        .unwrap();
        assert_eq!(good[0].label.as_deref(), Some("1"));
        assert_eq!(good[1].text, "b");
        for (text, message) in [
            (
                "{\"text\":\"a\",\"label\":1}\n[1,2]\n",
                "x.jsonl:2: not a JSON object",
            ),
            (
                "{\"text\":\"a\",\"label\":1}\n{\"body\":\"b\"}\n",
                "x.jsonl:2: no \"text\" field with a string",
            ),
            (
                "{\"text\":\"a\"}\n",
                "x.jsonl:1: no \"label\" field with a string, number or boolean",
            ),
            (
                "{\"text\":\"a\",\"label\":1}\n{oops\n",
                "x.jsonl:2: not JSON",
            ),
        ] {
            let err = jsonl(text, &options).unwrap_err().to_string();
            assert!(err.starts_with(message), "{err}");
        }
    }
}
