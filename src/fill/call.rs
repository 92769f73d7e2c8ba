//! One blocked FETCH and what it has received so far. The call answers
//! exactly once: when its last entry arrives, when an error fails it
//! whole, or at its deadline, whichever takes the answer first (under the
//! call's lock). An entry whose own input was refused upstream becomes an
//! error element, and the others still arrive.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::model::reply::{Item, Meta, Reply, Status};
use crate::stats::STATS;

/// The one way to answer a blocked client; tests record instead.
pub trait Answer: Send {
    fn send(self: Box<Self>, reply: Reply);
    /// Answers from the deadline callback.
    fn send_at_deadline(self: Box<Self>, reply: Reply) {
        self.send(reply)
    }
}

impl Answer for crate::redis::blocked::Blocked {
    fn send(self: Box<Self>, reply: Reply) {
        self.unblock(reply)
    }
    fn send_at_deadline(self: Box<Self>, reply: Reply) {
        self.unblock_at_deadline(reply)
    }
}

/// Why a fill failed.
#[derive(Debug, Clone, PartialEq)]
pub struct FillError {
    pub msg: Arc<str>,
    /// The upstream refused this entry's own input (found by splitting its
    /// batch): only this entry fails, not the calls that share it.
    pub per_input: bool,
}

impl FillError {
    pub fn whole(msg: &str) -> Self {
        FillError {
            msg: Arc::from(msg),
            per_input: false,
        }
    }
}

pub type FillResult = Result<Arc<[u8]>, FillError>;

/// How a complete call renders its slots.
#[derive(Debug, Clone)]
pub enum Shape {
    /// One element per input; `order[i]` is the slot of input `i`.
    Vectors { order: Vec<usize>, json: bool },
    /// A single bulk string (the LLM response).
    Single,
}

#[derive(Clone)]
enum Slot {
    Waiting,
    Value(Arc<[u8]>),
    Failed(Arc<str>),
}

pub const TIMEOUT_MSG: &str =
    "ERR timed out waiting for the upstream fill (TIMEOUT option or aicache.wait-timeout-ms)";

pub struct Call {
    state: Mutex<State>,
}

struct State {
    answer: Option<Box<dyn Answer>>,
    slots: Vec<Slot>,
    missing: usize,
    shape: Shape,
    meta: Option<MetaPlan>,
}

/// What WITHMETA reports of each slot.
#[derive(Debug, Clone)]
pub struct MetaPlan {
    pub keys: Vec<Arc<[u8]>>,
    pub status: Vec<Status>,
    /// The fills keep what they fetch (not NOSTORE).
    pub stored: bool,
}

impl Call {
    /// `slots` holds the hits; `None` marks an entry still to be filled.
    pub fn new(slots: Vec<Option<Arc<[u8]>>>, shape: Shape) -> Arc<Call> {
        let missing = slots.iter().filter(|s| s.is_none()).count();
        Arc::new(Call {
            state: Mutex::new(State {
                answer: None,
                slots: slots
                    .into_iter()
                    .map(|s| s.map_or(Slot::Waiting, Slot::Value))
                    .collect(),
                missing,
                shape,
                meta: None,
            }),
        })
    }

    /// Makes the reply carry WITHMETA metadata.
    pub fn want_meta(&self, plan: MetaPlan) {
        self.lock().meta = Some(plan);
    }

    /// Slot `slot` joined a fill another call started.
    pub fn coalesced(&self, slot: usize) {
        if let Some(s) = self
            .lock()
            .meta
            .as_mut()
            .and_then(|m| m.status.get_mut(slot))
        {
            *s = Status::Coalesced;
        }
    }

    /// Slot `slot` is answered by another entry than its own (a fallback
    /// model's, a similar request's), stored under `key`.
    pub fn mark(&self, slot: usize, status: Status, key: Arc<[u8]>) {
        if let Some(m) = self.lock().meta.as_mut() {
            if let (Some(s), Some(k)) = (m.status.get_mut(slot), m.keys.get_mut(slot)) {
                *s = status;
                *k = key;
            }
        }
    }

    /// Answers with `reply` unless already answered (LLMCACHE.SIMILAR).
    pub fn reply(&self, reply: Reply) {
        let answer = {
            let mut st = self.lock();
            st.slots.clear();
            st.answer.take()
        };
        if let Some(a) = answer {
            a.send(reply);
        }
    }

