//! gzip and tar unboxing of a downloaded module (Istio unboxIfPossible).
//!
//! Istio's loop on the body: a valid Wasm binary is returned; gzip (magic `1f 8b`, more than 2 bytes) is
//! gunzipped; a POSIX tar (more than 262 bytes, `ustar` at offset 257) is replaced by its first entry whatever
//! its name; the loop repeats on the result (so `.tar.gz` works). When a step fails, or the result is none of
//! these, the *original* download is kept (and later rejected as invalid Wasm).
//!
//! Here every step streams file → new temp file through the fetch's one buffer, hashing on the way, so memory
//! stays bounded whatever the module's size. Differences from Istio, on purpose: output larger than
//! `max_module_bytes` fails with `TooLarge` instead of being silently truncated (Istio's LimitReader) or
//! skipped; disk errors fail with `Io`; nesting stops after [`MAX_DEPTH`] layers (a gzip quine would loop
//! forever in Istio).

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use super::{copy_hashed, CopyError, FetchError, Staged, WASM_MAGIC};
use crate::store::files::new_temp_file;

/// Layers of gzip/tar unwrapped at most.
const MAX_DEPTH: usize = 8;
/// Bytes of a file looked at to recognise its format (a tar header block).
const HEAD_BYTES: usize = 512;

/// The final bytes of a download, with the start of the file.
pub(crate) struct Unboxed {
    pub file: tempfile::NamedTempFile,
    pub sha256: String,
    pub len: u64,
    /// Up to the first 512 bytes.
    pub head: Vec<u8>,
}

enum Format {
    Wasm,
    Gzip,
    Tar,
    Other,
}

fn format_of(head: &[u8], len: u64) -> Format {
    if len >= 8 && head.starts_with(WASM_MAGIC) {
        Format::Wasm
    } else if len > 2 && head.starts_with(&[0x1f, 0x8b]) {
        Format::Gzip
    } else if len > 262 && head.len() >= 262 && &head[257..262] == b"ustar" {
        Format::Tar
    } else {
        Format::Other
    }
}

/// Unwraps gzip/tar layers of `original` as Istio does. Returns the final module (or the original when it
/// cannot be unwrapped into Wasm).
pub(crate) fn unbox(original: Staged, temp_dir: &Path, max: u64, buf: &mut [u8]) -> Result<Unboxed, FetchError> {
    let original_head = read_head(&original, temp_dir)?;
    let keep_original = |original: Staged, head: Vec<u8>| Unboxed {
        file: original.file,
        sha256: original.sha256,
        len: original.len,
        head,
    };
    // `current` is an intermediate layer (never the original); dropping it deletes its file.
    let mut current: Option<(Staged, Vec<u8>)> = None;
    for _ in 0..MAX_DEPTH {
        let (layer, head) = match &current {
            Some((staged, head)) => (staged, head),
            None => (&original, &original_head),
        };
        let step = match format_of(head, layer.len) {
            Format::Wasm => break,
            Format::Gzip => gunzip(layer, temp_dir, max, buf)?,
            Format::Tar => first_tar_entry(layer, temp_dir, max, buf)?,
            Format::Other => None,
        };
        match step {
            Some(next) => {
                let head = read_head(&next, temp_dir)?;
                current = Some((next, head));
            }
            None => return Ok(keep_original(original, original_head)),
        }
    }
    match current {
        Some((staged, head)) if matches!(format_of(&head, staged.len), Format::Wasm) => {
            Ok(Unboxed { file: staged.file, sha256: staged.sha256, len: staged.len, head })
        }
        // Already Wasm as downloaded, or too deeply nested.
        _ => Ok(keep_original(original, original_head)),
    }
}

/// The first (up to) 512 bytes of a staged file.
fn read_head(staged: &Staged, temp_dir: &Path) -> Result<Vec<u8>, FetchError> {
    let mut file = reopen(staged, temp_dir)?;
    let mut head = Vec::with_capacity(HEAD_BYTES);
    (&mut file)
        .take(HEAD_BYTES as u64)
        .read_to_end(&mut head)
        .map_err(|e| FetchError::io("cannot read the downloaded module", temp_dir, &e))?;
    Ok(head)
}

