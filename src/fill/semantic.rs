//! The worker side of the semantic cache: embed the prompt (through the
//! embedding cache), shortlist candidates of the same context from the
//! index, score them exactly against their sidecars, and answer with the
//! best when it reaches the threshold; otherwise fill as usual and keep
//! the prompt vector next to the answer. Runs on a worker: the main
//! thread never embeds, searches or scores.

use std::sync::Arc;
use std::time::Instant;

use crate::fill::call::{Call, FillError, FillResult};
use crate::fill::endpoints::post_any;
use crate::fill::job::{chat as fill_chat, Job, Spent};
use crate::fill::pipeline::{ChatSpec, EmbedSpec, Expiry, Mark};
use crate::fill::semindex;
use crate::fill::store::{Commit, Store};
use crate::fill::upstream::Failure;
use crate::model::canon::tokens_in_answer;
use crate::model::embed::{parse_response, request_body};
use crate::model::pins::check_answer;
use crate::model::quota::estimate_tokens;
use crate::model::reply::{Reply, Status};
use crate::model::semantic::{cosine, floats, usable, Sidecar};
use crate::stats::STATS;

/// A semantic lookup, built on the main thread by FETCH ... SIMILAR or
/// LLMCACHE.SIMILAR.
pub struct SemSpec {
    pub threshold: f64,
    /// Entries LLMCACHE.SIMILAR lists.
    pub count: usize,
    pub context: [u8; 32],
    pub nsid: [u8; 16],
    pub generation: u64,
    /// The final user message's text, as embedded.
    pub text: String,
    /// The request's own entry and its sidecar key.
    pub answer_key: Vec<u8>,
    pub sem_key: Vec<u8>,
    /// The prompt's vector, when the embedding cache held it.
    pub vector: Option<Vec<f32>>,
    /// How to embed the prompt otherwise, and where to cache it.
    pub embed: Arc<EmbedSpec>,
    pub emb_key: Vec<u8>,
    pub emb_expiry: Option<Expiry>,
    /// False on a replica: a lookup may answer, a miss may not fill.
    pub may_fill: bool,
}

/// Candidates scored exactly per lookup, beyond what is listed.
const SHORTLIST: usize = 64;

/// LLMCACHE.SIMILAR's one reply. Dropped unanswered (a panicking worker,
/// a job dropped at shutdown), it fails the call, so no client waits on.
pub struct Replier(Option<Arc<Call>>);

impl Replier {
    pub fn new(call: Arc<Call>) -> Self {
        Replier(Some(call))
    }

    pub fn send(mut self, reply: Reply) {
        if let Some(c) = self.0.take() {
            c.reply(reply);
        }
    }

    pub fn fail(&mut self, msg: &str) {
        if let Some(c) = self.0.take() {
            c.reply(Reply::Error(msg.into()));
        }
    }
}

impl Drop for Replier {
    fn drop(&mut self) {
        self.fail("ERR internal error: the lookup was abandoned");
    }
}

/// How a chat job ended.
pub(crate) struct ChatDone {
    pub result: FillResult,
    pub spent: Spent,
    pub mark: Mark,
    /// Remember a failure for aicache.fail-memory-ms.
    pub remember: bool,
}

