//! Micro-batching, failover, circuit breaking and the chat fallback model,
//! on the whole fill path without Redis.
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::fill::call::Shape;
use crate::fill::endpoints::{post_any, Dest};
use crate::fill::job::{Job, Task};
use crate::fill::pipeline::*;
use crate::fill::store::mem::MemStore;
use crate::fill::tests::{begin, dest, fp32, vector, work, Fake};
use crate::fill::upstream::{Failure, Sink, Upstream};
use crate::limits::spend::Bill;
use crate::model::reply::{Item, Reply, Status};

fn batch(jobs: Vec<Job>) -> Job {
    Job {
        pending: Pending::new(Vec::new(), Vec::new(), 0),
        bill: Bill::new(None),
        db: 0,
        expiry: None,
        deadline: Instant::now() + Duration::from_secs(60),
        queued: Instant::now(),
        task: Task::Batch(jobs),
    }
}

fn items(r: Reply) -> Vec<Item> {
    match r {
        Reply::Items { items, .. } => items,
        other => panic!("not items: {other:?}"),
    }
}

#[test]
fn calls_batched_together_share_one_request_and_get_their_own_vectors() {
    let (mut a, rx_a, _) = begin(work(&["mb-a1", "mb-a2"], true));
    let (mut b, rx_b, _) = begin(work(&["mb-b1"], false));
    let (up, store) = (Fake::new(4), MemStore::default());
    batch(vec![a.remove(0), b.remove(0)]).run(&up, &store);
    assert_eq!(up.calls.load(Ordering::SeqCst), 1, "one upstream request");
    let want = |ts: &[&str]| -> Vec<Item> {
        ts.iter()
            .map(|t| Item::Value(fp32(&vector(t, 4))))
            .collect()
    };
    assert_eq!(items(rx_a.try_recv().unwrap()), want(&["mb-a1", "mb-a2"]));
    assert_eq!(items(rx_b.try_recv().unwrap()), want(&["mb-b1"]));
    // Each call's store policy holds: b asked for NOSTORE.
    let stored = store.entries.lock().unwrap();
    assert_eq!(stored.len(), 2);
    assert!(!stored.contains_key(&(0, b"test:mb-b1".to_vec())));
}

#[test]
fn a_bad_input_in_a_batch_fails_only_its_own_call() {
    let (mut a, rx_a, _) = begin(work(&["ok-1", "ok-2", "ok-3"], true));
    let (mut b, rx_b, _) = begin(work(&["POISON-x"], true));
    let (mut c, rx_c, _) = begin(work(&["ok-4"], true));
    let up = Fake::new(4);
    let jobs = vec![a.remove(0), b.remove(0), c.remove(0)];
    batch(jobs).run(&up, &MemStore::default());
    assert!(items(rx_a.try_recv().unwrap())
        .iter()
        .all(|i| matches!(i, Item::Value(_))));
    assert!(items(rx_c.try_recv().unwrap())
        .iter()
        .all(|i| matches!(i, Item::Value(_))));
    match &items(rx_b.try_recv().unwrap())[..] {
        [Item::Error(e)] => assert!(e.contains("400"), "{e}"),
        other => panic!("{other:?}"),
    }
    // 5 inputs: the whole, then halves until the bad one stands alone,
    // within ceil(log2 5) = 3 halvings of 2 requests each.
    let calls = up.calls.load(Ordering::SeqCst);
    assert!((2..=7).contains(&calls), "{calls} requests");
}

#[test]
fn a_job_split_for_a_batch_still_answers_its_call_whole() {
    let (mut jobs, rx, _) = begin(work(&["sp-1", "sp-2", "sp-3"], true));
    let mut job = jobs.remove(0);
    let front = job.split_front(2).expect("an embedding job");
    assert_eq!(front.embed_size().map(|s| s.0), Some(2));
    assert_eq!(job.embed_size().map(|s| s.0), Some(1));
    let up = Fake::new(4);
    let store = MemStore::default();
    job.run(&up, &store);
    assert!(rx.try_recv().is_err(), "answered before its other part");
    front.run(&up, &store);
    assert_eq!(items(rx.try_recv().unwrap()).len(), 3);
}

