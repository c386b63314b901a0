//! Lossless protobuf reading and splicing on raw bytes (built on `prost::encoding`). A message is walked
//! field by field; each field keeps the exact bytes it came with (`Field::raw`), so a rewriter copies what
//! it does not change and re-encodes only what it does.

use std::fmt;

use prost::bytes::Buf;
use prost::encoding::{decode_varint, encode_key, encode_varint, encoded_len_varint, WireType};

/// Malformed wire data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WireError(pub String);

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WireError {}

/// One field as it sits on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Field<'a> {
    pub number: u32,
    pub wire_type: WireType,
    /// The value: the payload of a LEN field, the 8/4 bytes of I64/I32, the varint's bytes, or a group's
    /// contents (without its end tag).
    pub payload: &'a [u8],
    /// The whole field: key and value, exactly as read.
    pub raw: &'a [u8],
}

impl<'a> Field<'a> {
    /// The payload of a length-delimited field (string, bytes, message, packed).
    pub fn bytes(&self) -> Result<&'a [u8], WireError> {
        if self.wire_type == WireType::LengthDelimited {
            Ok(self.payload)
        } else {
            Err(self.wrong_type("length-delimited"))
        }
    }

    /// A proto3 string: length-delimited and valid UTF-8 (Go's decoder enforces both).
    pub fn string(&self) -> Result<&'a str, WireError> {
        let bytes = self.bytes()?;
        std::str::from_utf8(bytes).map_err(|_| WireError(format!("field {} is not valid UTF-8", self.number)))
    }

    pub fn varint(&self) -> Result<u64, WireError> {
        if self.wire_type != WireType::Varint {
            return Err(self.wrong_type("varint"));
        }
        let mut buf = self.payload;
        decode_varint(&mut buf).map_err(|e| WireError(e.to_string()))
    }

    pub fn wrong_type(&self, wanted: &str) -> WireError {
        WireError(format!("field {} has wire type {:?}, want {wanted}", self.number, self.wire_type))
    }
}