    /// Marks entries whose own input is known to be refused (failure
    /// memory): they are answered as error elements and not filled.
    pub fn refuse(&self, failed: &[(usize, Arc<str>)]) {
        let mut st = self.lock();
        for (slot, msg) in failed {
            if let Some(s @ Slot::Waiting) = st.slots.get_mut(*slot) {
                *s = Slot::Failed(msg.clone());
                st.missing -= 1;
            }
        }
    }

    /// The reply, when nothing is left to fill.
    pub fn ready(&self) -> Option<Reply> {
        let st = self.lock();
        (st.missing == 0).then(|| render(&st.slots, &st.shape, st.meta.as_ref()))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands the call its way to answer, once it is blocked.
    pub fn attach(&self, answer: Box<dyn Answer>) {
        self.lock().answer = Some(answer);
    }

    pub fn deliver(&self, slot: usize, result: &FillResult) {
        let mut st = self.lock();
        if st.answer.is_none() {
            return;
        }
        match result {
            Err(e) if !e.per_input || matches!(st.shape, Shape::Single) => {
                let answer = st.answer.take();
                st.slots.clear();
                drop(st);
                if let Some(a) = answer {
                    a.send(Reply::Error(e.msg.to_string()));
                }
                return;
            }
            Err(e) => {
                if let Some(s @ Slot::Waiting) = st.slots.get_mut(slot) {
                    *s = Slot::Failed(e.msg.clone());
                    st.missing -= 1;
                }
            }
            Ok(v) => {
                if let Some(s @ Slot::Waiting) = st.slots.get_mut(slot) {
                    *s = Slot::Value(v.clone());
                    st.missing -= 1;
                }
            }
        }
        if st.missing == 0 {
            let answer = st.answer.take();
            let reply = render(&st.slots, &st.shape, st.meta.as_ref());
            st.slots.clear();
            drop(st);
            if let Some(a) = answer {
                a.send(reply);
            }
        }
    }

    /// Fails the whole call now (queue full, too many fills, shutdown).
    pub fn fail(&self, msg: &str) {
        self.deliver(0, &Err(FillError::whole(msg)));
    }

    /// The deadline: answers with a timeout error unless already answered.
    pub fn expire(&self) {
        let answer = {
            let mut st = self.lock();
            st.slots.clear();
            st.answer.take()
        };
        if let Some(a) = answer {
            STATS.wait_timeouts.incr();
            a.send_at_deadline(Reply::Error(TIMEOUT_MSG.into()));
        }
    }
}

/// The reply of a call whose every slot is settled.
pub fn render_hits(slots: Vec<Option<Arc<[u8]>>>, shape: &Shape, meta: Option<&MetaPlan>) -> Reply {
    let slots: Vec<Slot> = slots
        .into_iter()
        .map(|s| s.map_or(Slot::Waiting, Slot::Value))
        .collect();
    render(&slots, shape, meta)
}

fn render(slots: &[Slot], shape: &Shape, meta: Option<&MetaPlan>) -> Reply {
    let inner = render_values(slots, shape);
    let Some(plan) = meta else {
        return inner;
    };
    if matches!(inner, Reply::Error(_)) {
        return inner;
    }
    let of = |slot: usize| Meta {
        status: plan.status.get(slot).copied().unwrap_or(Status::Miss),
        key: plan
            .keys
            .get(slot)
            .cloned()
            .unwrap_or_else(|| Arc::from(&b""[..])),
        stored: matches!(slots.get(slot), Some(Slot::Value(_)))
            && (plan.stored
                || matches!(plan.status.get(slot), Some(Status::Hit | Status::Similar))),
    };
    let (meta, single) = match shape {
        Shape::Single => (vec![of(0)], true),
        Shape::Vectors { order, .. } => (order.iter().map(|&s| of(s)).collect(), false),
    };
    Reply::WithMeta {
        inner: Box::new(inner),
        meta,
        single,
    }
}

fn render_values(slots: &[Slot], shape: &Shape) -> Reply {
    let item = |s: &Slot| match s {
        Slot::Value(v) => Item::Value(v.clone()),
        Slot::Failed(e) => Item::Error(e.clone()),
        Slot::Waiting => Item::Error(Arc::from("ERR internal error: entry missing")),
    };
    match shape {
        Shape::Single => match slots.first().map(item) {
            Some(Item::Value(v)) => Reply::Bulk(v),
            Some(Item::Error(e)) => Reply::Error(e.to_string()),
            None => Reply::Error("ERR internal error: no entry".into()),
        },
        Shape::Vectors { order, json } => Reply::Items {
            items: order
                .iter()
                .map(|&i| {
                    slots
                        .get(i)
                        .map_or(Item::Error(Arc::from("ERR internal error")), item)
                })
                .collect(),
            json: *json,
        },
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Sender};

    /// Records what a call answered, and how many times.
    pub struct Recorder(pub Sender<Reply>);

    impl Answer for Recorder {
        fn send(self: Box<Self>, reply: Reply) {
            let _ = self.0.send(reply);
        }
    }

    fn v(b: &[u8]) -> Arc<[u8]> {
        Arc::from(b)
    }

    fn open(
        slots: Vec<Option<Arc<[u8]>>>,
        shape: Shape,
    ) -> (Arc<Call>, std::sync::mpsc::Receiver<Reply>) {
        let (tx, rx) = channel();
        let c = Call::new(slots, shape);
        c.attach(Box::new(Recorder(tx)));
        (c, rx)
    }

    #[test]
    fn it_answers_when_the_last_entry_arrives() {
        let shape = Shape::Vectors {
            order: vec![0, 1, 0],
            json: false,
        };
        let (c, rx) = open(vec![Some(v(b"hit!")), None], shape);
        assert!(rx.try_recv().is_err());
        c.deliver(1, &Ok(v(b"fill")));
        let want = Reply::Items {
            items: vec![
                Item::Value(v(b"hit!")),
                Item::Value(v(b"fill")),
                Item::Value(v(b"hit!")),
            ],
            json: false,
        };
        assert_eq!(rx.try_recv().unwrap(), want);
        c.expire();
        c.deliver(1, &Ok(v(b"late")));
        assert!(rx.try_recv().is_err(), "a second reply was sent");
    }

    #[test]
    fn a_refused_input_is_an_error_element_and_the_rest_still_arrive() {
        let shape = Shape::Vectors {
            order: vec![0, 1],
            json: false,
        };
        let (c, rx) = open(vec![None, None], shape);
        let bad = FillError {
            msg: Arc::from("ERR too long"),
            per_input: true,
        };
        c.deliver(0, &Err(bad));
        assert!(rx.try_recv().is_err());
        c.deliver(1, &Ok(v(b"good")));
        let want = Reply::Items {
            items: vec![
                Item::Error(Arc::from("ERR too long")),
                Item::Value(v(b"good")),
            ],
            json: false,
        };
        assert_eq!(rx.try_recv().unwrap(), want);
    }

    #[test]
    fn a_whole_failure_answers_at_once() {
        let (c, rx) = open(
            vec![None, None],
            Shape::Vectors {
                order: vec![0, 1],
                json: true,
            },
        );
        c.deliver(
            0,
            &Err(FillError::whole("ERR upstream returned HTTP 503: x")),
        );
        assert_eq!(
            rx.try_recv().unwrap(),
            Reply::Error("ERR upstream returned HTTP 503: x".into())
        );
        c.deliver(1, &Ok(v(b"late")));
        assert!(rx.try_recv().is_err());
    }

    /// The race of issue 8 A1: the deadline and the fill's completion from
    /// two threads, many times. Exactly one reply every time.
    #[test]
    fn the_deadline_and_the_fill_race_to_exactly_one_reply() {
        for i in 0..2000 {
            let (c, rx) = open(vec![None], Shape::Single);
            let c2 = c.clone();
            let t = std::thread::spawn(move || c2.deliver(0, &Ok(v(b"value"))));
            if i % 2 == 0 {
                c.expire();
                t.join().unwrap();
            } else {
                t.join().unwrap();
                c.expire();
            }
            let first = rx.try_recv().expect("no reply at all");
            assert!(
                first == Reply::Bulk(v(b"value")) || first == Reply::Error(TIMEOUT_MSG.into()),
                "{first:?}"
            );
            assert!(rx.try_recv().is_err(), "two replies");
        }
    }
}
