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
//!
//! Every read is bounded: gzip output and a tar entry by `max_module_bytes` (`TooLarge`), a tar's special
//! records (long names, pax headers) by 1 MiB as in Go's `archive/tar` (see [`first_tar_entry`]), the format
//! sniffing by one 512-byte block.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use tar::EntryType;

use super::{copy_hashed, CopyError, FetchError, FetchErrorKind, Staged, WASM_MAGIC};
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
    /// Why the download, which looked like gzip or tar, was kept as it is: for the reason of the rejection
    /// that follows when it is not Wasm either.
    pub not_unpacked: Option<String>,
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
    let keep_original = |original: Staged, head: Vec<u8>, not_unpacked: Option<String>| Unboxed {
        file: original.file,
        sha256: original.sha256,
        len: original.len,
        head,
        not_unpacked,
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
            Format::Other => return Ok(keep_original(original, original_head, None)),
        };
        match step {
            Ok(next) => {
                let head = read_head(&next, temp_dir)?;
                current = Some((next, head));
            }
            Err(why) => return Ok(keep_original(original, original_head, Some(why))),
        }
    }
    match current {
        Some((staged, head)) if matches!(format_of(&head, staged.len), Format::Wasm) => {
            Ok(Unboxed { file: staged.file, sha256: staged.sha256, len: staged.len, head, not_unpacked: None })
        }
        // Already Wasm as downloaded, or too deeply nested.
        _ => Ok(keep_original(original, original_head, None)),
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

/// What one unboxing step gives: the next layer, or why the download is kept as it is.
type Step = Result<Staged, String>;

/// Decodes `reader` into a new temp file. `Ok(Err(why))` when decoding fails (keep the original).
fn decode_into(
    reader: &mut dyn Read,
    temp_dir: &Path,
    max: u64,
    buf: &mut [u8],
    what: &str,
) -> Result<Step, FetchError> {
    let mut file = new_temp_file(temp_dir).map_err(|e| FetchError::io("cannot create a temp file", temp_dir, &e))?;
    match copy_hashed(reader, file.as_file_mut(), buf, max) {
        Ok((sha256, len)) => Ok(Ok(Staged { file, sha256, len })),
        Err(CopyError::Read(e)) => {
            log::debug!("wasm module looks like {what} but cannot be unpacked ({e}); keeping it as downloaded");
            Ok(Err(format!("it looks like {what} but cannot be unpacked: {e}")))
        }
        Err(CopyError::Write(e)) => Err(FetchError::io("cannot write the unpacked module", temp_dir, &e)),
        Err(CopyError::TooLarge) => Err(FetchError::too_large(max)),
    }
}

fn gunzip(layer: &Staged, temp_dir: &Path, max: u64, buf: &mut [u8]) -> Result<Step, FetchError> {
    let file = reopen(layer, temp_dir)?;
    // Multi-member, like Go's gzip.Reader.
    let mut decoder = flate2::read::MultiGzDecoder::new(BufReader::new(file));
    decode_into(&mut decoder, temp_dir, max, buf, "gzip")
}

/// The first entry of a tar, as Go's `archive/tar` `Reader.Next` (`reader.go`) finds it for Istio.
///
/// The records before it are read here, not by the crate: its non-raw iterator reads every GNU long name
/// (`L`), long link (`K`) and pax (`x`) record whole into memory, whatever size it declares. Here a special
/// record over [`MAX_SPECIAL_RECORD_BYTES`] fails the unboxing (as Go's `readSpecialFile` fails with
/// `ErrFieldTooLong`, after which Istio keeps the download as it is); `L` and `K` are skipped unread (the
/// name is not needed); `x` is read (at most 1 MiB) for its `size` record. Then the entry, as Go gives it:
/// - a pax global header (`g`) is an entry of its own, holding no file;
/// - a link, device, directory or FIFO holds no data (`isHeaderOnlyType`);
/// - anything else holds the bytes its size says (a pax `size` record overrides the header's).
///
/// Not followed, on purpose, each keeping the download as it is: GNU sparse files (old `S` entries and the
/// pax `GNU.sparse.*` formats: the crate would hold a map growing with the archive; no Wasm tooling writes
/// them), and a pax `size` that disagrees with the header's (the crate reads the header's; writers add the
/// record only when the header cannot hold the size, 8 GiB and more, far past `max_module_bytes`).
fn first_tar_entry(layer: &Staged, temp_dir: &Path, max: u64, buf: &mut [u8]) -> Result<Step, FetchError> {
    let file = reopen(layer, temp_dir)?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    let mut entries = match archive.entries() {
        // Raw: every record as it is; the crate skips the data of a record not read (with a fixed buffer).
        Ok(entries) => entries.raw(true),
        Err(e) => return not_unpackable(e),
    };
    // What the last pax `x` record said about the next entry's size.
    let mut pax_size = None;
    loop {
        let mut entry = match entries.next() {
            Some(Ok(entry)) => entry,
            Some(Err(e)) => return not_unpackable(e),
            None => return not_unpackable(invalid("the archive holds no file")),
        };
        let kind = entry.header().entry_type();
        let size = entry.size();
        if let Err(e) = check_special_record(kind, size) {
            return not_unpackable(e);
        }
        if kind.is_gnu_longname() || kind.is_gnu_longlink() {
            continue;
        }
        if kind.is_pax_local_extensions() {
            let records = match read_record(&mut entry, size) {
                Ok(records) => records,
                Err(e) => return not_unpackable(e),
            };
            pax_size = match pax_fields(&records) {
                Ok(fields) => fields.size,
                Err(e) => return not_unpackable(invalid(e)),
            };
            continue;
        }
        if kind.is_pax_global_extensions() {
            return not_unpackable(invalid("its first entry is a pax global header, which holds no file"));
        }
        if kind.is_gnu_sparse() {
            return not_unpackable(invalid("its first entry is a GNU sparse file, which is not unpacked"));
        }
        if matches!(
            kind,
            EntryType::Link
                | EntryType::Symlink
                | EntryType::Char
                | EntryType::Block
                | EntryType::Directory
                | EntryType::Fifo
        ) {
            return not_unpackable(invalid(format!("its first entry is a {kind:?}, which holds no data")));
        }
        if let Some(pax) = pax_size.filter(|&pax| pax != size) {
            return not_unpackable(invalid(format!(
                "its pax size record ({pax}) disagrees with the header's size ({size})"
            )));
        }
        if size > max {
            return Err(FetchError::too_large(max));
        }
        // A short entry surfaces as a read error (UnexpectedEof) inside decode_into.
        let mut exact = ExactLen { inner: &mut entry, remaining: size };
        return decode_into(&mut exact, temp_dir, max, buf, "tar");
    }
}

/// The largest tar special record (GNU long name or long link, pax header) read, as Go's `archive/tar`
/// (`maxSpecialFileSize` in `reader.go`).
const MAX_SPECIAL_RECORD_BYTES: u64 = 1 << 20;

/// Refuses a special record (GNU long name or long link, pax header) over [`MAX_SPECIAL_RECORD_BYTES`]
/// before any of it is read, as Go's `readSpecialFile` fails with `ErrFieldTooLong`.
fn check_special_record(kind: EntryType, size: u64) -> io::Result<()> {
    let is_special = kind.is_gnu_longname()
        || kind.is_gnu_longlink()
        || kind.is_pax_local_extensions()
        || kind.is_pax_global_extensions();
    if is_special && size > MAX_SPECIAL_RECORD_BYTES {
        return Err(invalid(format!(
            "a {} record of {size} bytes is over the limit of {MAX_SPECIAL_RECORD_BYTES} bytes for tar headers",
            record_name(kind)
        )));
    }
    Ok(())
}

/// A special record's bytes, all `size` of them (checked by [`check_special_record`] first).
fn read_record(entry: &mut impl Read, size: u64) -> io::Result<Vec<u8>> {
    let mut record = Vec::with_capacity(size as usize);
    entry.take(size).read_to_end(&mut record)?;
    if record.len() as u64 != size {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "a tar record is truncated"));
    }
    Ok(record)
}