/// Iterates the fields of one message. After the first error it yields nothing more.
pub(crate) struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Fields<'a> {
    pub fn new(buf: &'a [u8]) -> Fields<'a> {
        Fields { buf, pos: 0, failed: false }
    }

    #[inline]
    fn read_field(&mut self) -> Result<Field<'a>, WireError> {
        let start = self.pos;
        let (number, wire_type) = self.read_key()?;
        let payload = self.read_value(number, wire_type)?;
        Ok(Field { number, wire_type, payload, raw: &self.buf[start..self.pos] })
    }

    fn read_key(&mut self) -> Result<(u32, WireType), WireError> {
        let key = self.read_varint().map_err(|e| WireError(format!("bad field key at byte {}: {e}", self.pos)))?;
        if key > u64::from(u32::MAX) {
            return Err(WireError(format!("field key {key} out of range at byte {}", self.pos)));
        }
        let wire_type = WireType::try_from(key & 0x7)
            .map_err(|_| WireError(format!("invalid wire type {} at byte {}", key & 0x7, self.pos)))?;
        let number = (key >> 3) as u32;
        if number == 0 {
            return Err(WireError(format!("field number 0 at byte {}", self.pos)));
        }
        Ok((number, wire_type))
    }

    fn read_varint(&mut self) -> Result<u64, WireError> {
        // Keys and most lengths take one or two bytes: decoded here without the generic decoder's set-up,
        // which keeps a cache-hit push under its benchmark target (≤ 2.5× a prost decode and re-encode).
        match self.buf.get(self.pos..) {
            Some([b0, ..]) if *b0 < 0x80 => {
                self.pos += 1;
                return Ok(u64::from(*b0));
            }
            Some([b0, b1, ..]) if *b1 < 0x80 => {
                self.pos += 2;
                return Ok(u64::from(*b0 & 0x7f) | u64::from(*b1) << 7);
            }
            _ => {}
        }
        let mut rest = &self.buf[self.pos..];
        let before = rest.remaining();
        let v = decode_varint(&mut rest).map_err(|e| WireError(e.to_string()))?;
        self.pos += before - rest.remaining();
        Ok(v)
    }

    fn take(&mut self, n: usize, number: u32) -> Result<&'a [u8], WireError> {
        if self.buf.len() - self.pos < n {
            return Err(WireError(format!(
                "field {number} is truncated: needs {n} bytes, {} left",
                self.buf.len() - self.pos
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn read_value(&mut self, number: u32, wire_type: WireType) -> Result<&'a [u8], WireError> {
        match wire_type {
            WireType::Varint => {
                let start = self.pos;
                self.read_varint().map_err(|e| WireError(format!("field {number}: {e}")))?;
                Ok(&self.buf[start..self.pos])
            }
            WireType::SixtyFourBit => self.take(8, number),
            WireType::ThirtyTwoBit => self.take(4, number),
            WireType::LengthDelimited => {
                let len = self.read_varint().map_err(|e| WireError(format!("field {number}: bad length: {e}")))?;
                let len =
                    usize::try_from(len).map_err(|_| WireError(format!("field {number}: length {len} too large")))?;
                self.take(len, number)
            }
            WireType::StartGroup => {
                // Iterative, so that deeply nested groups cannot exhaust the stack.
                let start = self.pos;
                let mut open = vec![number];
                loop {
                    if self.pos >= self.buf.len() {
                        return Err(WireError(format!("group {number} is not closed")));
                    }
                    let before = self.pos;
                    let (inner, inner_type) = self.read_key()?;
                    match inner_type {
                        WireType::EndGroup => {
                            if open.pop() != Some(inner) {
                                return Err(WireError(format!("group {number} closed by end of group {inner}")));
                            }
                            if open.is_empty() {
                                return Ok(&self.buf[start..before]);
                            }
                        }
                        WireType::StartGroup if open.len() >= MAX_GROUP_DEPTH => {
                            return Err(WireError(format!(
                                "group {number}: groups nested deeper than {MAX_GROUP_DEPTH}"
                            )));
                        }
                        WireType::StartGroup => open.push(inner),
                        other => {
                            self.read_value(inner, other)?;
                        }
                    }
                }
            }
            WireType::EndGroup => Err(WireError(format!("unexpected end of group {number}"))),
        }
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, WireError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        let result = self.read_field();
        self.failed = result.is_err();
        Some(result)
    }
}

/// Checks that `buf` is a well-formed sequence of fields (not what they mean).
pub(crate) fn check(buf: &[u8]) -> Result<(), WireError> {
    Fields::new(buf).try_for_each(|f| f.map(|_| ()))
}

/// Appends a length-delimited field.
pub(crate) fn put_len(out: &mut Vec<u8>, number: u32, payload: &[u8]) {
    encode_key(number, WireType::LengthDelimited, out);
    encode_varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// Appends a length-delimited field whose payload `write` appends to `out`: the payload is written in place
/// and its length inserted before it afterwards (one move of the payload, no buffer of its own), so that
/// nested messages are encoded without each level copying its children. Returns the payload's length.
pub(crate) fn put_len_with<E>(
    out: &mut Vec<u8>,
    number: u32,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<usize, E> {
    encode_key(number, WireType::LengthDelimited, out);
    let start = out.len();
    write(out)?;
    let len = out.len() - start;
    let prefix = encoded_len_varint(len as u64);
    out.resize(out.len() + prefix, 0);
    out.copy_within(start..start + len, start + prefix);
    encode_varint(len as u64, &mut &mut out[start..start + prefix]);
    Ok(len)
}

/// Appends a varint field.
pub(crate) fn put_varint(out: &mut Vec<u8>, number: u32, value: u64) {
    encode_key(number, WireType::Varint, out);
    encode_varint(value, out);
}

/// How many merged levels one [`Msg`] can stack. The readers' paths are fixed by the code, never by the data:
/// the deepest is `Wasm` → `config` → `vm_config` → `code` → `remote` → `http_uri` → `timeout` (6 levels, and
/// only when every one of them occurs more than once).
const MAX_PATH: usize = 8;

/// How deeply groups may nest when one is skipped: protobuf's own recursion limit (100 in the C++, Java and
/// Go runtimes, and prost). Groups are deprecated and no Envoy config uses them; the limit keeps the stack of
/// open groups small instead of growing with the input.
const MAX_GROUP_DEPTH: usize = 100;

/// One step from a message to a merged sub-message: the occurrences of field `number`, ignoring the first
/// `skip` fields of the parent (a oneof member's occurrences since another member was last seen).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Step {
    number: u32,
    skip: u32,
}

/// A message as protobuf reads it, read in place. A singular message field may occur more than once, and a
/// parser merges the occurrences, which is the same as parsing the concatenation of their payloads (protobuf.dev
/// `programming-guides/encoding`, "Last One Wins": "for embedded message fields, the parser merges multiple
/// instances of the same field, as if with the `Message::MergeFrom` method"). A `Msg` is a buffer (`root`)
/// and the merged fields that lead from it to the message (`path`); its fields are those of the concatenation,
/// walked without building it, so that no level of repeated occurrences copies what lies under it. A message
/// that occurs once is its own root: the usual case costs what reading a slice costs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Msg<'a> {
    root: &'a [u8],
    path: [Step; MAX_PATH],
    depth: usize,
}

impl<'a> From<&'a [u8]> for Msg<'a> {
    fn from(buf: &'a [u8]) -> Msg<'a> {
        Msg { root: buf, path: [Step::default(); MAX_PATH], depth: 0 }
    }
}

impl<'a> From<&'a Vec<u8>> for Msg<'a> {
    fn from(buf: &'a Vec<u8>) -> Msg<'a> {
        Msg::from(buf.as_slice())
    }
}

impl<'a> Msg<'a> {
    /// The fields of the message, in order, across all its occurrences.
    pub fn fields(&self) -> MsgFields<'a> {
        if self.depth == 0 {
            return MsgFields::One(Fields::new(self.root));
        }
        MsgFields::Merged(Box::new(Walk {
            msg: *self,
            levels: std::array::from_fn(|i| Fields::new(if i == 0 { self.root } else { &[] })),
            seen: [0; MAX_PATH],
            open: 0,
            done: false,
        }))
    }

    /// The merged message field `number` (`None` when it does not occur).
    pub fn child(&self, number: u32) -> Result<Option<Msg<'a>>, WireError> {
        let mut count = 0;
        let mut only: &[u8] = &[];
        for field in self.fields() {
            let field = field?;
            if field.number == number {
                only = field.bytes()?;
                count += 1;
            }
        }
        Ok(match count {
            0 => None,
            1 => Some(Msg::from(only)),
            _ => Some(self.below(Step { number, skip: 0 })),
        })
    }

    /// The message one merged field further down.
    fn below(&self, step: Step) -> Msg<'a> {
        assert!(self.depth < MAX_PATH, "merged messages nested deeper than the readers' paths");
        let mut merged = *self;
        merged.path[self.depth] = step;
        merged.depth += 1;
        merged
    }

    /// The last occurrence of field `number` (for scalars, strings and bytes the last one wins).
    pub fn last(&self, number: u32) -> Result<Option<Field<'a>>, WireError> {
        let mut found = None;
        for field in self.fields() {
            let field = field?;
            if field.number == number {
                found = Some(field);
            }
        }
        Ok(found)
    }

    /// The last string value of field `number`, or "" when absent.
    pub fn last_string(&self, number: u32) -> Result<&'a str, WireError> {
        match self.last(number)? {
            Some(f) => f.string(),
            None => Ok(""),
        }
    }

    /// The set member of a oneof whose members are the fields `members`: the last member seen, its last
    /// occurrence (which decides a scalar member), and, for a message member, its occurrences since any other
    /// member was last seen, merged (an occurrence of another member clears the earlier value).
    pub fn oneof(&self, members: &[u32]) -> Result<Option<OneofMember<'a>>, WireError> {
        // The set member, the index of its first field since another member was seen, how many times it
        // occurred since then, and its last occurrence.
        let mut set: Option<(u32, usize, usize, Field<'a>)> = None;
        for (index, field) in self.fields().enumerate() {
            let field = field?;
            if !members.contains(&field.number) {
                continue;
            }
            set = Some(match set {
                Some((number, since, count, _)) if number == field.number => (number, since, count + 1, field),
                _ => (field.number, index, 1, field),
            });
        }
        let Some((number, since, count, last)) = set else { return Ok(None) };
        let merged = if last.wire_type != WireType::LengthDelimited {
            Msg::from(&[][..])
        } else if count == 1 {
            Msg::from(last.payload)
        } else {
            let skip =
                u32::try_from(since).map_err(|_| WireError(format!("a message of more than {} fields", u32::MAX)))?;
            self.below(Step { number, skip })
        };
        Ok(Some(OneofMember { number, last, merged }))
    }
}