/// Answers by URL: "down" URLs fail with the given failure, others answer
/// a chat completion naming the URL.
struct Routed {
    down: Vec<(&'static str, Failure)>,
    seen: Mutex<Vec<String>>,
}

impl Upstream for Routed {
    fn post(&self, d: &Dest, _: &[u8], _: Instant) -> Result<Vec<u8>, Failure> {
        self.seen.lock().unwrap().push(d.url.clone());
        if let Some((_, f)) = self.down.iter().find(|(u, _)| d.url.contains(u)) {
            return Err(f.clone());
        }
        let answer = json!({"choices": [{"message": {"role": "assistant", "content": d.url},
                            "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}});
        Ok(answer.to_string().into_bytes())
    }

    fn stream(&self, _: &Dest, _: &[u8], _: Instant, _: &mut dyn Sink) -> Result<(), Failure> {
        Err(Failure::Stopped)
    }
}

fn routed(down: Vec<(&'static str, Failure)>) -> Routed {
    Routed {
        down,
        seen: Mutex::new(Vec::new()),
    }
}

#[test]
fn it_fails_over_on_unavailability_but_not_on_a_bad_request() {
    let later = Instant::now() + Duration::from_secs(5);
    let plan = vec![dest("http://a/x"), dest("http://b/x"), dest("http://c/x")];
    let up = routed(vec![
        ("//a/", Failure::Status(503, "busy".into())),
        ("//b/", Failure::Timeout(10)),
    ]);
    let body = post_any(&up, &plan, b"{}", later).unwrap();
    assert!(String::from_utf8(body).unwrap().contains("http://c/x"));
    assert_eq!(up.seen.lock().unwrap().len(), 3);
    let up = routed(vec![("//a/", Failure::Status(400, "bad".into()))]);
    assert_eq!(
        post_any(&up, &plan, b"{}", later),
        Err(Failure::Status(400, "bad".into()))
    );
    assert_eq!(*up.seen.lock().unwrap(), vec!["http://a/x"], "no failover");
}

#[test]
fn an_open_circuit_is_skipped_without_a_request() {
    let plan = vec![dest("http://open/x"), dest("http://fine/x")];
    for _ in 0..crate::config::BREAKER_FAILURES.get_u64() {
        plan[0]
            .endpoint
            .record(Some(false), Duration::from_millis(1));
    }
    let up = routed(Vec::new());
    let later = Instant::now() + Duration::from_secs(5);
    assert!(post_any(&up, &plan, b"{}", later).is_ok());
    assert_eq!(*up.seen.lock().unwrap(), vec!["http://fine/x"]);
    assert_eq!(plan[0].endpoint.skipped.get(), 1);
    let alone = &plan[..1];
    assert_eq!(
        post_any(&up, alone, b"{}", later),
        Err(Failure::CircuitOpen("default".into()))
    );
}

fn chat_fill(plan: Vec<Dest>, fallback: Option<ChatFallback>) -> Work {
    Work {
        kind: Kind::Chat(Arc::new(ChatSpec {
            plan,
            body: b"{}".to_vec(),
            max_bytes: 1 << 20,
            fallback,
            semantic: None,
        })),
        entries: vec![Entry {
            key: b"llm:orig".to_vec(),
            input: String::new(),
            tokens: 1,
            hit: None,
        }],
        shape: Shape::Single,
        with_meta: true,
        ..work(&[], true)
    }
}

#[test]
fn a_fallback_answer_is_marked_and_stored_only_under_the_fallback_key() {
    let fallback = ChatFallback {
        model: "small".into(),
        body: b"{}".to_vec(),
        key: b"llm:small".to_vec(),
        plan: vec![dest("http://small/x")],
    };
    let (jobs, rx, _) = begin(chat_fill(vec![dest("http://big/x")], Some(fallback)));
    let up = routed(vec![("//big/", Failure::Status(429, "slow down".into()))]);
    let store = MemStore::default();
    for j in jobs {
        j.run(&up, &store);
    }
    match rx.try_recv().unwrap() {
        Reply::WithMeta { inner, meta, .. } => {
            assert!(matches!(*inner, Reply::Bulk(ref b) if b.windows(5).any(|w| w == b"small")));
            assert_eq!(meta[0].status, Status::Fallback);
            assert_eq!(&meta[0].key[..], b"llm:small");
        }
        other => panic!("{other:?}"),
    }
    let stored = store.entries.lock().unwrap();
    assert!(stored.contains_key(&(0, b"llm:small".to_vec())));
    assert!(!stored.contains_key(&(0, b"llm:orig".to_vec())));
}

#[test]
fn without_a_fallback_model_or_on_a_bad_request_nothing_falls_back() {
    let fb = || ChatFallback {
        model: "small".into(),
        body: b"{}".to_vec(),
        key: b"llm:small".to_vec(),
        plan: vec![dest("http://small/x")],
    };
    for (fallback, failure) in [
        (None, Failure::Status(429, "x".into())),
        (Some(fb()), Failure::Status(400, "bad".into())),
    ] {
        let (jobs, rx, _) = begin(chat_fill(vec![dest("http://big/x")], fallback));
        let up = routed(vec![("//big/", failure)]);
        for j in jobs {
            j.run(&up, &MemStore::default());
        }
        assert!(matches!(rx.try_recv().unwrap(), Reply::Error(_)));
        assert_eq!(up.seen.lock().unwrap().len(), 1);
    }
}
