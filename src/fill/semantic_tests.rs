//! The semantic lookup on the whole fill path without Redis: a similar
//! entry answers, anything the index names is checked against the stored
//! sidecar first, and a miss stores the answer with its vector.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use crate::fill::call::Shape;
use crate::fill::pipeline::*;
use crate::fill::semantic::SemSpec;
use crate::fill::semindex;
use crate::fill::store::mem::MemStore;
use crate::fill::tests::{begin, dest, work};
use crate::fill::upstream::{Failure, Sink, Upstream};
use crate::model::reply::{Reply, Status};
use crate::model::semantic::Sidecar;
use crate::model::vindex::Head;

/// Embeds every text as `[1, 0]` and answers chats with "fresh".
#[derive(Default)]
struct Both {
    embeds: AtomicU64,
    chats: AtomicU64,
}

impl Upstream for Both {
    fn post(
        &self,
        d: &crate::fill::endpoints::Dest,
        _: &[u8],
        _: Instant,
    ) -> Result<Vec<u8>, Failure> {
        let v: Value = if d.url.contains("emb") {
            self.embeds.fetch_add(1, Ordering::SeqCst);
            json!({"data": [{"index": 0, "embedding": [1.0, 0.0]}], "usage": {"total_tokens": 2}})
        } else {
            self.chats.fetch_add(1, Ordering::SeqCst);
            json!({"choices": [{"message": {"role": "assistant", "content": "fresh"},
                   "finish_reason": "stop"}], "usage": {"total_tokens": 5}})
        };
        Ok(v.to_string().into_bytes())
    }

    fn stream(
        &self,
        _: &crate::fill::endpoints::Dest,
        _: &[u8],
        _: Instant,
        _: &mut dyn Sink,
    ) -> Result<(), Failure> {
        Err(Failure::Stopped)
    }
}

/// A 64-hex-digit digest standing for `name`, as entry keys carry.
fn hex(name: &str) -> String {
    let h: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{h:0>64}")
}

fn fp(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|f| f.to_le_bytes()).collect()
}

fn spec(ctx: u8, vector: Option<Vec<f32>>, may_fill: bool) -> SemSpec {
    let Kind::Embed(embed) = work(&[], true).kind else {
        unreachable!()
    };
    SemSpec {
        threshold: 0.9,
        count: 1,
        context: [ctx; 32],
        nsid: [1; 16],
        generation: 0,
        text: "the prompt".into(),
        answer_key: format!("llm:{}", hex(&format!("own{ctx}"))).into_bytes(),
        sem_key: format!("sem:{}", hex(&format!("own{ctx}"))).into_bytes(),
        vector,
        embed,
        emb_key: format!("emb:{ctx}").into_bytes(),
        emb_expiry: Some(Expiry {
            ttl_secs: 60,
            jitter_pct: 0,
        }),
        may_fill,
    }
}

fn chat(sem: SemSpec) -> Work {
    let key = sem.answer_key.clone();
    Work {
        kind: Kind::Chat(Arc::new(ChatSpec {
            plan: vec![dest("http://chat/x")],
            body: b"{}".to_vec(),
            max_bytes: 1 << 20,
            fallback: None,
            semantic: Some(Arc::new(sem)),
        })),
        entries: vec![Entry {
            key,
            input: String::new(),
            tokens: 1,
            hit: None,
        }],
        shape: Shape::Single,
        with_meta: true,
        ..work(&[], true)
    }
}