/// A oneof's set member (see [`Msg::oneof`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct OneofMember<'a> {
    pub number: u32,
    /// Its last occurrence.
    pub last: Field<'a>,
    /// A message member's occurrences, merged (empty for a scalar member).
    pub merged: Msg<'a>,
}

/// The fields of a [`Msg`]. After the first error it yields nothing more.
pub(crate) enum MsgFields<'a> {
    /// A message that occurs once: its own fields.
    One(Fields<'a>),
    /// A merged message: a walk down its path.
    Merged(Box<Walk<'a>>),
}

impl<'a> Iterator for MsgFields<'a> {
    type Item = Result<Field<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            MsgFields::One(fields) => fields.next(),
            MsgFields::Merged(walk) => walk.next(),
        }
    }
}

/// The walk down a merged message's path, one level of [`Fields`] per merged field.
pub(crate) struct Walk<'a> {
    msg: Msg<'a>,
    levels: [Fields<'a>; MAX_PATH + 1],
    /// How many fields each level has yielded so far, across all the occurrences it walks (for `Step::skip`).
    seen: [u64; MAX_PATH],
    /// The innermost level being walked.
    open: usize,
    done: bool,
}

impl<'a> Iterator for Walk<'a> {
    type Item = Result<Field<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let level = self.open;
            match self.levels[level].next() {
                None if level == 0 => self.done = true,
                None => self.open -= 1,
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Some(Ok(field)) if level == self.msg.depth => return Some(Ok(field)),
                Some(Ok(field)) => {
                    let step = self.msg.path[level];
                    let index = self.seen[level];
                    self.seen[level] += 1;
                    if field.number == step.number && index >= u64::from(step.skip) {
                        match field.bytes() {
                            Ok(payload) => {
                                self.open += 1;
                                self.levels[self.open] = Fields::new(payload);
                            }
                            Err(e) => {
                                self.done = true;
                                return Some(Err(e));
                            }
                        }
                    }
                }
            }
        }
        None
    }
}