fn record_name(kind: EntryType) -> &'static str {
    if kind.is_gnu_longname() {
        "GNU long name (L)"
    } else if kind.is_gnu_longlink() {
        "GNU long link (K)"
    } else if kind.is_pax_local_extensions() {
        "pax header (x)"
    } else {
        "pax global header (g)"
    }
}

/// The `size` and `path` records of a pax header, parsed as Go's `parsePAX` and `mergePAX` (`archive/tar`
/// `reader.go`, `strconv.go`) do: records are `"<length> <key>=<value>\n"`, the length counting the whole
/// record; the last of a key wins. GNU sparse records are refused (see [`first_tar_entry`]).
fn pax_fields(mut records: &[u8]) -> Result<PaxFields, String> {
    let malformed = || "its pax header is malformed".to_string();
    let mut fields = PaxFields::default();
    while !records.is_empty() {
        let space = records.iter().position(|&b| b == b' ').ok_or_else(malformed)?;
        let len: usize = std::str::from_utf8(&records[..space])
            .ok()
            .and_then(|digits| digits.parse().ok())
            .filter(|&len| len > space + 1 && len <= records.len())
            .ok_or_else(malformed)?;
        let (record, rest) = records.split_at(len);
        let record = record[space + 1..].strip_suffix(b"\n").ok_or_else(malformed)?;
        let equals = record.iter().position(|&b| b == b'=').filter(|&i| i > 0).ok_or_else(malformed)?;
        let (key, value) = (&record[..equals], &record[equals + 1..]);
        if key.starts_with(b"GNU.sparse.") {
            return Err("its first entry is a GNU sparse file (pax), which is not unpacked".into());
        }
        if key == b"size" {
            let value = std::str::from_utf8(value).ok().and_then(|v| v.parse::<u64>().ok());
            fields.size = Some(value.ok_or_else(|| "its pax size record is not a number".to_string())?);
        }
        if key == b"path" {
            fields.path = Some(value.to_vec());
        }
        records = rest;
    }
    Ok(fields)
}