fn reopen(staged: &Staged, temp_dir: &Path) -> Result<File, FetchError> {
    let mut file =
        staged.file.reopen().map_err(|e| FetchError::io("cannot reopen the downloaded module", temp_dir, &e))?;
    file.seek(SeekFrom::Start(0)).map_err(|e| FetchError::io("cannot read the downloaded module", temp_dir, &e))?;
    Ok(file)
}

/// Decodes `reader` into a new temp file. `Ok(None)` when decoding fails (keep the original).
fn decode_into(
    reader: &mut dyn Read,
    temp_dir: &Path,
    max: u64,
    buf: &mut [u8],
    what: &str,
) -> Result<Option<Staged>, FetchError> {
    let mut file = new_temp_file(temp_dir).map_err(|e| FetchError::io("cannot create a temp file", temp_dir, &e))?;
    match copy_hashed(reader, file.as_file_mut(), buf, max) {
        Ok((sha256, len)) => Ok(Some(Staged { file, sha256, len })),
        Err(CopyError::Read(e)) => {
            log::debug!("wasm module looks like {what} but cannot be unpacked ({e}); keeping it as downloaded");
            Ok(None)
        }
        Err(CopyError::Write(e)) => Err(FetchError::io("cannot write the unpacked module", temp_dir, &e)),
        Err(CopyError::TooLarge) => Err(FetchError::too_large(max)),
    }
}

fn gunzip(layer: &Staged, temp_dir: &Path, max: u64, buf: &mut [u8]) -> Result<Option<Staged>, FetchError> {
    let file = reopen(layer, temp_dir)?;
    // Multi-member, like Go's gzip.Reader.
    let mut decoder = flate2::read::MultiGzDecoder::new(BufReader::new(file));
    decode_into(&mut decoder, temp_dir, max, buf, "gzip")
}

fn first_tar_entry(layer: &Staged, temp_dir: &Path, max: u64, buf: &mut [u8]) -> Result<Option<Staged>, FetchError> {
    let file = reopen(layer, temp_dir)?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    let entries = match archive.entries() {
        Ok(entries) => entries,
        Err(e) => return not_unpackable(e),
    };
    let mut entry = match entries.into_iter().next() {
        Some(Ok(entry)) => entry,
        Some(Err(e)) => return not_unpackable(e),
        None => return not_unpackable(io::Error::new(io::ErrorKind::InvalidData, "empty archive")),
    };
    if entry.header().size().is_ok_and(|size| size > max) {
        return Err(FetchError::too_large(max));
    }
    // A short entry surfaces as a read error (UnexpectedEof) inside decode_into.
    let mut exact = ExactLen { inner: &mut entry, remaining: None };
    exact.remaining = exact.inner.header().size().ok();
    decode_into(&mut exact, temp_dir, max, buf, "tar")
}

fn not_unpackable(e: io::Error) -> Result<Option<Staged>, FetchError> {
    log::debug!("wasm module looks like tar but cannot be unpacked ({e}); keeping it as downloaded");
    Ok(None)
}

/// Fails with `UnexpectedEof` when the inner reader ends before `remaining` bytes (a truncated tar entry;
/// Go's `io.ReadFull` fails the same way).
struct ExactLen<'a, R: Read> {
    inner: &'a mut R,
    remaining: Option<u64>,
}

