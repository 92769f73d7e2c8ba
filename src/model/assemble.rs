//! Builds the `chat.completion` a non-streamed call would have returned
//! from the `chat.completion.chunk` objects of a stream (for
//! LLMCACHE.STREAM, issue 9), so a streamed answer becomes an ordinary
//! cache entry. Pure.
//!
//! Deltas are merged per choice index: `role` taken once, `content` and
//! `refusal` concatenated, `tool_calls` merged by their own index (id,
//! type and name taken once, `arguments` concatenated), `logprobs` content
//! lists appended; the last `finish_reason` and the `usage` chunk win.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::model::canon::validate_response;

/// Top-level fields a completion and its chunks share.
pub const HEAD_FIELDS: [&str; 5] = [
    "id",
    "created",
    "model",
    "system_fingerprint",
    "service_tier",
];

#[derive(Default)]
struct Tool {
    id: Option<String>,
    kind: Option<String>,
    name: String,
    arguments: String,
}

#[derive(Default)]
struct Choice {
    role: Option<String>,
    content: Option<String>,
    refusal: Option<String>,
    tools: BTreeMap<u64, Tool>,
    logprobs: Option<Vec<Value>>,
    finish_reason: Option<String>,
}

#[derive(Default)]
pub struct Assembler {
    head: Map<String, Value>,
    choices: BTreeMap<u64, Choice>,
    usage: Option<Value>,
}

fn append(slot: &mut Option<String>, piece: Option<&str>) {
    if let Some(p) = piece {
        slot.get_or_insert_with(String::new).push_str(p);
    }
}

