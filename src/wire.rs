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
                let start = self.pos;
                loop {
                    if self.pos >= self.buf.len() {
                        return Err(WireError(format!("group {number} is not closed")));
                    }
                    let before = self.pos;
                    let (inner, inner_type) = self.read_key()?;
                    if inner_type == WireType::EndGroup {
                        if inner != number {
                            return Err(WireError(format!("group {number} closed by end of group {inner}")));
                        }
                        return Ok(&self.buf[start..before]);
                    }
                    self.read_value(inner, inner_type)?;
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

/// Encoded size of a length-delimited field with a payload of `len` bytes.
pub(crate) fn len_field_size(number: u32, len: usize) -> usize {
    prost::encoding::key_len(number) + encoded_len_varint(len as u64) + len
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
        assert_eq!(len_field_size(1, 3), 5);
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
}
