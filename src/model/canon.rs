//! Canonical form of an OpenAI chat-completions request, and the rules for
//! which responses may be cached. Pure: no Redis types.
//!
//! Two requests share a cache entry exactly when they would ask the model the
//! same thing: whitespace and key order do not matter, `1` equals `1.0`,
//! absent sampling parameters equal their documented defaults, and fields
//! that only shape transport or billing are dropped.

use serde_json::{Map, Number, Value};

/// Fields that never change the completion's content.
pub const TRANSPORT_ONLY: &[&str] = &[
    "stream",
    "stream_options",
    "user",
    "store",
    "metadata",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
];

/// Output-affecting parameters with the default the API applies when absent.
pub const DEFAULTS: &[(&str, f64)] = &[
    ("temperature", 1.0),
    ("top_p", 1.0),
    ("n", 1.0),
    ("presence_penalty", 0.0),
    ("frequency_penalty", 0.0),
];

#[derive(Debug, PartialEq)]
pub struct Canonical {
    /// Sorted-key compact JSON, the bytes that are hashed.
    pub bytes: Vec<u8>,
    /// Effective temperature (default applied), for the sampled-request policy.
    pub temperature: f64,
}

fn bad(msg: &str) -> String {
    format!("ERR request {msg}")
}

/// The one spelling of a JSON number's exact decimal value: `1`, `1.0`,
/// `1e0` and `10E-1` agree; `12345678901234567890123` and `...124` do not
/// (no rounding through a float). Integers of up to 64 digits are written
/// out, every other value as `<digits>e<exponent>` with no leading or
/// trailing zeros in the digits; zero (and -0) is `0`.
pub fn canonical_number(token: &str) -> Option<String> {
    let (neg, rest) = match token.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, token),
    };
    let (mantissa, exp) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], rest[i + 1..].parse::<i64>().ok()?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let all = format!("{int}{frac}");
    let digits = all.trim_start_matches('0');
    let significant = digits.trim_end_matches('0');
    if significant.is_empty() {
        return Some("0".into());
    }
    let exp = exp
        .checked_sub(frac.len() as i64)?
        .checked_add((digits.len() - significant.len()) as i64)?;
    let sign = if neg { "-" } else { "" };
    // Written out only when short: `exp` may be near i64::MAX.
    let written = (significant.len() as i64).checked_add(exp);
    if exp >= 0 && written.is_some_and(|w| w <= 64) {
        return Some(format!("{sign}{significant}{}", "0".repeat(exp as usize)));
    }
    Some(format!("{sign}{significant}e{exp}"))
}

/// Compact JSON with sorted keys (serde_json's map is a BTreeMap) and
/// every number in its canonical spelling.
fn write_canonical(v: &Value, out: &mut Vec<u8>) -> Result<(), String> {
    match v {
        Value::Number(n) => {
            let c = canonical_number(&n.to_string()).ok_or_else(|| bad("holds a bad number"))?;
            out.extend_from_slice(c.as_bytes());
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(x, out)?;
            }
            out.push(b']');
        }
        Value::Object(o) => {
            out.push(b'{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k).map_err(|_| bad("cannot be serialised"))?;
                out.push(b':');
                write_canonical(x, out)?;
            }
            out.push(b'}');
        }
        other => {
            serde_json::to_writer(&mut *out, other).map_err(|_| bad("cannot be serialised"))?
        }
    }
    Ok(())
}

fn number(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// Parses and canonicalises a request body.
pub fn canonical_request(body: &[u8]) -> Result<Canonical, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        bad(&format!(
            "is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let Value::Object(obj) = value else {
        return Err(bad("must be a JSON object"));
    };
    canonical_object(obj, body.len())
}

/// [`canonical_request`] of a parsed request; `size_hint` sizes the output.
pub fn canonical_object(
    mut obj: Map<String, Value>,
    size_hint: usize,
) -> Result<Canonical, String> {
    match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => {}
        _ => return Err(bad("needs a non-empty string \"model\"")),
    }
    match obj.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => {}
        _ => return Err(bad("needs a non-empty array \"messages\"")),
    }
    for f in TRANSPORT_ONLY {
        obj.remove(*f);
    }
    for (name, default) in DEFAULTS {
        match obj.get(*name) {
            None | Some(Value::Null) => {
                obj.insert((*name).to_string(), number(*default));
            }
            Some(Value::Number(_)) => {}
            Some(_) => return Err(bad(&format!("field \"{name}\" must be a number"))),
        }
    }
    let temperature = obj
        .get("temperature")
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    let mut bytes = Vec::with_capacity(size_hint + 64);
    write_canonical(&Value::Object(obj), &mut bytes)?;
    Ok(Canonical { bytes, temperature })
}

