//! Hand-built tar records and gzip streams for hostile-archive tests.
//!
//! Part of the test kit: `use wasm_ecds_testkit::archives::{header, tar_records, ...};`. The `tar` crate's
//! builder only writes well-formed archives; these helpers write exactly the records a test names, with the
//! entry type and declared size it chooses (special records: GNU long name `L`, GNU long link `K`, pax `x`
//! and `g`). The large ones stream through gzip, so a record of hundreds of MiB costs the test a few hundred
//! KB of memory and of wire.

use std::io::{self, Write};

/// The size of a tar block (header or data padding unit).
pub const BLOCK: usize = 512;

/// One tar header block: `name`, entry type `kind` (a typeflag byte: `b'0'`, `b'5'`, `b'L'`, `b'x'`, ...),
/// declared `size`, mode 0644 and a valid checksum. GNU format for the GNU types (`L`, `K`, `S`), POSIX
/// ustar otherwise.
pub fn header(name: &str, kind: u8, size: u64) -> [u8; BLOCK] {
    let mut h = if matches!(kind, b'L' | b'K' | b'S') { tar::Header::new_gnu() } else { tar::Header::new_ustar() };
    assert!(name.len() <= 100, "a header name holds at most 100 bytes");
    h.as_mut_bytes()[..name.len()].copy_from_slice(name.as_bytes());
    h.set_mode(0o644);
    h.set_size(size);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_cksum();
    *h.as_bytes()
}

/// One pax record, `"<length> <key>=<value>\n"`, whose decimal length counts the whole record.
pub fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    format!("{len} {key}={value}\n").into_bytes()
}

/// A tar of these records in order: each header block, its data padded to a whole block, then the two zero
/// end blocks. The data need not match the declared size (for truncated or lying records).
pub fn tar_records(records: &[([u8; BLOCK], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (header, data) in records {
        out.extend_from_slice(header);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(BLOCK), 0);
    }
    out.resize(out.len() + 2 * BLOCK, 0);
    out
}

/// gzip of a tar whose first record is a `kind` special record (`L`, `K`, `x` or `g`) that declares and holds
/// `len` bytes — for `L`/`K` a name of `a`s ending in NUL, for `x`/`g` one `comment` pax record — followed by
/// `file` as `plugin.wasm`. Built as a stream: memory does not grow with `len` (200 MiB compress to ~200 KB).
pub fn gzip_tar_with_special(kind: u8, len: u64, file: &[u8]) -> Vec<u8> {
    assert!(len >= 32, "room for a pax record");
    let name = match kind {
        b'L' | b'K' => "././@LongLink",
        b'x' => "PaxHeaders.0/plugin.wasm",
        b'g' => "GlobalHead.0.0",
        _ => panic!("not a special record type: {}", kind as char),
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut write = || -> io::Result<()> {
        gz.write_all(&header(name, kind, len))?;
        match kind {
            b'L' | b'K' => {
                write_repeated(&mut gz, b'a', len - 1)?;
                gz.write_all(b"\0")?;
            }
            _ => {
                let prefix = format!("{len} comment=");
                gz.write_all(prefix.as_bytes())?;
                write_repeated(&mut gz, b'a', len - prefix.len() as u64 - 1)?;
                gz.write_all(b"\n")?;
            }
        }
        write_repeated(&mut gz, 0, padding(len))?;
        gz.write_all(&header("plugin.wasm", b'0', file.len() as u64))?;
        gz.write_all(file)?;
        write_repeated(&mut gz, 0, padding(file.len() as u64) + 2 * BLOCK as u64)
    };
    write().expect("gzip into memory");
    gz.finish().expect("gzip into memory")
}

/// gzip of `len` zero bytes, built as a stream (a gzip bomb: 64 MiB compress to ~64 KB).
pub fn gzip_zeros(len: u64) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    write_repeated(&mut gz, 0, len).expect("gzip into memory");
    gz.finish().expect("gzip into memory")
}

/// Zero bytes from `len` to the next whole block.
fn padding(len: u64) -> u64 {
    len.next_multiple_of(BLOCK as u64) - len
}

fn write_repeated(out: &mut impl Write, byte: u8, mut n: u64) -> io::Result<()> {
    let chunk = [byte; 64 * 1024];
    while n > 0 {
        let k = n.min(chunk.len() as u64) as usize;
        out.write_all(&chunk[..k])?;
        n -= k as u64;
    }
    Ok(())
}