#[derive(Default)]
struct PaxFields {
    size: Option<u64>,
    path: Option<Vec<u8>>,
}

/// The file compat images carry the module in (solo-io wasm `spec-compat.md`, Istio `extractWasmPluginBinary`).
pub(crate) const PLUGIN_FILE_NAME: &str = "plugin.wasm";

/// The most tar entries of a compat layer walked looking for [`PLUGIN_FILE_NAME`]. Such a layer holds the module
/// and perhaps a few files beside it; the bound stops a walk over a hostile archive of empty entries.
const MAX_LAYER_TAR_ENTRIES: usize = 10_000;

/// The most bytes of a compat layer's tar (gunzipped) walked looking for [`PLUGIN_FILE_NAME`], as a multiple of
/// `max_module_bytes`: room for the module and as much beside it, while a gzip bomb (a 1000:1 ratio is easy)
/// stops early instead of being inflated whole.
const MAX_LAYER_TAR_EXPANSION: u64 = 2;

/// Istio's `extractWasmPluginBinary`: gunzips the layer and walks its tar for the first file whose base name
/// (Go's `filepath.Base`) is `plugin.wasm`, streaming that file into a new temp file. Memory stays bounded:
/// special records as in [`first_tar_entry`] (over 1 MiB fails; `L` and pax `path` names are read, since the
/// name matters here), the walk by [`MAX_LAYER_TAR_ENTRIES`] and [`MAX_LAYER_TAR_EXPANSION`], the module by
/// `max` (`TooLarge`). Entries that hold no file data (links, directories, devices) are passed over. Errors
/// are `Download` kind with Istio's wording (`plugin.wasm not found in the archive`), or `TooLarge`/`Io`.
pub(crate) fn extract_plugin(layer: &Staged, temp_dir: &Path, max: u64, buf: &mut [u8]) -> Result<Staged, FetchError> {
    let unusable = |why: String| FetchError::new(FetchErrorKind::Download, why);
    let parse_error = |e: io::Error| unusable(format!("failed to parse layer as tar.gz: {e}"));
    let file = reopen(layer, temp_dir)?;
    let budget = max.saturating_mul(MAX_LAYER_TAR_EXPANSION).saturating_add(1 << 20);
    let gunzipped = Budget { inner: flate2::read::MultiGzDecoder::new(BufReader::new(file)), remaining: budget };
    let mut archive = tar::Archive::new(gunzipped);
    let mut entries = archive.entries().map_err(parse_error)?.raw(true);
    let mut long_name: Option<Vec<u8>> = None;
    let mut pax = PaxFields::default();
    for _ in 0..MAX_LAYER_TAR_ENTRIES {
        let mut entry = match entries.next() {
            Some(entry) => entry.map_err(parse_error)?,
            None => return Err(unusable(format!("{PLUGIN_FILE_NAME} not found in the archive"))),
        };
        let kind = entry.header().entry_type();
        let size = entry.size();
        check_special_record(kind, size).map_err(parse_error)?;
        if kind.is_gnu_longname() || kind.is_pax_local_extensions() {
            let mut record = read_record(&mut entry, size).map_err(parse_error)?;
            if kind.is_gnu_longname() {
                // NUL-terminated, as GNU tar writes it.
                let end = record.iter().position(|&b| b == 0).unwrap_or(record.len());
                record.truncate(end);
                long_name = Some(record);
            } else {
                pax = pax_fields(&record).map_err(|e| parse_error(invalid(e)))?;
            }
            continue;
        }
        if kind.is_gnu_longlink() || kind.is_pax_global_extensions() {
            continue;
        }
        let name = match pax.path.take().or(long_name.take()) {
            Some(name) => name,
            None => entry.header().path_bytes().into_owned(),
        };
        let pax_size = pax.size.take();
        let holds_data = matches!(kind, EntryType::Regular | EntryType::Continuous);
        if !holds_data || base_name(&name) != PLUGIN_FILE_NAME.as_bytes() {
            continue;
        }
        if let Some(pax) = pax_size.filter(|&pax| pax != size) {
            return Err(parse_error(invalid(format!(
                "the pax size record of {PLUGIN_FILE_NAME} ({pax}) disagrees with the header's size ({size})"
            ))));
        }
        if size > max {
            return Err(FetchError::too_large(max));
        }
        let mut out = new_temp_file(temp_dir).map_err(|e| FetchError::io("cannot create a temp file", temp_dir, &e))?;
        let mut exact = ExactLen { inner: &mut entry, remaining: size };
        return match copy_hashed(&mut exact, out.as_file_mut(), buf, max) {
            Ok((sha256, len)) => Ok(Staged { file: out, sha256, len }),
            Err(CopyError::Read(e)) => Err(unusable(format!("failed to read {PLUGIN_FILE_NAME}: {e}"))),
            Err(CopyError::Write(e)) => Err(FetchError::io("cannot write the unpacked module", temp_dir, &e)),
            Err(CopyError::TooLarge) => Err(FetchError::too_large(max)),
        };
    }
    Err(unusable(format!(
        "{PLUGIN_FILE_NAME} not found in the first {MAX_LAYER_TAR_ENTRIES} entries of the archive (the limit)"
    )))
}