/// The request body sent upstream: the caller's request, never streamed.
pub fn upstream_body(body: &[u8]) -> Result<Vec<u8>, String> {
    let mut obj: Map<String, Value> =
        serde_json::from_slice(body).map_err(|_| bad("is not a JSON object"))?;
    obj.remove("stream_options");
    obj.insert("stream".into(), Value::Bool(false));
    serde_json::to_vec(&obj).map_err(|_| bad("cannot be serialised"))
}

/// The request body of a streamed fill: the caller's request with
/// `stream: true` and usage reported at the end (the spend limits settle
/// from it). The caller's other stream options are kept.
pub fn upstream_stream_body(body: &[u8]) -> Result<Vec<u8>, String> {
    let mut obj: Map<String, Value> =
        serde_json::from_slice(body).map_err(|_| bad("is not a JSON object"))?;
    let mut options = match obj.remove("stream_options") {
        Some(Value::Object(o)) => o,
        _ => Map::new(),
    };
    options.insert("include_usage".into(), Value::Bool(true));
    obj.insert("stream".into(), Value::Bool(true));
    obj.insert("stream_options".into(), Value::Object(options));
    serde_json::to_vec(&obj).map_err(|_| bad("cannot be serialised"))
}

/// Most tokens one answer may claim to save: a stored answer is data a
/// client wrote, and must not wrap the counter.
const MAX_ANSWER_TOKENS: u64 = 1 << 32;