/// The last string value of field `number`, or "" when absent.
pub(crate) fn last_string<'a>(msg: impl Into<Msg<'a>>, number: u32) -> Result<&'a str, WireError> {
    msg.into().last_string(number)
}

/// Which occurrences of a field a rebuild replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replace {
    /// Every one: a singular message field, whose occurrences merge into the one written. A single occurrence
    /// whose payload does not change keeps its bytes.
    Merged,
    /// The last: a field whose last occurrence wins (scalar, string, bytes); earlier ones are overridden values
    /// and keep their bytes.
    Last,
}

/// Appends `msg` (its occurrences merged into one) to `out` with field `number` replaced (see [`Replace`]) by
/// one length-delimited field whose payload `write` appends in place, where its last occurrence was (appended
/// when absent); `write` `None` removes the field. Every other field keeps its bytes. `payload_hint` (the
/// payload's expected size) sizes `out` once, so that nested rebuilds write into one buffer.
pub(crate) fn rebuild<'a, E: From<WireError>>(
    out: &mut Vec<u8>,
    msg: impl Into<Msg<'a>>,
    number: u32,
    replace: Replace,
    payload_hint: usize,
    write: Option<impl FnOnce(&mut Vec<u8>) -> Result<(), E>>,
) -> Result<(), E> {
    let msg = msg.into();
    let survey = survey(&msg, number)?;
    let kept = if replace == Replace::Last { survey.earlier } else { 0 };
    out.reserve(survey.others + kept + payload_hint + 15);
    let mut write = write;
    for (i, field) in msg.fields().enumerate() {
        let field = field?;
        if field.number != number {
            out.extend_from_slice(field.raw);
        } else if Some(i) == survey.last_index {
            let Some(write) = write.take() else { continue };
            let start = out.len();
            let len = put_len_with(out, number, write)?;
            let unchanged = replace == Replace::Merged
                && survey.count == 1
                && field.wire_type == WireType::LengthDelimited
                && out[out.len() - len..] == *field.payload;
            if unchanged {
                out.truncate(start);
                out.extend_from_slice(field.raw);
            }
        } else if replace == Replace::Last {
            out.extend_from_slice(field.raw);
        }
    }
    if let Some(write) = write {
        put_len_with(out, number, write)?;
    }
    Ok(())
}