impl Assembler {
    /// Takes one chunk as the upstream sent it. An `error` object or a
    /// chunk that is not a JSON object is an error.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), String> {
        let v: Value = serde_json::from_slice(chunk)
            .map_err(|e| format!("a stream chunk is not valid JSON (column {})", e.column()))?;
        let Value::Object(obj) = v else {
            return Err("a stream chunk is not a JSON object".into());
        };
        if obj.get("error").is_some_and(|e| !e.is_null()) {
            return Err("the stream sent an error".into());
        }
        for k in HEAD_FIELDS {
            if let Some(x) = obj.get(k).filter(|x| !x.is_null()) {
                self.head.entry(k).or_insert_with(|| x.clone());
            }
        }
        if let Some(u) = obj.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(u.clone());
        }
        let choices = obj
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten();
        for c in choices {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
            let acc = self.choices.entry(index).or_default();
            if let Some(d) = c.get("delta") {
                if acc.role.is_none() {
                    acc.role = d.get("role").and_then(Value::as_str).map(str::to_string);
                }
                append(&mut acc.content, d.get("content").and_then(Value::as_str));
                append(&mut acc.refusal, d.get("refusal").and_then(Value::as_str));
                for t in d
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let ti = t.get("index").and_then(Value::as_u64).unwrap_or(0);
                    let tool = acc.tools.entry(ti).or_default();
                    let text = |k: &str| t.get(k).and_then(Value::as_str).map(str::to_string);
                    tool.id = tool.id.take().or_else(|| text("id"));
                    tool.kind = tool.kind.take().or_else(|| text("type"));
                    if let Some(f) = t.get("function") {
                        tool.name
                            .push_str(f.get("name").and_then(Value::as_str).unwrap_or(""));
                        tool.arguments
                            .push_str(f.get("arguments").and_then(Value::as_str).unwrap_or(""));
                    }
                }
            }
            if let Some(lp) = c
                .get("logprobs")
                .and_then(|l| l.get("content"))
                .and_then(Value::as_array)
            {
                acc.logprobs
                    .get_or_insert_with(Vec::new)
                    .extend(lp.iter().cloned());
            }
            if let Some(f) = c.get("finish_reason").and_then(Value::as_str) {
                acc.finish_reason = Some(f.to_string());
            }
        }
        Ok(())
    }

    /// Why the stream ended, as the first choice tells it.
    pub fn finish_reason(&self) -> Option<&str> {
        self.choices
            .values()
            .next()
            .and_then(|c| c.finish_reason.as_deref())
    }

    pub fn usage(&self) -> Option<&Value> {
        self.usage.as_ref()
    }

    /// The assembled `chat.completion`, or why it may not be cached (the
    /// same rules as LLMCACHE.SET: every choice finished, not cut off).
    pub fn finish(&self) -> Result<Vec<u8>, String> {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .map(|(index, c)| {
                let mut message = Map::new();
                message.insert(
                    "role".into(),
                    json!(c.role.as_deref().unwrap_or("assistant")),
                );
                message.insert("content".into(), json!(c.content));
                if let Some(r) = &c.refusal {
                    message.insert("refusal".into(), json!(r));
                }
                if !c.tools.is_empty() {
                    let calls: Vec<Value> = c
                        .tools
                        .values()
                        .map(|t| {
                            json!({
                                "id": t.id,
                                "type": t.kind.as_deref().unwrap_or("function"),
                                "function": {"name": t.name, "arguments": t.arguments},
                            })
                        })
                        .collect();
                    message.insert("tool_calls".into(), Value::Array(calls));
                }
                json!({
                    "index": index,
                    "message": message,
                    "logprobs": c.logprobs.as_ref().map(|l| json!({"content": l})),
                    "finish_reason": c.finish_reason,
                })
            })
            .collect();
        if let Some((i, _)) = self.choices.iter().find(|(_, c)| c.finish_reason.is_none()) {
            return Err(format!("the stream ended before choice {i} finished"));
        }
        let mut out = self.head.clone();
        out.insert("object".into(), json!("chat.completion"));
        out.insert("choices".into(), Value::Array(choices));
        if let Some(u) = &self.usage {
            out.insert("usage".into(), u.clone());
        }
        let bytes = serde_json::to_vec(&Value::Object(out)).map_err(|e| e.to_string())?;
        validate_response(&bytes).map_err(|e| e.trim_start_matches("ERR ").to_string())?;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(v: Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    fn delta(d: Value, finish: Option<&str>) -> Vec<u8> {
        chunk(json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
            "choices": [{"index": 0, "delta": d, "finish_reason": finish}]
        }))
    }

    #[test]
    fn text_deltas_become_the_completion_a_plain_call_returns() {
        let mut a = Assembler::default();
        a.push(&delta(json!({"role": "assistant", "content": ""}), None))
            .unwrap();
        a.push(&delta(json!({"content": "Hel"}), None)).unwrap();
        a.push(&delta(json!({"content": "lo 一"}), None)).unwrap();
        a.push(&delta(json!({}), Some("stop"))).unwrap();
        a.push(&chunk(json!({"id": "chatcmpl-1", "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})))
            .unwrap();
        assert_eq!(a.finish_reason(), Some("stop"));
        let got: Value = serde_json::from_slice(&a.finish().unwrap()).unwrap();
        assert_eq!(
            got,
            json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello 一"},
                             "logprobs": null, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
            })
        );
    }

    #[test]
    fn tool_call_fragments_merge_by_index() {
        let mut a = Assembler::default();
        let tc =
            |i: u64, v: Value| delta(json!({"tool_calls": [{"index": i, "function": v}]}), None);
        a.push(&delta(
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get", "arguments": ""}}]}),
            None,
        ))
        .unwrap();
        a.push(&tc(0, json!({"arguments": "{\"ci"}))).unwrap();
        a.push(&delta(
            json!({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                   "function": {"name": "put", "arguments": "{}"}}]}),
            None,
        ))
        .unwrap();
        a.push(&tc(0, json!({"arguments": "ty\":\"x\"}"}))).unwrap();
        a.push(&delta(json!({}), Some("tool_calls"))).unwrap();
        let got: Value = serde_json::from_slice(&a.finish().unwrap()).unwrap();
        let calls = &got["choices"][0]["message"]["tool_calls"];
        assert_eq!(
            calls[0],
            json!({"id": "call_a", "type": "function",
                                    "function": {"name": "get", "arguments": "{\"city\":\"x\"}"}})
        );
        assert_eq!(calls[1]["function"]["name"], "put");
        assert_eq!(got["choices"][0]["message"]["content"], Value::Null);
    }

    #[test]
    fn several_choices_refusals_and_logprobs() {
        let mut a = Assembler::default();
        let lp = |t: &str| json!({"content": [{"token": t, "logprob": -0.5}]});
        for (i, piece) in [(1u64, "b"), (0, "a")] {
            a.push(&chunk(
                json!({"choices": [{"index": i, "delta": {"content": piece},
                                               "logprobs": lp(piece)}]}),
            ))
            .unwrap();
        }
        a.push(&chunk(
            json!({"choices": [{"index": 0, "delta": {"refusal": "no"}, "finish_reason": "stop"},
                                          {"index": 1, "delta": {}, "finish_reason": "stop"}]}),
        ))
        .unwrap();
        let got: Value = serde_json::from_slice(&a.finish().unwrap()).unwrap();
        assert_eq!(got["choices"][0]["message"]["content"], "a");
        assert_eq!(got["choices"][0]["message"]["refusal"], "no");
        assert_eq!(got["choices"][1]["message"]["content"], "b");
        assert_eq!(got["choices"][1]["logprobs"]["content"][0]["token"], "b");
    }

    #[test]
    fn unfinished_cut_off_or_failed_streams_are_not_cacheable() {
        let mut a = Assembler::default();
        a.push(&delta(json!({"content": "x"}), None)).unwrap();
        assert!(a.finish().unwrap_err().contains("before choice 0 finished"));
        a.push(&delta(json!({}), Some("length"))).unwrap();
        assert!(a.finish().unwrap_err().contains("cut off"));
        let mut b = Assembler::default();
        assert!(b.push(br#"{"error": {"message": "overloaded"}}"#).is_err());
        assert!(b.push(b"[1]").is_err());
        assert!(b.push(b"{\"choices\": [").is_err());
        assert!(b.finish().is_err(), "no choices at all");
    }
}