impl<R: Read> Read for ExactLen<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        if let Some(remaining) = &mut self.remaining {
            if n == 0 && *remaining > 0 && !out.is_empty() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tar entry is truncated"));
            }
            *remaining = remaining.saturating_sub(n as u64);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::super::{FetchErrorKind, COPY_BUFFER_BYTES};
    use super::*;
    use wasm_ecds_testkit::server::{gzip, sha256_hex, tar, wasm_module};

    fn stage(dir: &Path, bytes: &[u8]) -> Staged {
        let mut file = new_temp_file(dir).unwrap();
        file.write_all(bytes).unwrap();
        Staged { file, sha256: sha256_hex(bytes), len: bytes.len() as u64 }
    }

    fn run(bytes: &[u8], max: u64) -> (tempfile::TempDir, Result<Unboxed, FetchError>) {
        let dir = tempfile::tempdir().unwrap();
        let staged = stage(dir.path(), bytes);
        let mut buf = vec![0u8; COPY_BUFFER_BYTES];
        let result = unbox(staged, dir.path(), max, &mut buf);
        (dir, result)
    }

    fn unboxed_to(bytes: &[u8], expected: &[u8]) {
        let (dir, result) = run(bytes, 1 << 24);
        let u = result.unwrap();
        assert_eq!(u.sha256, sha256_hex(expected));
        assert_eq!(u.len, expected.len() as u64);
        assert_eq!(std::fs::read(u.file.path()).unwrap(), expected);
        assert_eq!(u.head, &expected[..expected.len().min(HEAD_BYTES)]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "intermediate files left");
    }

    #[test]
    fn wasm_stays_as_is() {
        let m = wasm_module(1000);
        unboxed_to(&m, &m);
    }

    #[test]
    fn layers_are_unwrapped() {
        let m = wasm_module(200_000);
        unboxed_to(&gzip(&m), &m);
        unboxed_to(&tar(&[("x", &m)]), &m);
        unboxed_to(&gzip(&tar(&[("plugin.wasm", &m)])), &m);
        unboxed_to(&tar(&[("a.tar.gz", &gzip(&tar(&[("plugin.wasm", &m)])))]), &m);
        unboxed_to(&gzip(&gzip(&m)), &m);
        // Multi-member gzip (as `cat a.gz b.gz`).
        let (a, b) = m.split_at(1000);
        unboxed_to(&[gzip(a), gzip(b)].concat(), &m);
        // A long name (PAX / GNU header) in front of the first entry.
        let long = "d/".repeat(80) + "plugin.wasm";
        unboxed_to(&tar(&[(long.as_str(), &m)]), &m);
    }

    #[test]
    fn whatever_is_not_wasm_in_the_end_keeps_the_original() {
        let text = b"just some text".to_vec();
        for original in [
            gzip(&text),
            tar(&[("README", &text), ("plugin.wasm", &wasm_module(10))]),
            gzip(&tar(&[("dir-entry-like", b"")])),
            text.clone(),
            b"\x1f\x8b".to_vec(), // too short to be gzip
        ] {
            unboxed_to(&original, &original);
        }
    }

    #[test]
    fn broken_layers_keep_the_original() {
        let m = wasm_module(100_000);
        let mut broken_gzip = gzip(&m);
        broken_gzip.truncate(broken_gzip.len() - 100);
        unboxed_to(&broken_gzip, &broken_gzip);
        let mut corrupt_gzip = gzip(&m);
        let mid = corrupt_gzip.len() / 2;
        corrupt_gzip[mid] ^= 0xff;
        corrupt_gzip[mid + 1] ^= 0xff;
        unboxed_to(&corrupt_gzip, &corrupt_gzip);
        let mut short_tar = tar(&[("plugin.wasm", &m)]);
        short_tar.truncate(512 + 50_000);
        unboxed_to(&short_tar, &short_tar);
        // A tar.gz whose tar is cut: the original .tar.gz is kept, not the intermediate tar.
        let cut_tar_gz = gzip(&short_tar);
        unboxed_to(&cut_tar_gz, &cut_tar_gz);
        let mut bad_checksum = tar(&[("plugin.wasm", &m)]);
        bad_checksum[148] = b'9';
        unboxed_to(&bad_checksum, &bad_checksum);
    }

    #[test]
    fn output_past_the_limit_is_too_large() {
        // A gzip bomb: 4 MiB of zeros compress to a few KiB.
        let bomb = gzip(&vec![0u8; 4 << 20]);
        let (dir, result) = run(&bomb, 1 << 20);
        let err = result.err().unwrap();
        assert_eq!(err.kind, FetchErrorKind::TooLarge);
        assert!(err.message.contains(&(1u64 << 20).to_string()), "{}", err.message);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "files left");
        // A tar entry announcing more than the limit.
        let m = wasm_module(5000);
        let (_dir, result) = run(&tar(&[("plugin.wasm", &m)]), 4000);
        assert_eq!(result.err().unwrap().kind, FetchErrorKind::TooLarge);
    }

    #[test]
    fn nesting_is_bounded() {
        let m = wasm_module(10);
        let mut nested = m.clone();
        for _ in 0..MAX_DEPTH {
            nested = gzip(&nested);
        }
        unboxed_to(&nested, &m);
        let too_deep = gzip(&nested);
        unboxed_to(&too_deep, &too_deep);
    }
}