/// [`rebuild`] with `payload` (or without the field: `None`), `Replace::Merged`, into a new buffer.
pub(crate) fn replace_merged<'a>(
    msg: impl Into<Msg<'a>>,
    number: u32,
    payload: Option<&[u8]>,
) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    let write = payload.map(|p| {
        move |out: &mut Vec<u8>| {
            out.extend_from_slice(p);
            Ok::<(), WireError>(())
        }
    });
    rebuild(&mut out, msg, number, Replace::Merged, payload.map_or(0, <[u8]>::len), write)?;
    Ok(out)
}

/// [`rebuild`] with `payload`, `Replace::Last`, into a new buffer.
pub(crate) fn replace_last<'a>(msg: impl Into<Msg<'a>>, number: u32, payload: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    let write = |out: &mut Vec<u8>| {
        out.extend_from_slice(payload);
        Ok::<(), WireError>(())
    };
    rebuild(&mut out, msg, number, Replace::Last, payload.len(), Some(write))?;
    Ok(out)
}

/// What the rebuilders need to know of field `number` in `msg` before they write: found by a walk, instead of a
/// list of the fields, whose entries would outweigh fields of a few bytes.
struct Survey {
    /// How many times it occurs, and where last (as an index among all fields).
    count: usize,
    last_index: Option<usize>,
    /// The size of every other field, and of its occurrences before the last.
    others: usize,
    earlier: usize,
}

