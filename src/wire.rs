//! Lossless protobuf reading and splicing on raw bytes (built on `prost::encoding`). A message is walked
//! field by field; each field keeps the exact bytes it came with (`Field::raw`), so a rewriter copies what
//! it does not change and re-encodes only what it does.

use std::borrow::Cow;
use std::fmt;

use prost::bytes::Buf;
use prost::encoding::{decode_varint, encode_key, encode_varint, WireType};

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

/// Appends a varint field.
pub(crate) fn put_varint(out: &mut Vec<u8>, number: u32, value: u64) {
    encode_key(number, WireType::Varint, out);
    encode_varint(value, out);
}

/// The payloads of every occurrence of the length-delimited field `number`, concatenated: how protobuf merges
/// repeated occurrences of a singular message field. `None` when the field is absent.
pub(crate) fn merged(buf: &[u8], number: u32) -> Result<Option<Cow<'_, [u8]>>, WireError> {
    let mut found: Option<Cow<'_, [u8]>> = None;
    for field in Fields::new(buf) {
        let field = field?;
        if field.number != number {
            continue;
        }
        let payload = field.bytes()?;
        found = Some(match found {
            None => Cow::Borrowed(payload),
            Some(prev) => {
                let mut joined = prev.into_owned();
                joined.extend_from_slice(payload);
                Cow::Owned(joined)
            }
        });
    }
    Ok(found)
}

/// The last occurrence of field `number` (for scalars, strings and bytes the last one wins).
pub(crate) fn last(buf: &[u8], number: u32) -> Result<Option<Field<'_>>, WireError> {
    let mut found = None;
    for field in Fields::new(buf) {
        let field = field?;
        if field.number == number {
            found = Some(field);
        }
    }
    Ok(found)
}

/// The last string value of field `number`, or "" when absent.
pub(crate) fn last_string(buf: &[u8], number: u32) -> Result<&str, WireError> {
    match last(buf, number)? {
        Some(f) => f.string(),
        None => Ok(""),
    }
}

/// A oneof's set member: its field number and (merged) payload.
pub(crate) type OneofMember<'a> = (u32, Cow<'a, [u8]>);

/// The effective member of a oneof whose members are the message fields `members`: the last member seen,
/// with the payloads of its occurrences since any other member was last seen merged (an occurrence of another
/// member clears the earlier value).
pub(crate) fn oneof<'a>(buf: &'a [u8], members: &[u32]) -> Result<Option<OneofMember<'a>>, WireError> {
    let mut current: Option<OneofMember<'a>> = None;
    for field in Fields::new(buf) {
        let field = field?;
        if !members.contains(&field.number) {
            continue;
        }
        current = Some(match current {
            Some((number, prev)) if number == field.number && field.wire_type == WireType::LengthDelimited => {
                let mut joined = prev.into_owned();
                joined.extend_from_slice(field.payload);
                (number, Cow::Owned(joined))
            }
            _ => (field.number, Cow::Borrowed(field.payload)),
        });
    }
    Ok(current)
}

/// Rebuilds `buf` without any occurrence of field `number` and, when `payload` is given, with one
/// length-delimited field `number` where its last occurrence was (appended when it was absent). Every other
/// field keeps its bytes; a single occurrence whose payload does not change keeps its bytes too.
pub(crate) fn replace_merged(buf: &[u8], number: u32, payload: Option<&[u8]>) -> Result<Vec<u8>, WireError> {
    let fields: Vec<Field<'_>> = Fields::new(buf).collect::<Result<_, _>>()?;
    let count = fields.iter().filter(|f| f.number == number).count();
    let last_index = fields.iter().rposition(|f| f.number == number);
    let mut out = Vec::with_capacity(buf.len() + payload.map_or(0, |p| p.len() + 10));
    for (i, field) in fields.iter().enumerate() {
        if field.number != number {
            out.extend_from_slice(field.raw);
        } else if Some(i) == last_index {
            if let Some(p) = payload {
                if count == 1 && field.wire_type == WireType::LengthDelimited && field.payload == p {
                    out.extend_from_slice(field.raw);
                } else {
                    put_len(&mut out, number, p);
                }
            }
        }
    }
    if last_index.is_none() {
        if let Some(p) = payload {
            put_len(&mut out, number, p);
        }
    }
    Ok(out)
}

/// Rebuilds `buf` with the last occurrence of field `number` replaced by a length-delimited `payload`
/// (appended when absent). Earlier occurrences are overridden values and keep their bytes.
pub(crate) fn replace_last(buf: &[u8], number: u32, payload: &[u8]) -> Result<Vec<u8>, WireError> {
    let fields: Vec<Field<'_>> = Fields::new(buf).collect::<Result<_, _>>()?;
    let last_index = fields.iter().rposition(|f| f.number == number);
    let mut out = Vec::with_capacity(buf.len() + payload.len() + 10);
    for (i, field) in fields.iter().enumerate() {
        if Some(i) == last_index {
            put_len(&mut out, number, payload);
        } else {
            out.extend_from_slice(field.raw);
        }
    }
    if last_index.is_none() {
        put_len(&mut out, number, payload);
    }
    Ok(out)
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
    fn deeply_nested_groups_do_not_recurse() {
        let mut msg = vec![0x0b; 100_000];
        msg.extend(std::iter::repeat_n(0x0c, 100_000));
        assert!(check(&msg).is_ok());
        assert!(check(&vec![0x0b; 100_000]).is_err());
    }

    #[test]
    fn merge_oneof_and_replace() {
        let mut msg = Vec::new();
        put_len(&mut msg, 1, b"ab");
        put_varint(&mut msg, 2, 1);
        put_len(&mut msg, 1, b"cd");
        assert_eq!(merged(&msg, 1).unwrap().unwrap().as_ref(), b"abcd");
        assert!(merged(&msg, 3).unwrap().is_none());
        assert_eq!(last(&msg, 1).unwrap().unwrap().payload, b"cd");
        let out = replace_merged(&msg, 1, Some(b"x")).unwrap();
        assert_eq!(out, vec![0x10, 1, 0x0a, 1, b'x']);
        let out = replace_merged(&msg, 1, None).unwrap();
        assert_eq!(out, vec![0x10, 1]);
        let out = replace_last(&msg, 1, b"x").unwrap();
        assert_eq!(out, vec![0x0a, 2, b'a', b'b', 0x10, 1, 0x0a, 1, b'x']);
        // oneof: 1, 2, 1, 1 -> member 1 with the last two merged
        let mut o = Vec::new();
        put_len(&mut o, 1, b"a");
        put_len(&mut o, 2, b"b");
        put_len(&mut o, 1, b"c");
        put_len(&mut o, 1, b"d");
        let (n, p) = oneof(&o, &[1, 2]).unwrap().unwrap();
        assert_eq!((n, p.as_ref()), (1, &b"cd"[..]));
        // unchanged single occurrence keeps non-minimal length bytes
        let odd = vec![0x0a, 0x81, 0x00, b'z'];
        assert_eq!(replace_merged(&odd, 1, Some(b"z")).unwrap(), odd);
    }
}
