//! The semantic cache's pure parts: which requests may share an answer
//! (same context, similar final user message), the sidecar that keeps an
//! entry's prompt vector in Redis, and similarity scores. No Redis types.
//!
//! Two requests are candidates for each other only when everything but the
//! final user message's text is identical: the canonical request with that
//! text removed, hashed with the namespace, its flush generation and the
//! embedding model. Nothing else can ever match, however close the vectors.

use serde_json::{Map, Value};

use crate::model::canon::canonical_object;
use crate::model::keys::digest_raw;

/// Why a request has no semantic lookup (it is served exact-only).
pub const NOT_ELIGIBLE: &str = "request has no final user message with text content \
     (semantic lookups need one; multimodal messages are exact-only)";

/// What a semantic lookup compares: the final user message's text, and
/// the rest of the request in canonical form.
#[derive(Debug, PartialEq)]
pub struct Prompt {
    pub text: String,
    pub context: Vec<u8>,
}

/// The request's prompt, or None when it is exact-only: the last message
/// is not the user's, or its content is not text (images, audio, files).
pub fn prompt(body: &[u8]) -> Result<Option<Prompt>, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|_| "ERR request is not valid JSON".to_string())?;
    let Value::Object(mut obj) = value else {
        return Err("ERR request must be a JSON object".into());
    };
    let Some(Value::Array(messages)) = obj.get_mut("messages") else {
        return Ok(None);
    };
    let Some(Value::Object(last)) = messages.last_mut() else {
        return Ok(None);
    };
    if last.get("role").and_then(Value::as_str) != Some("user") {
        return Ok(None);
    }
    let Some(text) = last.get("content").and_then(text_of) else {
        return Ok(None);
    };
    // Null marks "the text that is compared". A request whose final user
    // message really is null has no text, so it is never indexed.
    last.insert("content".into(), Value::Null);
    let canon = canonical_object(obj, body.len())?;
    Ok(Some(Prompt {
        text,
        context: canon.bytes,
    }))
}

/// A message content's text: a non-empty string, or text parts only.
fn text_of(content: &Value) -> Option<String> {
    let text = match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            for p in parts {
                let p: &Map<String, Value> = p.as_object()?;
                if p.get("type").and_then(Value::as_str) != Some("text") {
                    return None;
                }
                texts.push(p.get("text")?.as_str()?);
            }
            texts.join("\n")
        }
        _ => return None,
    };
    (!text.trim().is_empty()).then_some(text)
}

/// The id of a context: requests share candidates only when all of these
/// agree: the namespace, its chat flush generation, the embedding model
/// and its flush generations (vectors of a re-embedded model are not
/// comparable with the old ones), and the request minus its final text.
/// The DB is not hashed; the index keeps each DB apart.
pub fn context_id(
    ns: &[u8],
    generation: u64,
    emb_generations: [u64; 2],
    model: &[u8],
    context: &[u8],
) -> [u8; 32] {
    digest_raw(&[
        b"sem-ctx:v1",
        ns,
        &generation.to_be_bytes(),
        &emb_generations[0].to_be_bytes(),
        &emb_generations[1].to_be_bytes(),
        model,
        context,
    ])
}

/// A similarity threshold: a cosine from 0 to 1.
pub fn parse_threshold(arg: &[u8]) -> Option<f64> {
    let t: f64 = std::str::from_utf8(arg).ok()?.trim().parse().ok()?;
    (t.is_finite() && (0.0..=1.0).contains(&t) && !arg.is_empty()).then_some(t)
}

const MAGIC: &[u8; 4] = b"AIS1";
const HEAD: usize = 4 + 32 + 16 + 8 + 4;

