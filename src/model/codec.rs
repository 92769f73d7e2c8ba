//! Vector codec: arguments arrive as little-endian FP32 bytes or as a JSON
//! array of numbers; entries are stored as exactly the FP32 bytes.

#[derive(Debug, PartialEq)]
pub enum VectorError {
    Empty,
    NotMultipleOf4(usize),
    BadJson { column: usize },
    NotFinite { index: usize },
    TooManyDims { dims: usize, max: usize },
    JsonTooLong { max: usize },
}

impl VectorError {
    pub fn message(&self) -> String {
        match self {
            VectorError::Empty => "ERR vector is empty".into(),
            VectorError::NotMultipleOf4(n) => format!(
                "ERR vector is {n} bytes, not a multiple of 4 (FP32); \
                 send little-endian float32 bytes or a JSON array"
            ),
            VectorError::BadJson { column } => {
                format!("ERR vector is not a JSON array of numbers (error at byte {column})")
            }
            VectorError::NotFinite { index } => {
                format!("ERR vector element {index} is NaN, infinite or outside the float32 range")
            }
            VectorError::JsonTooLong { max } => {
                // A JSON array is read no further than one past the limit.
                format!("ERR vector has more than max-dims {max} dimensions")
            }
            VectorError::TooManyDims { dims, max } => {
                format!("ERR vector has {dims} dimensions, more than max-dims {max}")
            }
        }
    }
}

/// An argument is JSON when it starts with `[` and either ends with `]` or is
/// all printable ASCII (so a mistyped `[1,2` is a JSON error, not a stored
/// 1-d vector). Real FP32 embeddings never look like that: it would take a
/// last element near 2^59, or every byte of the vector being printable.
pub fn looks_like_json(arg: &[u8]) -> bool {
    arg.first() == Some(&b'[')
        && (arg.last() == Some(&b']')
            || arg
                .iter()
                .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace()))
}

/// Parses a vector argument into validated little-endian FP32 bytes.
pub fn parse_vector(arg: &[u8], max_dims: usize) -> Result<Vec<u8>, VectorError> {
    if looks_like_json(arg) {
        return parse_json(arg, max_dims);
    }
    if arg.is_empty() {
        return Err(VectorError::Empty);
    }
    if arg.len() % 4 != 0 {
        return Err(VectorError::NotMultipleOf4(arg.len()));
    }
    let dims = arg.len() / 4;
    if dims > max_dims {
        return Err(VectorError::TooManyDims {
            dims,
            max: max_dims,
        });
    }
    if let Some(index) = arg
        .chunks_exact(4)
        .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
    {
        return Err(VectorError::NotFinite { index });
    }
    Ok(arg.to_vec())
}

/// Streams the array into FP32 bytes and stops at element `max_dims + 1`:
/// memory stays within the limit whatever the argument's size.
fn parse_json(arg: &[u8], max_dims: usize) -> Result<Vec<u8>, VectorError> {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};

    struct Floats {
        max_dims: usize,
    }

    /// Why the visitor stopped early; serde's error only carries text.
    const TOO_MANY: &str = "aicache: too many dimensions";
    const NOT_FINITE: &str = "aicache: not finite";

    impl<'de> Visitor<'de> for Floats {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array of numbers")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.max_dims) * 4);
            while let Some(v) = seq.next_element::<f64>()? {
                if out.len() / 4 == self.max_dims {
                    return Err(A::Error::custom(TOO_MANY));
                }
                let f = v as f32;
                if !f.is_finite() {
                    return Err(A::Error::custom(format!("{NOT_FINITE} {}", out.len() / 4)));
                }
                out.extend_from_slice(&f.to_le_bytes());
            }
            Ok(out)
        }
    }

    let mut de = serde_json::Deserializer::from_slice(arg);
    let parsed = de
        .deserialize_seq(Floats { max_dims })
        .and_then(|v| de.end().map(|()| v));
    let out = match parsed {
        Ok(v) => v,
        Err(e) if e.to_string().starts_with(TOO_MANY) => {
            return Err(VectorError::JsonTooLong { max: max_dims })
        }
        Err(e) if e.to_string().starts_with(NOT_FINITE) => {
            let msg = e.to_string();
            let index = msg[NOT_FINITE.len()..]
                .split_whitespace()
                .next()
                .and_then(|i| i.parse().ok())
                .unwrap_or(0);
            return Err(VectorError::NotFinite { index });
        }
        Err(e) => return Err(VectorError::BadJson { column: e.column() }),
    };
    if out.is_empty() {
        return Err(VectorError::Empty);
    }
    Ok(out)
}

