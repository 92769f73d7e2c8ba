//! The whole fill path without Redis: `start` with a recording answer,
//! jobs run against a fake upstream and an in-memory store.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver};

use serde_json::{json, Value};

use std::sync::{Arc, Weak};
use std::time::Instant;

use crate::fill::call::tests::Recorder;
use crate::fill::call::{Call, Shape};
use crate::fill::endpoints::{Dest, Endpoint};
use crate::fill::job::Job;
use crate::fill::pipeline::*;
use crate::fill::store::mem::MemStore;
use crate::fill::upstream::{Failure, Sink, Upstream};

pub(super) fn dest(url: &str) -> Dest {
    Dest {
        endpoint: Endpoint::plain(url),
        url: url.into(),
    }
}
use crate::model::reply::{Item, Reply};

/// Embeddings of `dims` numbers derived from each text; refuses (400,
/// naming no input) any request holding a text with "POISON".
pub(super) struct Fake {
    dims: usize,
    pub(super) calls: AtomicU64,
    short_last: bool,
}

impl Fake {
    pub(super) fn new(dims: usize) -> Self {
        Fake {
            dims,
            calls: AtomicU64::new(0),
            short_last: false,
        }
    }
}

pub(super) fn vector(text: &str, dims: usize) -> Vec<f32> {
    (0..dims).map(|i| (text.len() * 31 + i) as f32).collect()
}

pub(super) fn fp32(v: &[f32]) -> Arc<[u8]> {
    v.iter()
        .flat_map(|f| f.to_le_bytes())
        .collect::<Vec<u8>>()
        .into()
}

impl Upstream for Fake {
    fn post(&self, _: &Dest, body: &[u8], _: Instant) -> Result<Vec<u8>, Failure> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let req: Value = serde_json::from_slice(body).unwrap();
        let inputs: Vec<String> = serde_json::from_value(req["input"].clone()).unwrap();
        if inputs.iter().any(|t| t.contains("POISON")) {
            return Err(Failure::Status(
                400,
                "maximum context length exceeded".into(),
            ));
        }
        let n = inputs.len();
        let data: Vec<Value> = inputs
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut v = vector(t, self.dims);
                if self.short_last && i == n - 1 {
                    v.pop();
                }
                json!({"index": i, "embedding": v})
            })
            .collect();
        Ok(json!({"data": data, "usage": {"total_tokens": n}})
            .to_string()
            .into_bytes())
    }

    fn stream(&self, _: &Dest, _: &[u8], _: Instant, _: &mut dyn Sink) -> Result<(), Failure> {
        Err(Failure::Stopped)
    }
}

pub(super) fn work(texts: &[&str], store: bool) -> Work {
    let entries = texts
        .iter()
        .map(|t| Entry {
            key: format!("test:{t}").into_bytes(),
            input: t.to_string(),
            tokens: 1,
            hit: None,
        })
        .collect();
    Work {
        db: 0,
        kind: Kind::Embed(Arc::new(EmbedSpec {
            plan: vec![dest("http://fake/v1/embeddings")],
            model: "m".into(),
            dims: None,
            pin_key: Some(b"pins".to_vec()),
            fixed_dims: 0,
            known_dims: None,
            max_dims: 64,
            base64: false,
        })),
        entries,
        shape: Shape::Vectors {
            order: (0..texts.len()).collect(),
            json: false,
        },
        expiry: store.then_some(Expiry {
            ttl_secs: 60,
            jitter_pct: 0,
        }),
        tenant: None,
        timeout_ms: 1000,
        batch_size: 100,
        batch_max_tokens: 1000,
        lease_ms: 60_000,
        max_fills: 1000,
        fail_memory_ms: 0,
        with_meta: false,
    }
}

pub(crate) fn begin(w: Work) -> (Vec<Job>, Receiver<Reply>, Weak<Call>) {
    let (tx, rx) = channel();
    let mut call = Weak::new();
    let Ok(Started::Jobs(jobs)) = start(w, 0, |c| {
        call = c;
        Some(Box::new(Recorder(tx)))
    }) else {
        panic!("start did not block")
    };
    (jobs, rx, call)
}

#[test]
fn a_fill_stores_and_answers_every_entry() {
    let texts = ["pipe-a", "pipe-bb"];
    let (jobs, rx, _) = begin(work(&texts, true));
    let (up, store) = (Fake::new(4), MemStore::default());
    for j in jobs {
        j.run(&up, &store);
    }
    let want: Vec<Item> = texts
        .iter()
        .map(|t| Item::Value(fp32(&vector(t, 4))))
        .collect();
    assert_eq!(
        rx.try_recv().unwrap(),
        Reply::Items {
            items: want,
            json: false
        }
    );
    assert_eq!(store.entries.lock().unwrap().len(), 2);
    assert_eq!(
        store
            .pins
            .lock()
            .unwrap()
            .values()
            .copied()
            .collect::<Vec<_>>(),
        vec![4]
    );
}

