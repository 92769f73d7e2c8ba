//! DNS for the upstream, bounded by the attempt's deadline.
//!
//! getaddrinfo cannot be cancelled, and ureq's own bounded lookup runs on a
//! detached thread that could still be inside module code after MODULE
//! UNLOAD unmaps it. So lookups run on two resolver threads that the pool
//! owns and joins; a worker waits for the answer no longer than its
//! attempt allows, and a full lookup queue fails fast.

use std::net::IpAddr;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::time::Duration as TimeoutDuration;
use ureq::unversioned::transport::NextTimeout;

const THREADS: usize = 2;
const QUEUE: usize = 32;

type Answer = Result<ResolvedSocketAddrs, ureq::Error>;

struct Lookup {
    uri: Uri,
    config: Config,
    timeout: NextTimeout,
    /// When the worker stops waiting: a lookup still queued then is
    /// dropped unrun, so a backlog cannot hold up unload.
    deadline: Option<Instant>,
    reply: Sender<Answer>,
}

pub struct BoundedResolver {
    tx: Sender<Lookup>,
}

impl std::fmt::Debug for BoundedResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoundedResolver")
    }
}

/// Lookups with no deadline of their own: the caller bounds the wait.
fn unbounded(timeout: NextTimeout) -> NextTimeout {
    NextTimeout {
        after: TimeoutDuration::NotHappening,
        ..timeout
    }
}

/// The resolver and its threads (joined by the pool at unload, once every
/// agent holding the resolver is gone).
pub fn start() -> Result<(BoundedResolver, Vec<JoinHandle<()>>), String> {
    let (tx, rx) = bounded::<Lookup>(QUEUE);
    let mut threads = Vec::with_capacity(THREADS);
    for i in 0..THREADS {
        let rx: Receiver<Lookup> = rx.clone();
        let t = std::thread::Builder::new()
            .name(format!("aicache-dns{i}"))
            .spawn(move || {
                let resolver = DefaultResolver::default();
                while let Ok(l) = rx.recv() {
                    if l.deadline.is_some_and(|d| Instant::now() >= d) {
                        continue;
                    }
                    let _ = l.reply.send(resolver.resolve(&l.uri, &l.config, l.timeout));
                }
            });
        match t {
            Ok(t) => threads.push(t),
            Err(e) => {
                drop(tx);
                for t in threads {
                    let _ = t.join();
                }
                return Err(format!("cannot start resolver thread: {e}"));
            }
        }
    }
    Ok((BoundedResolver { tx }, threads))
}

impl Resolver for BoundedResolver {
    fn resolve(&self, uri: &Uri, config: &Config, timeout: NextTimeout) -> Answer {
        let literal = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .is_some_and(|h| h.parse::<IpAddr>().is_ok());
        if literal {
            return DefaultResolver::default().resolve(uri, config, unbounded(timeout));
        }
        let (reply, answer) = bounded(1);
        let deadline = Instant::now().checked_add(*timeout.after);
        let lookup = Lookup {
            uri: uri.clone(),
            config: config.clone(),
            timeout: unbounded(timeout),
            deadline,
            reply,
        };
        self.tx
            .try_send(lookup)
            .map_err(|_| ureq::Error::Io(std::io::Error::other("DNS lookups are backed up")))?;
        match answer.recv_timeout(*timeout.after) {
            Ok(a) => a,
            Err(RecvTimeoutError::Timeout) => Err(ureq::Error::Timeout(timeout.reason)),
            // Dropped at its deadline (a timeout), or the pool stopped.
            Err(RecvTimeoutError::Disconnected)
                if deadline.is_some_and(|d| Instant::now() >= d) =>
            {
                Err(ureq::Error::Timeout(timeout.reason))
            }
            Err(RecvTimeoutError::Disconnected) => Err(ureq::Error::Io(std::io::Error::other(
                "DNS resolver stopped",
            ))),
        }
    }
}