/// Renders stored FP32 bytes as a JSON array with the shortest text that
/// reads back to the same float32.
pub fn fp32_to_json(bytes: &[u8]) -> Vec<u8> {
    let floats: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    // Serialising a slice of f32 cannot fail; non-finite values become null.
    serde_json::to_vec(&floats).unwrap_or_else(|_| b"[]".to_vec())
}

/// True when the bytes can be an entry written by this module.
pub fn is_fp32(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.len() % 4 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp32(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|f| f.to_le_bytes()).collect()
    }

    #[test]
    fn it_round_trips_fp32_bytes_exactly() {
        let v = fp32(&[0.1, -0.0, 1e-38, 3.4e38, -2.5]);
        assert_eq!(parse_vector(&v, 8).unwrap(), v);
    }

    #[test]
    fn it_accepts_nul_bytes_in_fp32() {
        let v = fp32(&[0.0, 0.0]);
        assert!(v.iter().all(|&b| b == 0));
        assert_eq!(parse_vector(&v, 8).unwrap(), v);
    }

    #[test]
    fn it_parses_json_into_the_same_bytes() {
        let j = b"[0.5, -1, 2e-3, 0]";
        assert_eq!(parse_vector(j, 8).unwrap(), fp32(&[0.5, -1.0, 0.002, 0.0]));
    }

    #[test]
    fn it_renders_json_that_reads_back_to_the_same_floats() {
        let v = fp32(&[0.1, -1.5, 1e-30, 123456.79]);
        let json = fp32_to_json(&v);
        assert_eq!(parse_vector(&json, 8).unwrap(), v);
        assert_eq!(json, b"[0.1,-1.5,1e-30,123456.79]");
    }

    #[test]
    fn it_rejects_bad_vectors_with_a_reason() {
        let table: Vec<(&[u8], VectorError)> = vec![
            (b"", VectorError::Empty),
            (b"[]", VectorError::Empty),
            (b"abc", VectorError::NotMultipleOf4(3)),
            (b"[1,2", VectorError::BadJson { column: 4 }),
            (b"[1,\"a\"]", VectorError::BadJson { column: 6 }),
            (b"[1,NaN]", VectorError::BadJson { column: 4 }),
            (b"[1,1e39]", VectorError::NotFinite { index: 1 }),
        ];
        for (input, want) in table {
            assert_eq!(parse_vector(input, 8).unwrap_err(), want, "{input:?}");
        }
        let nan = fp32(&[1.0, f32::NAN]);
        assert_eq!(
            parse_vector(&nan, 8).unwrap_err(),
            VectorError::NotFinite { index: 1 }
        );
        let inf = fp32(&[f32::NEG_INFINITY]);
        assert_eq!(
            parse_vector(&inf, 8).unwrap_err(),
            VectorError::NotFinite { index: 0 }
        );
    }

    #[test]
    fn it_enforces_max_dims_in_both_encodings() {
        let v = fp32(&[1.0; 5]);
        let e = VectorError::TooManyDims { dims: 5, max: 4 };
        assert_eq!(parse_vector(&v, 4).unwrap_err(), e);
        let e = VectorError::JsonTooLong { max: 4 };
        assert_eq!(parse_vector(b"[1,1,1,1,1]", 4).unwrap_err(), e);
        assert!(parse_vector(&v, 5).is_ok());
        assert_eq!(parse_vector(b"[1,1,1,1]", 4).unwrap(), fp32(&[1.0; 4]));
    }

    #[test]
    fn it_stops_reading_a_huge_json_array_at_max_dims() {
        // 20 MB of "0," would be 80 MB as f64 if parsed whole first.
        let mut huge = b"[".to_vec();
        huge.extend(std::iter::repeat_n(&b"0,"[..], 10_000_000).flatten());
        huge.extend_from_slice(b"0]");
        let e = parse_vector(&huge, 8192).unwrap_err();
        assert_eq!(e, VectorError::JsonTooLong { max: 8192 });
        assert!(e.message().contains("max-dims 8192"));
    }

    #[test]
    fn it_only_treats_bracketed_arguments_as_json() {
        assert!(looks_like_json(b"[1]"));
        assert!(looks_like_json(b"[1, 2"));
        assert!(!looks_like_json(b"[\0\0\0"));
        // A realistic FP32 vector starting with 0x5B is still binary.
        let mut v = fp32(&[0.25, -0.5]);
        v[0] = b'[';
        assert!(!looks_like_json(&v));
        assert!(parse_vector(&v, 8).is_ok());
    }
}