/// Stores answer `llm:<name>` with its sidecar in context `ctx` and
/// indexes it as context `indexed_as` (a stale index when they differ).
fn put(store: &MemStore, name: &str, ctx: u8, indexed_as: u8, v: &[f32], answer: Option<&str>) {
    let key = format!("llm:{}", hex(name)).into_bytes();
    let vector = fp(v);
    let side = Sidecar {
        context: [ctx; 32],
        nsid: [1; 16],
        generation: 0,
        answer_key: &key,
        text: name.as_bytes(),
        vector: &vector,
    };
    let mut e = store.entries.lock().unwrap();
    e.insert(
        (0, format!("sem:{}", hex(name)).into_bytes()),
        side.encode(),
    );
    if let Some(a) = answer {
        e.insert((0, key.clone()), a.as_bytes().to_vec());
    }
    let head = Head {
        context: [indexed_as; 32],
        nsid: [1; 16],
        generation: 0,
    };
    semindex::index_for_test(0, format!("sem:{}", hex(name)).as_bytes(), head, v);
}

fn run(w: Work, store: &MemStore) -> (Reply, Both) {
    let (jobs, rx, _) = begin(w);
    let up = Both::default();
    for j in jobs {
        j.run(&up, store);
    }
    (rx.try_recv().unwrap(), up)
}

fn status(r: &Reply) -> (Status, Vec<u8>, Vec<u8>) {
    match r {
        Reply::WithMeta { inner, meta, .. } => match &**inner {
            Reply::Bulk(b) => (meta[0].status, meta[0].key.to_vec(), b.to_vec()),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_similar_entry_answers_marked_without_a_chat_call() {
    let store = MemStore::default();
    put(
        &store,
        "near",
        201,
        201,
        &[0.95, 0.31],
        Some("stored answer"),
    );
    put(&store, "far", 201, 201, &[0.0, 1.0], Some("far answer"));
    let (reply, up) = run(chat(spec(201, Some(vec![1.0, 0.0]), true)), &store);
    assert_eq!(
        status(&reply),
        (
            Status::Similar,
            format!("llm:{}", hex("near")).into_bytes(),
            b"stored answer".to_vec()
        )
    );
    assert_eq!(up.chats.load(Ordering::SeqCst), 0);
    assert_eq!(up.embeds.load(Ordering::SeqCst), 0, "the vector was cached");
}

#[test]
fn what_the_index_names_is_checked_against_the_store_first() {
    let store = MemStore::default();
    // Indexed under this context but stored under another: a stale index.
    put(
        &store,
        "foreign",
        202,
        203,
        &[1.0, 0.0],
        Some("foreign answer"),
    );
    // The right context, but its answer is gone (evicted).
    put(&store, "orphan", 203, 203, &[1.0, 0.0], None);
    let (reply, up) = run(chat(spec(203, None, true)), &store);
    let (st, _, body) = status(&reply);
    assert_eq!(st, Status::Miss);
    assert!(String::from_utf8(body).unwrap().contains("fresh"));
    assert_eq!(up.embeds.load(Ordering::SeqCst), 1);
    assert_eq!(up.chats.load(Ordering::SeqCst), 1);
    // The answer and its sidecar are stored together; the sidecar decodes
    // to this context and the embedded vector.
    let e = store.entries.lock().unwrap();
    let own = format!("llm:{}", hex("own203")).into_bytes();
    assert!(e.contains_key(&(0, own.clone())));
    let side = e
        .get(&(0, format!("sem:{}", hex("own203")).into_bytes()))
        .unwrap();
    let side = Sidecar::decode(side).unwrap();
    assert_eq!((side.context, side.answer_key), ([203; 32], &own[..]));
    assert_eq!(side.floats(), vec![1.0, 0.0]);
    assert!(
        e.contains_key(&(0, b"emb:203".to_vec())),
        "the prompt's embedding is cached"
    );
}

#[test]
fn below_the_threshold_or_on_a_replica_there_is_no_similar_answer() {
    let store = MemStore::default();
    put(&store, "below", 204, 204, &[0.8, 0.6], Some("x"));
    let (reply, up) = run(chat(spec(204, Some(vec![1.0, 0.0]), false)), &store);
    assert!(matches!(reply, Reply::Error(ref e) if e.contains("on a replica")));
    assert_eq!(up.chats.load(Ordering::SeqCst), 0);
}