/// Go's `filepath.Base` on a Unix path: the last element, trailing slashes ignored.
fn base_name(path: &[u8]) -> &[u8] {
    let mut end = path.len();
    while end > 1 && path[end - 1] == b'/' {
        end -= 1;
    }
    let trimmed = &path[..end];
    match trimmed.iter().rposition(|&b| b == b'/') {
        Some(slash) if trimmed.len() > 1 => &trimmed[slash + 1..],
        _ => trimmed,
    }
}

/// Fails once more than `remaining` bytes have been read: the bound on a layer's gunzipped tar.
struct Budget<R: Read> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for Budget<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.remaining = self.remaining.checked_sub(n as u64).ok_or_else(|| {
            invalid("the layer's uncompressed tar is larger than twice max_module_bytes (the limit)".to_string())
        })?;
        Ok(n)
    }
}

/// Whether a staged module starts with the Wasm magic and has at least 8 bytes (magic and version).
pub(crate) fn is_wasm(staged: &Staged, temp_dir: &Path) -> Result<bool, FetchError> {
    let head = read_head(staged, temp_dir)?;
    Ok(staged.len >= 8 && head.starts_with(WASM_MAGIC))
}

fn invalid(reason: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason.into())
}

fn not_unpackable(e: io::Error) -> Result<Step, FetchError> {
    log::debug!("wasm module looks like tar but cannot be unpacked ({e}); keeping it as downloaded");
    Ok(Err(format!("it looks like tar but cannot be unpacked: {e}")))
}

/// Fails with `UnexpectedEof` when the inner reader ends before `remaining` bytes (a truncated tar entry;
/// Go's `io.ReadFull` fails the same way).
struct ExactLen<'a, R: Read> {
    inner: &'a mut R,
    remaining: u64,
}