/// A chat fill, preceded by a semantic lookup when the call asked for one.
pub(crate) fn chat(
    up: &dyn crate::fill::upstream::Upstream,
    store: &dyn Store,
    job: &Job,
    spec: &ChatSpec,
    key: &[u8],
) -> ChatDone {
    let Some(sem) = &spec.semantic else {
        let (result, spent, fb) = fill_chat(up, store, job, spec, key, None);
        return ChatDone {
            result,
            spent,
            mark: fb.map(|k| (Status::Fallback, k)),
            remember: true,
        };
    };
    STATS.semantic_lookups.incr();
    let mut spent = Spent::default();
    let query = match query_vector(up, store, job.db, job.deadline, sem, &mut spent) {
        Ok(q) => Some(q),
        Err(_) => {
            // The lookup is an optimisation: the call is still answered.
            STATS.semantic_errors.incr();
            None
        }
    };
    if let Some(q) = query.as_ref().filter(|_| sem.threshold <= 1.0) {
        let best = ranked(store, job.db, sem, q, 1).into_iter().next();
        if let Some(f) = best.filter(|f| f.score >= sem.threshold) {
            STATS.semantic_hits.incr();
            let saved =
                tokens_in_answer(&f.answer).unwrap_or_else(|| estimate_tokens(spec.body.len()));
            STATS.tokens_saved.add(saved);
            return ChatDone {
                result: Ok(f.answer),
                spent,
                mark: Some((Status::Similar, Arc::from(f.answer_key))),
                remember: false,
            };
        }
    }
    STATS.semantic_misses.incr();
    if !sem.may_fill {
        return ChatDone {
            result: Err(FillError::whole(
                "ERR 1 cache miss(es) on a replica; fills run on the master",
            )),
            spent,
            mark: None,
            remember: false,
        };
    }
    // Without a vector the answer is kept exact-only: it cannot be found
    // by similarity, but it is still an answer.
    let side = query.map(|q| sidecar(sem, key, &q));
    let pair = side.as_deref().map(|s| (sem.sem_key.as_slice(), s));
    let (result, more, fb) = fill_chat(up, store, job, spec, key, pair);
    spent.requests += more.requests;
    spent.tokens = spent.tokens.saturating_add(more.tokens);
    spent.answered |= more.answered;
    ChatDone {
        result,
        spent,
        mark: fb.map(|k| (Status::Fallback, k)),
        remember: true,
    }
}

/// LLMCACHE.SIMILAR: `[[score, key, prompt], ...]`, best first.
pub(crate) fn similar(
    up: &dyn crate::fill::upstream::Upstream,
    store: &dyn Store,
    db: i32,
    deadline: Instant,
    sem: &SemSpec,
) -> (Reply, Spent) {
    let mut spent = Spent::default();
    let q = match query_vector(up, store, db, deadline, sem, &mut spent) {
        Ok(q) => q,
        Err(e) => return (Reply::Error(e), spent),
    };
    let rows = ranked(store, db, sem, &q, sem.count)
        .into_iter()
        .map(|f| {
            Reply::Array(vec![
                Reply::Bulk(Arc::from(format!("{:.6}", f.score).as_bytes())),
                Reply::Bulk(Arc::from(f.answer_key)),
                Reply::Bulk(Arc::from(f.text)),
            ])
        })
        .collect();
    (Reply::Array(rows), spent)
}

/// The prompt's vector: from the embedding cache, or embedded now and
/// cached as EMBCACHE.FETCH would (same key, pin and checks).
fn query_vector(
    up: &dyn crate::fill::upstream::Upstream,
    store: &dyn Store,
    db: i32,
    deadline: Instant,
    sem: &SemSpec,
    spent: &mut Spent,
) -> Result<Vec<f32>, String> {
    if let Some(v) = &sem.vector {
        return Ok(v.clone());
    }
    let spec = &sem.embed;
    let body = request_body(&spec.model, &[sem.text.as_str()], spec.dims, spec.base64);
    let posted = post_any(up, &spec.plan, &body, deadline);
    spent.count(&posted);
    let invalid = |e: String| {
        let f = Failure::Invalid(e);
        f.count();
        f.message()
    };
    let answer = posted.map_err(|f| f.message())?;
    let e = parse_response(&answer, 1, spec.dims.map(|d| d as usize), spec.max_dims)
        .map_err(invalid)?;
    spent.tokens = spent.tokens.saturating_add(e.tokens);
    spent.answered = true;
    STATS.tokens_prompt.add(e.tokens);
    STATS.tokens_total.add(e.tokens);
    let bytes = e
        .vectors
        .into_iter()
        .next()
        .ok_or_else(|| invalid("no vector".into()))?;
    let dims = bytes.len() / 4;
    check_answer(spec.known_dims, None, spec.fixed_dims, dims).map_err(invalid)?;
    let commit = Commit {
        db,
        pin: spec.pin_key.as_deref().map(|k| (k, spec.model.as_bytes())),
        dims,
        entries: vec![(sem.emb_key.as_slice(), bytes.as_slice())],
        expiry: sem.emb_expiry,
        together: false,
        companion: None,
    };
    store.commit(&commit)?;
    let v = floats(&bytes);
    if !usable(&v) {
        return Err(invalid("the prompt's vector is zero or not finite".into()));
    }
    Ok(v)
}