/// An entry's sidecar, stored next to the answer under the `sem` key with
/// the same expiry. Layout (integers big-endian): `AIS1`, context id (32),
/// namespace id (16), flush generation (u64), dims (u32), answer key
/// (u32 length + bytes), prompt text (u32 length + bytes), then the vector
/// as little-endian FP32.
#[derive(Debug, PartialEq)]
pub struct Sidecar<'a> {
    pub context: [u8; 32],
    pub nsid: [u8; 16],
    pub generation: u64,
    pub answer_key: &'a [u8],
    pub text: &'a [u8],
    /// Little-endian FP32, `dims` of them.
    pub vector: &'a [u8],
}

impl<'a> Sidecar<'a> {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            HEAD + 8 + self.answer_key.len() + self.text.len() + self.vector.len(),
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.context);
        out.extend_from_slice(&self.nsid);
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&((self.vector.len() / 4) as u32).to_be_bytes());
        for part in [self.answer_key, self.text] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part);
        }
        out.extend_from_slice(self.vector);
        out
    }

    /// None for anything that is not a well-formed sidecar (a client may
    /// write any bytes under the key).
    pub fn decode(b: &'a [u8]) -> Option<Sidecar<'a>> {
        if b.len() < HEAD || &b[..4] != MAGIC {
            return None;
        }
        let mut context = [0u8; 32];
        context.copy_from_slice(&b[4..36]);
        let mut nsid = [0u8; 16];
        nsid.copy_from_slice(&b[36..52]);
        let generation = u64::from_be_bytes(b[52..60].try_into().ok()?);
        let dims = u32::from_be_bytes(b[60..64].try_into().ok()?) as usize;
        let mut at = HEAD;
        let mut part = || -> Option<&'a [u8]> {
            let len = u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize;
            let p = b.get(at + 4..at.checked_add(4 + len)?)?;
            at += 4 + len;
            Some(p)
        };
        let answer_key = part()?;
        let text = part()?;
        let vector = b.get(at..)?;
        if dims == 0 || vector.len() != dims.checked_mul(4)? {
            return None;
        }
        Some(Sidecar {
            context,
            nsid,
            generation,
            answer_key,
            text,
            vector,
        })
    }

    pub fn floats(&self) -> Vec<f32> {
        floats(self.vector)
    }
}

/// Little-endian FP32 bytes as floats (a trailing partial float is dropped).
pub fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Cosine similarity, accumulated in f64; 0 when either vector is zero
/// or they differ in size.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return 0.0;
    }
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 || !dot.is_finite() {
        return 0.0;
    }
    (dot / (na.sqrt() * nb.sqrt())).clamp(-1.0, 1.0)
}

/// A usable query or stored vector: finite, not all zero.
pub fn usable(v: &[f32]) -> bool {
    !v.is_empty() && v.iter().all(|x| x.is_finite()) && v.iter().any(|&x| x != 0.0)
}

/// One bit per dimension (set when positive): the index's coarse form.
pub fn sign_code(v: &[f32]) -> Vec<u64> {
    let mut code = vec![0u64; v.len().div_ceil(64)];
    for (i, &x) in v.iter().enumerate() {
        if x > 0.0 {
            code[i / 64] |= 1 << (i % 64);
        }
    }
    code
}