impl<R: Read> Read for ExactLen<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        if n == 0 && self.remaining > 0 && !out.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tar entry is truncated"));
        }
        self.remaining = self.remaining.saturating_sub(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::super::COPY_BUFFER_BYTES;
    use super::*;
    use wasm_ecds_testkit::archives::{header, pax_record, tar_records, BLOCK};
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

    /// The content of a special record of exactly `len` bytes: a NUL-ended name for `L`/`K`, one `comment`
    /// record for `x`/`g`.
    fn special_content(kind: u8, len: usize) -> Vec<u8> {
        match kind {
            b'L' | b'K' => [vec![b'n'; len - 1], vec![0]].concat(),
            _ => {
                let overhead = len.to_string().len() + " comment=\n".len();
                let record = pax_record("comment", &"c".repeat(len - overhead));
                assert_eq!(record.len(), len);
                record
            }
        }
    }

    fn special_name(kind: u8) -> &'static str {
        match kind {
            b'L' | b'K' => "././@LongLink",
            b'x' => "PaxHeaders.0/plugin.wasm",
            _ => "GlobalHead.0.0",
        }
    }

    #[test]
    fn special_records_over_1_mib_keep_the_original() {
        // Go's archive/tar fails Next with ErrFieldTooLong past 1 MiB; Istio then keeps the download.
        let m = wasm_module(1000);
        for kind in [b'L', b'K', b'x', b'g'] {
            let content = special_content(kind, (1 << 20) + 1);
            let archive = tar_records(&[
                (header(special_name(kind), kind, content.len() as u64), &content),
                (header("plugin.wasm", b'0', m.len() as u64), &m),
            ]);
            unboxed_to(&archive, &archive);
            unboxed_to(&gzip(&archive), &gzip(&archive));
        }
    }

    #[test]
    fn special_records_up_to_1_mib_are_followed() {
        let m = wasm_module(1000);
        let file = (header("plugin.wasm", b'0', m.len() as u64), m.as_slice());
        for kind in [b'L', b'K', b'x'] {
            let content = special_content(kind, 1 << 20);
            let archive = tar_records(&[(header(special_name(kind), kind, content.len() as u64), &content), file]);
            unboxed_to(&archive, &m);
        }
        // Several in a row, as Go reads them (the last of each kind applies); the crate's own iterator refused
        // two long names for one entry.
        let name = special_content(b'L', 300);
        let pax = pax_record("path", &"p/".repeat(60));
        let archive = tar_records(&[
            (header("././@LongLink", b'L', name.len() as u64), &name),
            (header("././@LongLink", b'L', name.len() as u64), &name),
            (header("PaxHeaders.0/a", b'x', pax.len() as u64), &pax),
            (header("././@LongLink", b'K', name.len() as u64), &name),
            (header("PaxHeaders.0/a", b'x', pax.len() as u64), &pax),
            file,
        ]);
        unboxed_to(&archive, &m);
        // Empty special records.
        let archive =
            tar_records(&[(header("././@LongLink", b'L', 0), b""), (header("PaxHeaders.0/a", b'x', 0), b""), file]);
        unboxed_to(&archive, &m);
    }

    #[test]
    fn a_truncated_special_record_keeps_the_original() {
        let m = wasm_module(1000);
        for kind in [b'L', b'x'] {
            let content = special_content(kind, 4096);
            let mut archive = tar_records(&[
                (header(special_name(kind), kind, content.len() as u64), &content),
                (header("plugin.wasm", b'0', m.len() as u64), &m),
            ]);
            archive.truncate(BLOCK + 1000);
            // Still a tar to `format_of`: the first header is whole.
            unboxed_to(&archive, &archive);
        }
    }

    #[test]
    fn pax_size_records() {
        let m = wasm_module(1000);
        let len = m.len() as u64;
        let with_pax = |pax: &[u8], declared: u64| {
            tar_records(&[(header("PaxHeaders.0/a", b'x', pax.len() as u64), pax), (header("a", b'0', declared), &m)])
        };
        // Agreeing with the header (with other records around it): followed.
        let pax = [pax_record("path", "plugin.wasm"), pax_record("size", &len.to_string()), pax_record("mtime", "1.5")]
            .concat();
        unboxed_to(&with_pax(&pax, len), &m);
        // The last `x` record is the one that applies (Go replaces the whole set).
        let stale = pax_record("size", "1");
        let archive = tar_records(&[
            (header("PaxHeaders.0/a", b'x', stale.len() as u64), &stale),
            (header("PaxHeaders.0/a", b'x', pax.len() as u64), &pax),
            (header("a", b'0', len), &m),
        ]);
        unboxed_to(&archive, &m);
        for original in [
            // Disagreeing with the header: not followed either way.
            with_pax(&pax_record("size", &(len - 10).to_string()), len),
            with_pax(&pax_record("size", &(len + 10).to_string()), len),
            // Malformed: length not matching, missing '=', not a number, empty key, trailing garbage.
            with_pax(b"99 size=1000\n", len),
            with_pax(b"11 size1000\n", len),
            with_pax(&pax_record("size", "ten"), len),
            with_pax(&pax_record("size", "-1"), len),
            with_pax(&pax_record("", "x"), len),
            with_pax(&[pax_record("path", "a"), b"junk".to_vec()].concat(), len),
            // GNU sparse in pax form.
            with_pax(&pax_record("GNU.sparse.major", "1"), len),
        ] {
            unboxed_to(&original, &original);
        }
        // A value holding a newline is framed by its length, as in Go.
        unboxed_to(
            &with_pax(&[pax_record("comment", "two\nlines"), pax_record("size", &len.to_string())].concat(), len),
            &m,
        );
    }

    #[test]
    fn first_entries_without_file_data_keep_the_original() {
        let m = wasm_module(1000);
        let rest = (header("plugin.wasm", b'0', m.len() as u64), m.as_slice());
        let global = pax_record("comment", "git archive writes one");
        for first in [
            // Go gives header-only types no data whatever their size field says.
            (header("dir/", b'5', m.len() as u64), m.as_slice()),
            (header("link", b'2', m.len() as u64), m.as_slice()),
            // A pax global header is an entry of its own in Go.
            (header("GlobalHead.0.0", b'g', global.len() as u64), global.as_slice()),
            // Old GNU sparse files are not unpacked.
            (header("sparse", b'S', m.len() as u64), m.as_slice()),
        ] {
            let archive = tar_records(&[first, rest]);
            unboxed_to(&archive, &archive);
        }
        let archive = tar_records(&[]);
        assert!(archive.len() > 262);
        unboxed_to(&archive, &archive);
    }
}

