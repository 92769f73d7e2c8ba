//! Streamed fills without Redis: a scripted upstream, the in-memory
//! store, and FETCH callers joining through the same registry.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use crate::fill::call::Shape;
use crate::fill::endpoints::Dest;
use crate::fill::pipeline::*;
use crate::fill::store::mem::MemStore;
use crate::fill::streams::{self, StreamOpts, Streaming};
use crate::fill::upstream::{Failure, Sink, Upstream};
use crate::model::frames::Frame;
use crate::model::reply::Reply;
use crate::model::sse::Event;

/// Sends its events in batches, then fails with `then` (None: ends well).
struct Scripted {
    batches: Vec<Vec<Event>>,
    then: Option<Failure>,
    calls: AtomicU64,
}

impl Upstream for Scripted {
    fn post(&self, _: &Dest, _: &[u8], _: Instant) -> Result<Vec<u8>, Failure> {
        Err(Failure::Stopped)
    }

    fn stream(&self, _: &Dest, _: &[u8], _: Instant, sink: &mut dyn Sink) -> Result<(), Failure> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        for b in &self.batches {
            if sink.events(b.clone())? {
                return Ok(());
            }
        }
        Err(self
            .then
            .clone()
            .unwrap_or(Failure::Stream("no [DONE]".into())))
    }
}

fn scripted(batches: Vec<Vec<Event>>, then: Option<Failure>) -> Scripted {
    Scripted {
        batches,
        then,
        calls: AtomicU64::new(0),
    }
}

fn data(v: Value) -> Event {
    Event::Data {
        name: None,
        data: v.to_string(),
    }
}

fn delta(d: Value, finish: Option<&str>) -> Event {
    data(
        json!({"id": "c", "created": 1, "model": "m", "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}),
    )
}

fn good() -> Vec<Vec<Event>> {
    vec![
        vec![delta(json!({"role": "assistant", "content": ""}), None)],
        vec![
            delta(json!({"content": "Hel"}), None),
            delta(json!({"content": "lo"}), None),
        ],
        vec![
            delta(json!({}), Some("stop")),
            data(json!({"id": "c", "choices": [], "usage": {"total_tokens": 4}})),
            Event::Done,
        ],
    ]
}

fn chat_work(text: &str, max_fills: usize) -> Work {
    Work {
        db: 0,
        kind: Kind::Chat(Arc::new(ChatSpec {
            plan: vec![super::tests::dest("http://fake/v1/chat/completions")],
            body: b"{}".to_vec(),
            max_bytes: 1 << 20,
            fallback: None,
            semantic: None,
        })),
        entries: vec![Entry {
            key: format!("llm:{text}").into_bytes(),
            input: String::new(),
            tokens: 1,
            hit: None,
        }],
        shape: Shape::Single,
        expiry: Some(Expiry {
            ttl_secs: 60,
            jitter_pct: 0,
        }),
        tenant: None,
        timeout_ms: 1000,
        batch_size: 1,
        batch_max_tokens: u64::MAX,
        lease_ms: 60_000,
        max_fills,
        fail_memory_ms: 0,
        with_meta: false,
    }
}

fn opts(name: &str, max_entries: u64) -> StreamOpts {
    StreamOpts {
        name: Arc::from(name.as_bytes()),
        pointer: None,
        linger_ms: 1000,
        max_entries,
        deadline_ms: u64::MAX,
    }
}

fn frames(store: &MemStore, name: &str) -> Vec<(String, Frame)> {
    store.streams.lock().unwrap()[&(0, name.as_bytes().to_vec())].clone()
}

#[test]
fn a_stream_is_appended_as_it_arrives_stored_and_joined_by_fetch_and_stream() {
    let Ok(Streaming::Started(name, job)) =
        streams::start(chat_work("a", 100), opts("s-a", 100), 0)
    else {
        panic!("no stream started")
    };
    let Ok(Streaming::Joined(same)) = streams::start(chat_work("a", 100), opts("s-other", 100), 0)
    else {
        panic!("an identical request did not join")
    };
    assert_eq!(same, name);
    assert!(streams::is_live(b"s-a"));
    // A FETCH of the same request joins the streamed fill.
    let (jobs, rx, _) = super::tests::begin(chat_work("a", 100));
    assert!(jobs.is_empty(), "the FETCH started a second fill");
    let up = scripted(good(), None);
    let store = MemStore::default();
    job.run(&up, &store);
    let got = frames(&store, "s-a");
    let ids: Vec<&str> = got
        .iter()
        .map(|(id, _)| id.split('-').nth(1).unwrap())
        .collect();
    assert_eq!(ids, ["1", "2", "3", "4", "5", "6"]);
    assert!(matches!(&got[5].1, Frame::Finished { finish_reason, .. } if finish_reason == "stop"));
    let stored = store.entries.lock().unwrap()[&(0, b"llm:a".to_vec())].clone();
    let v: Value = serde_json::from_slice(&stored).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello");
    assert_eq!(rx.try_recv().unwrap(), Reply::Bulk(Arc::from(stored)));
    assert!(!streams::is_live(b"s-a"));
}

#[test]
fn a_failure_mid_stream_ends_it_with_the_error_and_stores_nothing() {
    let Ok(Streaming::Started(_, job)) = streams::start(chat_work("b", 100), opts("s-b", 100), 0)
    else {
        panic!()
    };
    let up = scripted(
        good()[..2].to_vec(),
        Some(Failure::Connect("reset by peer".into())),
    );
    let store = MemStore::default();
    job.run(&up, &store);
    let got = frames(&store, "s-b");
    assert_eq!(got.len(), 4);
    assert!(matches!(&got[3].1, Frame::Error(m) if m.contains("reset by peer")));
    assert!(store.entries.lock().unwrap().is_empty());
}

#[test]
fn a_stream_longer_than_its_cap_ends_with_an_error() {
    let Ok(Streaming::Started(_, job)) = streams::start(chat_work("c", 100), opts("s-c", 3), 0)
    else {
        panic!()
    };
    let up = scripted(good(), None);
    let store = MemStore::default();
    job.run(&up, &store);
    let got = frames(&store, "s-c");
    assert!(got.len() <= 3, "{}", got.len());
    assert!(
        matches!(&got.last().unwrap().1, Frame::Error(m) if m.contains("stream-max-entries 3"))
    );
    assert!(store.entries.lock().unwrap().is_empty());
}