pub fn hamming(a: &[u64], b: &[u64]) -> u32 {
    a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(body: &str) -> Option<Prompt> {
        prompt(body.as_bytes()).unwrap()
    }

    #[test]
    fn the_context_is_the_request_without_the_final_user_text() {
        let a = p(r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"capital of France?"}]}"#).unwrap();
        let b = p(r#"{"messages":[{"role":"system","content":"be brief"},{"content":"France's capital?","role":"user"}],"model":"m","temperature":1}"#).unwrap();
        assert_eq!(a.text, "capital of France?");
        assert_eq!(a.context, b.context, "key order and defaults do not matter");
        for other in [
            r#"{"model":"m","messages":[{"role":"system","content":"be long"},{"role":"user","content":"x"}]}"#,
            r#"{"model":"n","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"x"}]}"#,
            r#"{"model":"m","temperature":0,"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"x"}]}"#,
            r#"{"model":"m","tools":[{"type":"function","function":{"name":"f"}}],"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"x"}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
        ] {
            assert_ne!(p(other).unwrap().context, a.context, "{other}");
        }
    }

    #[test]
    fn only_a_final_user_text_is_eligible() {
        for body in [
            r#"{"model":"m","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"x"}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"input_audio"}]}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"   "}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":null}]}"#,
            r#"{"model":"m","messages":[]}"#,
        ] {
            assert_eq!(prompt(body.as_bytes()).ok().flatten(), None, "{body}");
        }
        let parts = p(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#).unwrap();
        assert_eq!(parts.text, "a\nb");
        assert!(prompt(b"[1]").is_err() && prompt(b"{").is_err());
    }

    #[test]
    fn context_ids_separate_namespace_generation_and_model() {
        let id = |ns: &[u8], g: u64, e: [u64; 2], m: &[u8], c: &[u8]| context_id(ns, g, e, m, c);
        let base = id(b"ns", 0, [0, 0], b"emb", b"{}");
        assert_ne!(base, id(b"ns2", 0, [0, 0], b"emb", b"{}"));
        assert_ne!(base, id(b"ns", 1, [0, 0], b"emb", b"{}"));
        assert_ne!(base, id(b"ns", 0, [1, 0], b"emb", b"{}"));
        assert_ne!(base, id(b"ns", 0, [0, 1], b"emb", b"{}"));
        assert_ne!(base, id(b"ns", 0, [0, 0], b"emb2", b"{}"));
        assert_ne!(
            id(b"a", 0, [0, 0], b"bc", b""),
            id(b"ab", 0, [0, 0], b"c", b"")
        );
    }

    #[test]
    fn a_sidecar_round_trips_and_garbage_is_refused() {
        let v: Vec<u8> = [1.0f32, -2.0, 0.5]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let s = Sidecar {
            context: [7; 32],
            nsid: [3; 16],
            generation: 9,
            answer_key: b"aicache:llm:v1:{t}:ab",
            text: "what? 一".as_bytes(),
            vector: &v,
        };
        let bytes = s.encode();
        let back = Sidecar::decode(&bytes).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.floats(), vec![1.0, -2.0, 0.5]);
        for cut in 0..bytes.len() {
            assert!(Sidecar::decode(&bytes[..cut]).is_none(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Sidecar::decode(&longer).is_none());
        assert!(Sidecar::decode(b"AIS1").is_none());
        let mut huge = bytes.clone();
        huge[64..68].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Sidecar::decode(&huge).is_none());
    }

    #[test]
    fn scores_and_thresholds() {
        assert!((cosine(&[1.0, 0.0], &[1.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!((cosine(&[1.0, 1.0], &[1.0, 0.0]) - 0.5f64.sqrt()).abs() < 1e-9);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
        assert_eq!(cosine(&[1.0], &[1.0, 0.0]), 0.0);
        assert_eq!(cosine(&[f32::MAX, f32::MAX], &[f32::MAX, f32::MAX]), 1.0);
        assert!(!usable(&[0.0, 0.0]) && !usable(&[f32::NAN]) && usable(&[0.0, 1e-30]));
        assert_eq!(parse_threshold(b"0.92"), Some(0.92));
        assert_eq!(parse_threshold(b"1"), Some(1.0));
        for bad in [&b""[..], b"1.01", b"-0.1", b"nan", b"inf", b"x", b"0.9x"] {
            assert_eq!(parse_threshold(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn sign_codes_count_differing_signs() {
        let a = sign_code(&[1.0; 70]);
        let mut v = vec![1.0; 70];
        v[0] = -1.0;
        v[69] = -1.0;
        assert_eq!(a.len(), 2);
        assert_eq!(hamming(&a, &sign_code(&v)), 2);
    }
}