#[cfg(test)]
mod plugin_tests {
    use std::io::Write;

    use super::super::COPY_BUFFER_BYTES;
    use super::*;
    use wasm_ecds_testkit::archives::{gzip_tar_with_special, header, pax_record, tar_records};
    use wasm_ecds_testkit::server::{gzip, sha256_hex, tar, wasm_module};

    /// Extracts `plugin.wasm` out of `layer` (bytes as downloaded); returns the dir so it outlives the result.
    fn extract(layer: &[u8], max: u64) -> (tempfile::TempDir, Result<Staged, FetchError>) {
        let dir = tempfile::tempdir().unwrap();
        let mut file = new_temp_file(dir.path()).unwrap();
        file.write_all(layer).unwrap();
        let staged = Staged { file, sha256: sha256_hex(layer), len: layer.len() as u64 };
        let mut buf = vec![0u8; COPY_BUFFER_BYTES];
        let result = extract_plugin(&staged, dir.path(), max, &mut buf);
        (dir, result)
    }

    fn extracts(layer: &[u8], expected: &[u8]) {
        let (dir, result) = extract(layer, 1 << 24);
        let s = result.unwrap();
        assert_eq!((s.sha256.as_str(), s.len), (sha256_hex(expected).as_str(), expected.len() as u64));
        assert_eq!(std::fs::read(s.file.path()).unwrap(), expected);
        assert!(is_wasm(&s, dir.path()).unwrap() == expected.starts_with(WASM_MAGIC));
    }

