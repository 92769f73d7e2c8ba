//! The entries of a generation's Redis Stream (LLMCACHE.STREAM). Pure.
//!
//! Each upstream chunk is one entry `chunk <json as sent>`; the last entry
//! says how the generation ended:
//! `end finished finish_reason <reason> usage <json|null>` or
//! `end error error <message>`. Entry ids are `<start ms>-<n>`, n from 1,
//! so a reader knows each chunk's position from its id alone.

use serde_json::{json, Map, Value};

use crate::model::assemble::HEAD_FIELDS;

#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Chunk(Vec<u8>),
    Finished {
        finish_reason: String,
        usage: Option<Value>,
    },
    Error(String),
}

impl Frame {
    /// The entry's field/value pairs, as XADD takes them.
    pub fn fields(&self) -> Vec<Vec<u8>> {
        match self {
            Frame::Chunk(json) => vec![b"chunk".to_vec(), json.clone()],
            Frame::Finished {
                finish_reason,
                usage,
            } => vec![
                b"end".to_vec(),
                b"finished".to_vec(),
                b"finish_reason".to_vec(),
                finish_reason.as_bytes().to_vec(),
                b"usage".to_vec(),
                usage
                    .as_ref()
                    .map_or_else(|| b"null".to_vec(), |u| u.to_string().into_bytes()),
            ],
            Frame::Error(msg) => vec![
                b"end".to_vec(),
                b"error".to_vec(),
                b"error".to_vec(),
                msg.as_bytes().to_vec(),
            ],
        }
    }

    pub fn is_end(&self) -> bool {
        !matches!(self, Frame::Chunk(_))
    }
}

/// The id of entry `n` (from 1) of a Stream started at `start_ms`.
pub fn entry_id(start_ms: u64, n: u64) -> String {
    format!("{start_ms}-{n}")
}

/// True when a Stream entry's fields (as read back) are an end entry.
pub fn is_end_entry(fields: &[&[u8]]) -> bool {
    fields.first() == Some(&&b"end"[..])
}

/// A complete `chat.completion` replayed as the chunks a stream of it
/// would have sent: one chunk with every choice's whole delta and its
/// finish_reason, then a usage chunk. Used when a Stream joins a plain
/// (non-streamed) fill of the same request.
pub fn replay(completion: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let v: Value = serde_json::from_slice(completion).map_err(|e| e.to_string())?;
    let Value::Object(obj) = v else {
        return Err("a completion is not a JSON object".into());
    };
    let mut head = Map::new();
    for k in HEAD_FIELDS {
        if let Some(x) = obj.get(k) {
            head.insert(k.into(), x.clone());
        }
    }
    head.insert("object".into(), json!("chat.completion.chunk"));
    let choices: Vec<Value> = obj
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| {
            let mut delta = c
                .get("message")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            if let Some(Value::Array(calls)) = delta.get_mut("tool_calls") {
                for (i, call) in calls.iter_mut().enumerate() {
                    if let Value::Object(m) = call {
                        m.insert("index".into(), json!(i));
                    }
                }
            }
            json!({
                "index": c.get("index").cloned().unwrap_or(json!(0)),
                "delta": delta,
                "logprobs": c.get("logprobs").cloned().unwrap_or(Value::Null),
                "finish_reason": c.get("finish_reason").cloned().unwrap_or(Value::Null),
            })
        })
        .collect();
    let mut first = head.clone();
    first.insert("choices".into(), Value::Array(choices));
    let mut out = vec![serde_json::to_vec(&first).map_err(|e| e.to_string())?];
    if let Some(u) = obj.get("usage").filter(|u| u.is_object()) {
        let mut last = head;
        last.insert("choices".into(), json!([]));
        last.insert("usage".into(), u.clone());
        out.push(serde_json::to_vec(&last).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::assemble::Assembler;

    #[test]
    fn entries_have_a_fixed_documented_layout() {
        assert_eq!(
            Frame::Chunk(b"{}".to_vec()).fields(),
            vec![b"chunk".to_vec(), b"{}".to_vec()]
        );
        let end = Frame::Finished {
            finish_reason: "stop".into(),
            usage: Some(json!({"total_tokens": 3})),
        };
        let f = end.fields();
        let f: Vec<&[u8]> = f.iter().map(Vec::as_slice).collect();
        assert_eq!(
            f,
            vec![
                &b"end"[..],
                b"finished",
                b"finish_reason",
                b"stop",
                b"usage",
                b"{\"total_tokens\":3}"
            ]
        );
        assert!(is_end_entry(&f));
        assert!(end.is_end() && !Frame::Chunk(vec![]).is_end());
        assert_eq!(Frame::Error("ERR x".into()).fields()[3], b"ERR x");
        assert_eq!(entry_id(1700, 3), "1700-3");
    }

    #[test]
    fn a_replayed_completion_assembles_back_to_itself() {
        let completion = json!({
            "id": "c1", "object": "chat.completion", "created": 5, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "t", "type": "function",
                                "function": {"name": "f", "arguments": "{}"}}]},
                "logprobs": null, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        });
        let chunks = replay(&serde_json::to_vec(&completion).unwrap()).unwrap();
        assert_eq!(chunks.len(), 2);
        let mut a = Assembler::default();
        for c in &chunks {
            a.push(c).unwrap();
        }
        let back: Value = serde_json::from_slice(&a.finish().unwrap()).unwrap();
        assert_eq!(back, completion);
        assert!(replay(b"[1]").is_err());
    }
}
