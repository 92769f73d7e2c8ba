//! Error text that is safe to hand to Redis. redis-module 2.0.8 turns some
//! non-ASCII characters into NUL and then aborts the server, and CR/LF would
//! break the protocol, so every message passes through [`sanitize`].

/// Longest error message sent to a client, in bytes.
pub const MAX_ERROR_BYTES: usize = 512;

/// Printable ASCII only (others become `?`), at most [`MAX_ERROR_BYTES`],
/// and never starting with `-` (Redis adds its own).
pub fn sanitize(msg: &str) -> String {
    let mut out: String = msg
        .trim_start_matches('-')
        .bytes()
        .take(MAX_ERROR_BYTES)
        .map(|b| {
            if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            }
        })
        .collect();
    if out.is_empty() {
        out.push_str("ERR unknown error");
    }
    out
}

/// A short, printable rendering of a user argument for error messages:
/// at most 32 bytes, non-printable bytes as `\xNN`.
pub fn describe(arg: &[u8]) -> String {
    let mut out = String::new();
    for &b in arg.iter().take(32) {
        if (0x20..0x7f).contains(&b) && b != b'\'' && b != b'\\' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    if arg.len() > 32 {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_keeps_errors_printable_ascii() {
        let s = sanitize("ERR 上游错误 \u{4e00}\r\nINJECT\0");
        assert!(s.bytes().all(|b| (0x20..0x7f).contains(&b)), "{s}");
        assert!(s.starts_with("ERR "));
        assert!(!s.contains('\r') && !s.contains('\n') && !s.contains('\0'));
    }

    #[test]
    fn it_bounds_error_length() {
        assert_eq!(sanitize(&"x".repeat(10_000)).len(), MAX_ERROR_BYTES);
    }

    #[test]
    fn it_never_returns_an_empty_or_dash_prefixed_error() {
        assert_eq!(sanitize(""), "ERR unknown error");
        assert_eq!(sanitize("-WRONGTYPE x"), "WRONGTYPE x");
    }

    #[test]
    fn it_describes_arguments_without_raw_bytes() {
        assert_eq!(describe(b"EX"), "EX");
        assert_eq!(describe(b"a\0\xff'"), "a\\x00\\xff\\x27");
        assert_eq!(describe(&[b'a'; 40]), format!("{}...", "a".repeat(32)));
    }
}