/// A stored entry of the caller's context, scored.
struct Found {
    score: f64,
    answer_key: Vec<u8>,
    text: Vec<u8>,
    answer: Arc<[u8]>,
}

/// The `n` entries of `sem`'s context most similar to `query`, best
/// first, each checked against its sidecar and still holding an answer.
/// The index only shortlists: a stale or foreign index entry can cost a
/// miss, never a wrong answer. A sidecar is Redis data anyone with write
/// access could forge, so it must also sit in this namespace's slot, name
/// the answer its own key names, and carry this namespace's generation:
/// it can never point a lookup at another key.
fn ranked(store: &dyn Store, db: i32, sem: &SemSpec, query: &[f32], n: usize) -> Vec<Found> {
    let keys = semindex::shortlist(db, &sem.context, query, SHORTLIST.max(n * 4));
    let prefix = slot_prefix(&sem.sem_key);
    let keys: Vec<&[u8]> = keys
        .iter()
        .map(|k| &k[..])
        .filter(|k| k.starts_with(prefix))
        .collect();
    let mut scored: Vec<(f64, Vec<u8>, Vec<u8>)> = Vec::new();
    for (key, value) in keys.iter().zip(store.read(db, &keys, false)) {
        let Some(value) = value else { continue };
        let Some(side) = Sidecar::decode(&value) else {
            continue;
        };
        let own = answer_key_of(sem, key);
        if side.context != sem.context
            || side.nsid != sem.nsid
            || side.generation != sem.generation
            || side.vector.len() != query.len() * 4
            || own.as_deref() != Some(side.answer_key)
        {
            continue;
        }
        let score = cosine(query, &side.floats());
        scored.push((score, side.answer_key.to_vec(), side.text.to_vec()));
    }
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut found = Vec::with_capacity(n);
    // Answers are read a few at a time: most lookups need one. These reads
    // count as uses, so an entry served by similarity is not evicted as idle.
    for chunk in scored.chunks(n.max(1)) {
        let answer_keys: Vec<&[u8]> = chunk.iter().map(|s| s.1.as_slice()).collect();
        for (s, a) in chunk.iter().zip(store.read(db, &answer_keys, true)) {
            if let Some(a) = a {
                found.push(Found {
                    score: s.0,
                    answer_key: s.1.clone(),
                    text: s.2.clone(),
                    answer: Arc::from(a),
                });
            }
        }
        if found.len() >= n {
            break;
        }
    }
    found.truncate(n);
    found
}

/// `<prefix>sem:v1:{<tag>}:` of a sidecar key: the namespace's slot.
fn slot_prefix(sem_key: &[u8]) -> &[u8] {
    let end = sem_key
        .iter()
        .rposition(|&b| b == b':')
        .map_or(0, |i| i + 1);
    &sem_key[..end]
}

/// The chat entry a sidecar key of this slot belongs to: the same name
/// with the kind of the request's own entry.
fn answer_key_of(sem: &SemSpec, key: &[u8]) -> Option<Vec<u8>> {
    let digest = key.strip_prefix(slot_prefix(&sem.sem_key))?;
    // Exactly an entry digest: never `<digest>:stream` or another suffix.
    if digest.len() != 64
        || !digest
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    let mut k = slot_prefix(&sem.answer_key).to_vec();
    k.extend_from_slice(digest);
    Some(k)
}

fn sidecar(sem: &SemSpec, answer_key: &[u8], query: &[f32]) -> Vec<u8> {
    let vector: Vec<u8> = query.iter().flat_map(|f| f.to_le_bytes()).collect();
    Sidecar {
        context: sem.context,
        nsid: sem.nsid,
        generation: sem.generation,
        answer_key,
        text: sem.text.as_bytes(),
        vector: &vector,
    }
    .encode()
}
