//! The embeddings wire format: the request body we send and the checks a
//! response must pass before any vector from it is cached. Pure.

use base64::Engine;
use serde_json::{json, Value};

/// Body for `POST /embeddings`. `base64` asks for `encoding_format: base64`:
/// exact little-endian FP32 and far cheaper to parse than decimal floats.
pub fn request_body(model: &str, texts: &[&str], dimensions: Option<u32>, base64: bool) -> Vec<u8> {
    let mut body = json!({ "model": model, "input": texts });
    if base64 {
        body["encoding_format"] = json!("base64");
    }
    if let Some(d) = dimensions {
        body["dimensions"] = json!(d);
    }
    body.to_string().into_bytes()
}

#[derive(Debug, PartialEq)]
pub struct Embeddings {
    /// FP32 little-endian vectors in input order.
    pub vectors: Vec<Vec<u8>>,
    pub tokens: u64,
}

/// Validates a response for `n` inputs: one item per input, each `index`
/// used once, finite numbers, one dimension for all (equal to `want_dims`
/// when given, at most `max_dims`).
pub fn parse_response(
    body: &[u8],
    n: usize,
    want_dims: Option<usize>,
    max_dims: usize,
) -> Result<Embeddings, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        format!(
            "body is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
    let data = value
        .get("data")
        .and_then(Value::as_array)
        .ok_or("no data array")?;
    if data.len() != n {
        return Err(format!("expected {n} embeddings, got {}", data.len()));
    }
    let mut vectors: Vec<Option<Vec<u8>>> = vec![None; n];
    for (pos, item) in data.iter().enumerate() {
        let index = item
            .get("index")
            .and_then(Value::as_u64)
            .map_or(pos, |i| i as usize);
        let slot = vectors
            .get_mut(index)
            .ok_or_else(|| format!("item {pos} has index {index}, out of range"))?;
        if slot.is_some() {
            return Err(format!("index {index} appears twice"));
        }
        let v = decode(item.get("embedding")).map_err(|e| format!("embedding {index} {e}"))?;
        *slot = Some(v);
    }
    let vectors: Vec<Vec<u8>> = vectors.into_iter().flatten().collect();
    let dims = vectors.first().map_or(0, |v| v.len() / 4);
    for (i, v) in vectors.iter().enumerate() {
        if v.len() / 4 != dims {
            return Err(format!(
                "embedding {i} has {} dimensions, embedding 0 has {dims}",
                v.len() / 4
            ));
        }
    }
    if let Some(want) = want_dims {
        if dims != want {
            return Err(format!("asked for {want} dimensions, got {dims}"));
        }
    }
    if dims > max_dims {
        return Err(format!(
            "{dims} dimensions is more than max-dims {max_dims}"
        ));
    }
    let tokens = value
        .get("usage")
        .and_then(|u| u.get("total_tokens").or_else(|| u.get("prompt_tokens")))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Ok(Embeddings { vectors, tokens })
}

/// One embedding, as a JSON number array or a base64 FP32 string.
fn decode(embedding: Option<&Value>) -> Result<Vec<u8>, String> {
    let bytes = match embedding {
        Some(Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len() * 4);
            for x in items {
                let f = x.as_f64().ok_or("holds a non-number")? as f32;
                out.extend_from_slice(&f.to_le_bytes());
            }
            out
        }
        Some(Value::String(s)) => base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|_| "is not valid base64")?,
        _ => return Err("is missing".into()),
    };
    if bytes.is_empty() || bytes.len() % 4 != 0 {
        return Err("is not a non-empty FP32 vector".into());
    }
    let finite = bytes
        .chunks_exact(4)
        .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite());
    if !finite {
        return Err("holds a non-finite number".into());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(v: &[f32]) -> String {
        let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn fp32(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|f| f.to_le_bytes()).collect()
    }

    #[test]
    fn it_builds_the_request() {
        let body = request_body("m", &["a", "\u{4e00}"], Some(256), true);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            json!({"model": "m", "input": ["a", "\u{4e00}"], "encoding_format": "base64", "dimensions": 256})
        );
        let v: Value = serde_json::from_slice(&request_body("m", &["a"], None, false)).unwrap();
        assert_eq!(v, json!({"model": "m", "input": ["a"]}));
    }

    #[test]
    fn it_reorders_by_index_and_reads_both_encodings() {
        let body = json!({
            "data": [
                {"index": 1, "embedding": b64(&[3.0, 4.0])},
                {"index": 0, "embedding": [1.0, 2.0]},
            ],
            "usage": {"prompt_tokens": 5, "total_tokens": 5}
        });
        let e = parse_response(body.to_string().as_bytes(), 2, Some(2), 10).unwrap();
        assert_eq!(e.vectors, vec![fp32(&[1.0, 2.0]), fp32(&[3.0, 4.0])]);
        assert_eq!(e.tokens, 5);
    }

    #[test]
    fn it_rejects_every_malformed_shape() {
        let cases = [
            (
                json!({"data": []}).to_string(),
                "expected 1 embeddings, got 0",
            ),
            ("{\"data\": [".to_string(), "not valid JSON"),
            (
                json!({"error": {"message": "x"}}).to_string(),
                "no data array",
            ),
            (
                json!({"data": [{"index": 3, "embedding": [1.0]}]}).to_string(),
                "out of range",
            ),
            (
                json!({"data": [{"index": 0, "embedding": [1e39]}]}).to_string(),
                "non-finite",
            ),
            (
                json!({"data": [{"index": 0, "embedding": "!!"}]}).to_string(),
                "not valid base64",
            ),
            (
                json!({"data": [{"index": 0, "embedding": []}]}).to_string(),
                "non-empty",
            ),
            (
                json!({"data": [{"index": 0, "embedding": ["1"]}]}).to_string(),
                "non-number",
            ),
            (json!({"data": [{"index": 0}]}).to_string(), "missing"),
        ];
        for (body, want) in cases {
            let err = parse_response(body.as_bytes(), 1, None, 10).unwrap_err();
            assert!(err.contains(want), "{body}: {err}");
        }
    }

    #[test]
    fn it_checks_dimensions() {
        let two = json!({"data": [
            {"index": 0, "embedding": [1.0, 2.0]},
            {"index": 1, "embedding": [1.0]},
        ]});
        let err = parse_response(two.to_string().as_bytes(), 2, None, 10).unwrap_err();
        assert!(err.contains("embedding 1 has 1 dimensions"), "{err}");
        let dup = json!({"data": [
            {"index": 0, "embedding": [1.0]},
            {"index": 0, "embedding": [1.0]},
        ]});
        let err = parse_response(dup.to_string().as_bytes(), 2, None, 10).unwrap_err();
        assert!(err.contains("appears twice"), "{err}");
        let one = json!({"data": [{"index": 0, "embedding": [1.0, 2.0, 3.0]}]});
        let err = parse_response(one.to_string().as_bytes(), 1, Some(2), 10).unwrap_err();
        assert!(err.contains("asked for 2"), "{err}");
        let err = parse_response(one.to_string().as_bytes(), 1, None, 2).unwrap_err();
        assert!(err.contains("max-dims 2"), "{err}");
    }
}