#[test]
fn withmeta_tells_the_starter_from_the_joiner_and_nostore_from_stored() {
    let meta_work = |store: bool| Work {
        with_meta: true,
        ..work(&["meta-x", "meta-y"], store)
    };
    let (jobs, rx1, _) = begin(meta_work(true));
    let (more, rx2, _) = begin(Work {
        entries: vec![Entry {
            key: b"test:meta-y".to_vec(),
            input: "meta-y".into(),
            tokens: 1,
            hit: Some(fp32(&[1.0; 4])),
        }]
        .into_iter()
        .chain(work(&["meta-x"], true).entries)
        .collect(),
        ..meta_work(true)
    });
    assert!(more.is_empty());
    let (up, store) = (Fake::new(4), MemStore::default());
    for j in jobs {
        j.run(&up, &store);
    }
    let statuses = |r: Reply| match r {
        Reply::WithMeta { meta, single, .. } => {
            assert!(!single);
            meta.iter()
                .map(|m| (m.status, m.stored))
                .collect::<Vec<_>>()
        }
        other => panic!("no metadata: {other:?}"),
    };
    use crate::model::reply::Status::*;
    assert_eq!(
        statuses(rx1.try_recv().unwrap()),
        [(Miss, true), (Miss, true)]
    );
    assert_eq!(
        statuses(rx2.try_recv().unwrap()),
        [(Hit, true), (Coalesced, true)]
    );
    let (jobs, rx3, _) = begin(meta_work(false));
    for j in jobs {
        j.run(&up, &store);
    }
    assert_eq!(
        statuses(rx3.try_recv().unwrap()),
        [(Miss, false), (Miss, false)]
    );
}

#[test]
fn identical_concurrent_misses_share_one_fill() {
    let (jobs, rx1, _) = begin(work(&["share-x"], true));
    let (more, rx2, _) = begin(work(&["share-x"], true));
    assert!(more.is_empty(), "the second call must join, not start");
    let up = Fake::new(2);
    for j in jobs {
        j.run(&up, &MemStore::default());
    }
    assert_eq!(up.calls.load(Ordering::SeqCst), 1);
    assert_eq!(rx1.try_recv().unwrap(), rx2.try_recv().unwrap());
}

#[test]
fn one_refused_input_fails_alone_and_costs_a_few_requests() {
    let texts: Vec<String> = (0..8)
        .map(|i| {
            if i == 5 {
                "iso-POISON".into()
            } else {
                format!("iso-{i}")
            }
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (jobs, rx, _) = begin(work(&refs, true));
    let up = Fake::new(2);
    for j in jobs {
        j.run(&up, &MemStore::default());
    }
    let Reply::Items { items, .. } = rx.try_recv().unwrap() else {
        panic!("not an array")
    };
    for (i, item) in items.iter().enumerate() {
        match item {
            Item::Error(e) if i == 5 => assert!(e.contains("HTTP 400"), "{e}"),
            Item::Value(v) => assert_eq!(*v, fp32(&vector(&texts[i], 2))),
            other => panic!("entry {i}: {other:?}"),
        }
    }
    // 1 + 2 per halving: 1 + 2 * log2(8).
    assert!(
        up.calls.load(Ordering::SeqCst) <= 7,
        "{}",
        up.calls.load(Ordering::SeqCst)
    );
}

#[test]
fn a_wrong_size_answer_neither_pins_nor_reaches_nostore_callers() {
    let store = MemStore::default();
    store
        .pins
        .lock()
        .unwrap()
        .insert((0, b"pins".to_vec(), b"m".to_vec()), 4);
    for keep in [true, false] {
        let (jobs, rx, _) = begin(work(&[if keep { "pin-s" } else { "pin-n" }], keep));
        for j in jobs {
            j.run(&Fake::new(3), &store);
        }
        let Reply::Error(e) = rx.try_recv().unwrap() else {
            panic!("no error")
        };
        assert!(e.contains("dimension mismatch"), "{e}");
    }
    assert!(store.entries.lock().unwrap().is_empty());
    // A batch whose last vector is one short is refused whole.
    let up = Fake {
        short_last: true,
        ..Fake::new(4)
    };
    let (jobs, rx, _) = begin(work(&["short-a", "short-b"], true));
    for j in jobs {
        j.run(&up, &store);
    }
    assert!(matches!(rx.try_recv().unwrap(), Reply::Error(e) if e.contains("dimensions")));
    assert!(store.entries.lock().unwrap().is_empty());
}

/// Issue 8 A1 on the whole path: the deadline fires on one thread while
/// the job completes on another; the call answers exactly once.
#[test]
fn the_deadline_racing_a_fill_gives_exactly_one_reply() {
    for i in 0..300 {
        let text = format!("race-{i}");
        let (jobs, rx, call) = begin(work(&[&text], true));
        let worker = std::thread::spawn(move || {
            for j in jobs {
                j.run(&Fake::new(2), &MemStore::default());
            }
        });
        if let Some(c) = call.upgrade() {
            c.expire();
        }
        worker.join().unwrap();
        assert!(rx.try_recv().is_ok(), "no reply");
        assert!(rx.try_recv().is_err(), "two replies");
    }
}

#[test]
fn a_job_that_outlived_its_lease_in_the_queue_says_so() {
    let mut w = work(&["late-1"], true);
    w.lease_ms = 0;
    let (jobs, rx, _) = begin(w);
    for j in jobs {
        j.run(&Fake::new(2), &MemStore::default());
    }
    let Reply::Error(e) = rx.try_recv().unwrap() else {
        panic!()
    };
    assert!(e.contains("waited") && e.contains("lease-ms"), "{e}");
    assert!(!e.contains("after 0 ms"), "{e}");
}