/// The top-level `usage.total_tokens` of a stored chat answer, if any.
/// A byte scan, not a JSON parse: it runs on the main thread for every
/// chat hit, and the answer was validated when it was written. Strings are
/// skipped whole, so a message that quotes `"usage"` changes nothing.
pub fn tokens_in_answer(body: &[u8]) -> Option<u64> {
    let (mut i, mut depth, mut usage_depth) = (0usize, 0usize, None);
    while i < body.len() {
        match body[i] {
            b'"' => {
                let end = string_end(body, i)?;
                let name = &body[i + 1..end];
                i = skip_ws(body, end + 1);
                if body.get(i) != Some(&b':') {
                    continue; // a value, not a key
                }
                i = skip_ws(body, i + 1);
                if depth == 1 && name == b"usage" && body.get(i) == Some(&b'{') {
                    usage_depth = Some(depth + 1);
                } else if usage_depth == Some(depth) && name == b"total_tokens" {
                    let digits = body[i..].iter().take_while(|b| b.is_ascii_digit()).count();
                    let n: u64 = std::str::from_utf8(&body[i..i + digits])
                        .ok()?
                        .parse()
                        .ok()?;
                    return Some(n.min(MAX_ANSWER_TOKENS));
                }
            }
            b'{' | b'[' => {
                depth += 1;
                i += 1;
            }
            b'}' | b']' => {
                if usage_depth == Some(depth) {
                    return None; // usage holds no total_tokens
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            _ => i += 1,
        }
    }
    None
}

/// Index of the quote that closes the string opening at `open`.
fn string_end(body: &[u8], open: usize) -> Option<usize> {
    let mut i = open + 1;
    while i < body.len() {
        match body[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

fn skip_ws(body: &[u8], mut i: usize) -> usize {
    while body.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

/// Token counts from a response's `usage`, zero when absent.
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
}

/// Accepts a completion only if caching it is safe: a JSON object with no
/// `error`, a non-empty `choices` where every choice has a `message` object
/// and did not stop for `length`.
pub fn validate_response(body: &[u8]) -> Result<Usage, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        format!(
            "ERR response is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
    let Value::Object(obj) = value else {
        return Err("ERR response must be a JSON object".into());
    };
    if obj.get("error").is_some_and(|e| !e.is_null()) {
        return Err("ERR response holds an error object; not cached".into());
    }
    let choices = match obj.get("choices") {
        Some(Value::Array(c)) if !c.is_empty() => c,
        _ => return Err("ERR response has no choices; not cached".into()),
    };
    for (i, c) in choices.iter().enumerate() {
        if !c.get("message").is_some_and(Value::is_object) {
            return Err(format!(
                "ERR response choice {i} has no message; not cached"
            ));
        }
        if c.get("finish_reason").and_then(Value::as_str) == Some("length") {
            return Err(format!(
                "ERR response choice {i} was cut off (finish_reason length); not cached"
            ));
        }
    }
    let usage = obj.get("usage");
    let count = |k: &str| {
        usage
            .and_then(|u| u.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Ok(Usage {
        prompt: count("prompt_tokens"),
        completion: count("completion_tokens"),
        total: count("total_tokens"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(s: &str) -> Vec<u8> {
        canonical_request(s.as_bytes()).unwrap().bytes
    }

    const BASE: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

    #[test]
    fn tokens_in_answer_reads_the_usage_not_a_quoted_lookalike() {
        let a = br#"{"choices":[{"message":{"content":"say \"total_tokens\": 9"}}],"usage":{"prompt_tokens":3,"total_tokens" : 42}}"#;
        assert_eq!(tokens_in_answer(a), Some(42));
        assert_eq!(tokens_in_answer(br#"{"choices":[]}"#), None);
        assert_eq!(
            tokens_in_answer(br#"{"usage":{"total_tokens":null}}"#),
            None
        );
        // Only the top-level usage counts, wherever a lookalike sits.
        let nested = br#"{"usage":{"total_tokens":10},"choices":[{"message":{"usage":{"total_tokens":5000000}}}]}"#;
        assert_eq!(tokens_in_answer(nested), Some(10));
        let later = br#"{"choices":[{"usage":{"total_tokens":7}}],"usage":{"prompt_tokens":1,"total_tokens":3}}"#;
        assert_eq!(tokens_in_answer(later), Some(3));
        let escaped = br#"{"x":"a\"usage\":{\"total_tokens\":9}","usage":{"total_tokens":4}}"#;
        assert_eq!(tokens_in_answer(escaped), Some(4));
        let huge = br#"{"usage":{"total_tokens":18446744073709551615}}"#;
        assert_eq!(tokens_in_answer(huge), Some(1 << 32));
        assert_eq!(tokens_in_answer(br#"{"usage":{"prompt_tokens":5}}"#), None);
        assert_eq!(tokens_in_answer(br#"{"usage":"#), None);
        assert_eq!(tokens_in_answer(b"\"unterminated"), None);
    }

    #[test]
    fn it_ignores_whitespace_and_key_order() {
        let a = canon(BASE);
        let b = canon(
            r#"{ "messages" : [ {"content":"hi", "role":"user"} ],
                 "model":"gpt-4o-mini" }"#,
        );
        assert_eq!(a, b);
    }

    #[test]
    fn it_applies_documented_defaults() {
        let explicit = canon(
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],
                "temperature":1.0,"top_p":1,"n":1,"presence_penalty":0,"frequency_penalty":0.0}"#,
        );
        assert_eq!(canon(BASE), explicit);
        let null_temp = canon(
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"temperature":null}"#,
        );
        assert_eq!(canon(BASE), null_temp);
    }

    #[test]
    fn it_drops_transport_only_fields() {
        let with = canon(
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],
                "stream":true,"stream_options":{"include_usage":true},"user":"u1",
                "metadata":{"a":"b"},"store":true,"service_tier":"auto"}"#,
        );
        assert_eq!(canon(BASE), with);
    }

    #[test]
    fn it_keys_on_every_output_affecting_parameter() {
        let variants = [
            r#""temperature":0"#,
            r#""top_p":0.5"#,
            r#""max_tokens":10"#,
            r#""max_completion_tokens":10"#,
            r#""stop":["\n"]"#,
            r#""seed":7"#,
            r#""n":2"#,
            r#""response_format":{"type":"json_object"}"#,
            r#""tools":[{"type":"function","function":{"name":"f"}}]"#,
            r#""tool_choice":"none""#,
            r#""logit_bias":{"50256":-100}"#,
        ];
        let mut seen = vec![canon(BASE)];
        for v in variants {
            let req = format!(
                r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"hi"}}],{v}}}"#
            );
            let c = canon(&req);
            assert!(!seen.contains(&c), "{v} did not change the key");
            seen.push(c);
        }
        let other_model = BASE.replace("gpt-4o-mini", "gpt-4o");
        assert!(!seen.contains(&canon(&other_model)));
    }

    #[test]
    fn numbers_have_one_spelling_per_exact_value() {
        let same = [
            ("1", "1"),
            ("1.0", "1"),
            ("1e0", "1"),
            ("10E-1", "1"),
            ("-0", "0"),
            ("-0.0e5", "0"),
            ("1e16", "10000000000000000"),
            ("10000000000000000", "10000000000000000"),
            ("1e-7", "1e-7"),
            ("0.0000001", "1e-7"),
            ("0.5", "5e-1"),
            ("-12.50", "-125e-1"),
            ("123.456e3", "123456"),
            ("1e64", "1e64"),
            ("12345678901234567890123", "12345678901234567890123"),
        ];
        for (token, want) in same {
            assert_eq!(canonical_number(token).as_deref(), Some(want), "{token}");
        }
        assert_ne!(
            canonical_number("12345678901234567890123"),
            canonical_number("12345678901234567890124")
        );
    }

    #[test]
    fn extreme_exponents_neither_overflow_nor_allocate() {
        for (token, want) in [
            ("1e9223372036854775807", Some("1e9223372036854775807")),
            ("12E9223372036854775806", Some("12e9223372036854775806")),
            ("1.0e9223372036854775807", Some("1e9223372036854775807")),
            ("100e9223372036854775806", None),
            ("1e-9223372036854775808", Some("1e-9223372036854775808")),
            ("0.1e-9223372036854775808", None),
            ("1e99999999999999999999", None),
            ("-", None),
        ] {
            assert_eq!(canonical_number(token).as_deref(), want, "{token}");
        }
    }

    #[test]
    fn big_seeds_get_their_own_key() {
        let a = canon(&BASE.replace("}]}", r#"}],"seed":12345678901234567890123}"#));
        let b = canon(&BASE.replace("}]}", r#"}],"seed":12345678901234567890124}"#));
        assert_ne!(a, b);
        let c = canon(&BASE.replace("}]}", r#"}],"seed":1e16}"#));
        let d = canon(&BASE.replace("}]}", r#"}],"seed":10000000000000000}"#));
        assert_eq!(c, d);
    }

    #[test]
    fn it_reports_the_effective_temperature() {
        assert_eq!(canonical_request(BASE.as_bytes()).unwrap().temperature, 1.0);
        let t0 = BASE.replace("}]}", r#"}],"temperature":0}"#);
        assert_eq!(canonical_request(t0.as_bytes()).unwrap().temperature, 0.0);
    }

    #[test]
    fn it_rejects_requests_it_cannot_key() {
        for bad in [
            "",
            "[]",
            "{",
            r#"{"messages":[{"role":"user","content":"x"}]}"#,
            r#"{"model":"","messages":[{"role":"user","content":"x"}]}"#,
            r#"{"model":"m","messages":[]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
        ] {
            assert!(canonical_request(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_streamed_fill_always_asks_for_usage() {
        let body = upstream_stream_body(
            br#"{"model":"m","messages":[],"stream":false,"stream_options":{"x":1,"include_usage":false}}"#,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["stream"], Value::Bool(true));
        assert_eq!(v["stream_options"]["include_usage"], Value::Bool(true));
        assert_eq!(v["stream_options"]["x"], 1);
        assert!(upstream_stream_body(b"[]").is_err());
    }

    #[test]
    fn it_always_asks_upstream_without_streaming() {
        let body = upstream_body(
            br#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["stream"], Value::Bool(false));
        assert!(v.get("stream_options").is_none());
    }

    fn response(choice: &str) -> String {
        format!(
            r#"{{"id":"x","choices":[{choice}],"usage":{{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}}}"#
        )
    }

    #[test]
    fn it_accepts_complete_responses_and_reads_usage() {
        let ok = response(
            r#"{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}"#,
        );
        assert_eq!(
            validate_response(ok.as_bytes()),
            Ok(Usage {
                prompt: 3,
                completion: 4,
                total: 7
            })
        );
    }

    #[test]
    fn it_never_accepts_uncacheable_responses() {
        let cut = response(r#"{"message":{"content":"h"},"finish_reason":"length"}"#);
        let no_msg = response(r#"{"finish_reason":"stop"}"#);
        for bad in [
            cut.as_str(),
            no_msg.as_str(),
            r#"{"choices":[]}"#,
            r#"{"error":{"message":"rate limited"}}"#,
            r#"{"error":{"message":"x"},"choices":[{"message":{}}]}"#,
            "not json",
            "[1]",
        ] {
            assert!(validate_response(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