    fn fails(layer: &[u8], max: u64) -> FetchError {
        let (dir, result) = extract(layer, max);
        let err = result.err().expect("extraction should fail");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "files left behind");
        err
    }

    #[test]
    fn the_first_plugin_wasm_by_base_name() {
        let m = wasm_module(5000);
        let other = wasm_module(10);
        extracts(&gzip(&tar(&[("plugin.wasm", &m)])), &m);
        extracts(&gzip(&tar(&[("README", b"hi"), ("x/y/plugin.wasm", &m), ("plugin.wasm", &other)])), &m);
        // Not its base name; a directory of that name holds no data and is passed over.
        let dir_entry = tar_records(&[
            (header("plugin.wasm/", b'5', 0), b""),
            (header("a/plugin.wasm", b'0', 8), b"\0asm\x01\0\0\0"),
        ]);
        extracts(&gzip(&dir_entry), b"\0asm\x01\0\0\0");
        extracts(&gzip(&tar(&[("plugin.wasm.bak", &other), ("./plugin.wasm", &m)])), &m);
        // Names from a GNU long name and from a pax path count.
        let long = format!("{}/plugin.wasm\0", "d".repeat(150));
        let gnu = tar_records(&[
            (header("././@LongLink", b'L', long.len() as u64), long.as_bytes()),
            (header("x", b'0', m.len() as u64), &m),
        ]);
        extracts(&gzip(&gnu), &m);
        let pax = pax_record("path", "deep/plugin.wasm");
        let paxed = tar_records(&[
            (header("PaxHeaders.0/x", b'x', pax.len() as u64), &pax),
            (header("x", b'0', m.len() as u64), &m),
        ]);
        extracts(&gzip(&paxed), &m);
        // A pax path names only the next entry (here a directory, passed over).
        let once = tar_records(&[
            (header("PaxHeaders.0/x", b'x', pax.len() as u64), &pax),
            (header("x", b'5', 0), b""),
            (header("y", b'0', 2), b"no"),
        ]);
        assert_eq!(fails(&gzip(&once), 1 << 20).message, "plugin.wasm not found in the archive");
        // Special records up to 1 MiB are followed, as in unboxing.
        extracts(&gzip_tar_with_special(b'x', 1 << 20, &m), &m);
    }

    #[test]
    fn missing_or_unreadable_is_a_download_error() {
        let err = fails(&gzip(&tar(&[("module.wasm", &wasm_module(10))])), 1 << 20);
        assert_eq!(
            (err.kind, err.message.as_str()),
            (FetchErrorKind::Download, "plugin.wasm not found in the archive")
        );
        let err = fails(&wasm_module(100), 1 << 20);
        assert!(err.message.starts_with("failed to parse layer as tar.gz: "), "{}", err.message);
        let m = wasm_module(5000);
        let mut truncated = tar(&[("plugin.wasm", &m)]);
        truncated.truncate(2000);
        let err = fails(&gzip(&truncated), 1 << 20);
        assert_eq!(err.kind, FetchErrorKind::Download);
        assert!(err.message.starts_with("failed to read plugin.wasm: "), "{}", err.message);
        // A special record over 1 MiB is not read.
        let err = fails(&gzip_tar_with_special(b'L', (1 << 20) + 1, &m), 1 << 30);
        assert!(err.message.contains("over the limit of 1048576 bytes for tar headers"), "{}", err.message);
    }

    #[test]
    fn bounded_by_max_module_bytes() {
        let m = wasm_module(5000);
        let err = fails(&gzip(&tar(&[("plugin.wasm", &m)])), 4999);
        assert_eq!(err.kind, FetchErrorKind::TooLarge);
        // A gzip bomb stops at twice the limit (plus 1 MiB) of inflated bytes.
        let err = fails(&gzip_tar_of_zeros(64 << 20), 1 << 20);
        assert_eq!(err.kind, FetchErrorKind::Download);
        assert!(err.message.contains("larger than twice max_module_bytes"), "{}", err.message);
    }

    /// gzip of a tar whose one entry `filler` holds `len` zero bytes, streamed (small in memory and on the wire).
    fn gzip_tar_of_zeros(len: u64) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&header("filler", b'0', len)).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..len / zeros.len() as u64 {
            gz.write_all(&zeros).unwrap();
        }
        gz.finish().unwrap()
    }

    #[test]
    fn base_names_as_go() {
        for (path, base) in [
            ("plugin.wasm", "plugin.wasm"),
            ("a/b/plugin.wasm", "plugin.wasm"),
            ("a/plugin.wasm//", "plugin.wasm"),
            ("/", "/"),
            ("", ""),
            ("a/", "a"),
        ] {
            assert_eq!(base_name(path.as_bytes()), base.as_bytes(), "{path}");
        }
    }
}