fn survey(msg: &Msg<'_>, number: u32) -> Result<Survey, WireError> {
    let mut s = Survey { count: 0, last_index: None, others: 0, earlier: 0 };
    let mut last_size = 0;
    for (i, field) in msg.fields().enumerate() {
        let field = field?;
        if field.number == number {
            s.count += 1;
            s.last_index = Some(i);
            s.earlier += last_size;
            last_size = field.raw.len();
        } else {
            s.others += field.raw.len();
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_keep_their_raw_bytes() {
        let mut msg = Vec::new();
        put_len(&mut msg, 1, b"abc");
        put_varint(&mut msg, 3, 300);
        msg.extend_from_slice(&[0x2d, 1, 2, 3, 4]); // field 5, I32
        let fields: Vec<_> = Fields::new(&msg).collect::<Result<_, _>>().unwrap();
        assert_eq!(fields.len(), 3);
        assert_eq!(fields[0].string().unwrap(), "abc");
        assert_eq!(fields[1].varint().unwrap(), 300);
        assert_eq!(fields[2].payload, &[1, 2, 3, 4]);
        let joined: Vec<u8> = fields.iter().flat_map(|f| f.raw.iter().copied()).collect();
        assert_eq!(joined, msg);
    }

    #[test]
    fn truncated_and_invalid_input_is_an_error() {
        assert!(check(&[0x0a, 5, b'a']).is_err()); // length past the end
        assert!(check(&[0x0f]).is_err()); // wire type 7
        assert!(check(&[0x00]).is_err()); // field number 0
        assert!(check(&[0x08]).is_err()); // varint missing
        assert!(check(&[0x0b, 0x10, 0x01]).is_err()); // open group
        assert!(check(&[0x0b, 0x10, 0x01, 0x0c]).is_ok()); // closed group
        assert!(check(&[]).is_ok());
    }

    #[test]
    fn wrong_wire_type_is_reported() {
        let mut msg = Vec::new();
        put_varint(&mut msg, 1, 7);
        let f = Fields::new(&msg).next().unwrap().unwrap();
        assert!(f.bytes().is_err());
        assert!(f.string().is_err());
        let mut msg = Vec::new();
        put_len(&mut msg, 1, &[0xff, 0xfe]);
        assert!(Fields::new(&msg).next().unwrap().unwrap().string().is_err());
    }

    #[test]
    fn nested_groups_are_skipped_up_to_the_depth_limit() {
        let nested = |depth: usize| {
            let mut msg = vec![0x0b; depth];
            msg.extend(std::iter::repeat_n(0x0c, depth));
            msg
        };
        assert!(check(&nested(MAX_GROUP_DEPTH)).is_ok());
        let err = check(&nested(MAX_GROUP_DEPTH + 1)).unwrap_err();
        assert!(err.0.contains("nested deeper than 100"), "{}", err.0);
        assert!(check(&vec![0x0b; 100_000]).is_err());
    }

    #[test]
    fn merge_oneof_and_replace() {
        let mut msg = Vec::new();
        put_len(&mut msg, 1, b"ab");
        put_varint(&mut msg, 2, 1);
        put_len(&mut msg, 1, b"cd");
        let m = Msg::from(&msg);
        assert!(m.child(3).unwrap().is_none());
        assert_eq!(m.last(1).unwrap().unwrap().payload, b"cd");
        let out = replace_merged(&msg, 1, Some(b"x")).unwrap();
        assert_eq!(out, vec![0x10, 1, 0x0a, 1, b'x']);
        let out = replace_merged(&msg, 1, None).unwrap();
        assert_eq!(out, vec![0x10, 1]);
        let out = replace_last(&msg, 1, b"x").unwrap();
        assert_eq!(out, vec![0x0a, 2, b'a', b'b', 0x10, 1, 0x0a, 1, b'x']);
        // oneof: 1, 2, 1, 1 -> member 1 with the last two merged
        let mut o = Vec::new();
        put_len(&mut o, 1, &[0x08, 1]);
        put_len(&mut o, 2, &[0x08, 2]);
        put_len(&mut o, 1, &[0x08, 3]);
        put_len(&mut o, 1, &[0x10, 4]);
        let member = Msg::from(&o).oneof(&[1, 2]).unwrap().unwrap();
        assert_eq!((member.number, member.last.payload), (1, &[0x10, 4][..]));
        assert_eq!(raw(member.merged), [0x08, 3, 0x10, 4]);
        // a scalar member: the last occurrence decides
        let mut o = Vec::new();
        put_len(&mut o, 1, b"m");
        put_varint(&mut o, 2, 5);
        put_varint(&mut o, 2, 6);
        let member = Msg::from(&o).oneof(&[1, 2]).unwrap().unwrap();
        assert_eq!((member.number, member.last.varint().unwrap()), (2, 6));
        // unchanged single occurrence keeps non-minimal length bytes
        let odd = vec![0x0a, 0x81, 0x00, b'z'];
        assert_eq!(replace_merged(&odd, 1, Some(b"z")).unwrap(), odd);
    }

    /// The fields of a merged message, as one buffer.
    fn raw(msg: Msg<'_>) -> Vec<u8> {
        msg.fields().flat_map(|f| f.unwrap().raw.to_vec()).collect()
    }

    /// Reading merged occurrences in place gives the fields of their concatenation, at every level, and
    /// rebuilding one gives the concatenation with the change.
    #[test]
    fn merged_occurrences_read_as_their_concatenation() {
        // c = {1: "x", 2: 7}, split as c1 = {1: "x"}, c2 = {2: 7}; b = {9: "b", 3: c1}, {3: c2};
        // a = {5: b1, 5: b2, 6: "a"}
        let (mut c1, mut c2) = (Vec::new(), Vec::new());
        put_len(&mut c1, 1, b"x");
        put_varint(&mut c2, 2, 7);
        let (mut b1, mut b2) = (Vec::new(), Vec::new());
        put_len(&mut b1, 9, b"b");
        put_len(&mut b1, 3, &c1);
        put_len(&mut b2, 3, &c2);
        let mut a = Vec::new();
        put_len(&mut a, 5, &b1);
        put_len(&mut a, 5, &b2);
        put_len(&mut a, 6, b"a");
        let b = Msg::from(&a).child(5).unwrap().unwrap();
        assert_eq!(raw(b), [b1.clone(), b2.clone()].concat());
        let c = b.child(3).unwrap().unwrap();
        assert_eq!(raw(c), [c1.clone(), c2.clone()].concat());
        assert_eq!(c.last_string(1).unwrap(), "x");
        assert_eq!(c.last(2).unwrap().unwrap().varint().unwrap(), 7);
        // one occurrence is its own root
        let single = Msg::from(&b1).child(3).unwrap().unwrap();
        assert_eq!((single.depth, single.root), (0, &c1[..]));
        // rebuilding a merged message: every field of the concatenation but the replaced one
        let rebuilt = replace_merged(b, 3, Some(b"new")).unwrap();
        let mut want = Vec::new();
        put_len(&mut want, 9, b"b");
        put_len(&mut want, 3, b"new");
        assert_eq!(rebuilt, want);
        // malformed input under a merged level is an error, not a silent end
        let mut bad = a.clone();
        put_len(&mut bad, 5, &[0x1a, 0x05]);
        let b = Msg::from(&bad).child(5).unwrap().unwrap();
        assert!(b.child(3).is_err());
        assert!(b.fields().any(|f| f.is_err()));
    }
}
