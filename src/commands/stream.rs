//! LLMCACHE.STREAM and LLMCACHE.READ: a streamed answer through a Redis
//! Stream that every identical caller reads from its first entry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redis_module::{Context, ContextFlags, RedisError, RedisResult, RedisString, RedisValue};

use crate::commands::args::{is_word, namespace, number, parse_u64, unknown_option};
use crate::commands::llmcache::{chat_work, count_llm_hit, FetchCall};
use crate::config::Settings;
use crate::fill::pipeline;
use crate::fill::streams::{self, StreamOpts, Streaming};
use crate::model::canon::{tokens_in_answer, upstream_stream_body};
use crate::model::frames::{entry_id, Frame};
use crate::model::keys::generation;
use crate::model::ttl::now_ms;
use crate::redis::ffi::{self, error};
use crate::redis::keywait;
use crate::stats::STATS;

static GENERATIONS: AtomicU64 = AtomicU64::new(0);

/// The key naming a storing generation's Stream while it runs.
fn pointer_key(entry_key: &[u8]) -> Vec<u8> {
    let mut p = entry_key.to_vec();
    p.extend_from_slice(b":stream");
    p
}

fn reply_pair(ctx: &Context, kind: &[u8], value: &[u8]) -> RedisValue {
    ffi::reply_array(ctx, 2);
    ffi::reply_bytes(ctx, kind);
    ffi::reply_bytes(ctx, value)
}

/// LLMCACHE.STREAM ns request [TIMEOUT ms] [REFRESH] [NOSTORE] [EX s] [TENANT id]
/// Never blocks. Replies `["hit", response]` or `["stream", stream-key]`.
pub fn stream(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    let FetchCall {
        cfg,
        opts,
        key,
        nostore,
    } = FetchCall::parse(ctx, &args)?;
    if opts.with_meta {
        return Err(error(
            "ERR WITHMETA is a FETCH option; STREAM already replies hit or stream",
        ));
    }
    if opts.similar.is_some() {
        return Err(error(
            "ERR SIMILAR is a FETCH option; STREAM serves exact entries only",
        ));
    }
    if !opts.refresh {
        let hit = ffi::with_string(ctx, &key, |v| {
            v.map(|v| (reply_pair(ctx, b"hit", v), tokens_in_answer(v)))
        })?;
        if let Some((sent, tokens)) = hit {
            count_llm_hit(tokens, args[2].len());
            return Ok(sent);
        }
    }
    let body = upstream_stream_body(args[2].as_slice()).map_err(error)?;
    let flags = ctx.get_flags();
    if !flags.contains(ContextFlags::MASTER) {
        // A replica serves a generation its master is running.
        let running = ffi::with_string(ctx, &pointer_key(&key), |v| v.map(<[u8]>::to_vec))?;
        return match running {
            Some(s) => Ok(reply_pair(ctx, b"stream", &s)),
            None => Err(error(
                "ERR cache miss on a replica; streams start on the master",
            )),
        };
    }
    if flags.intersects(ContextFlags::MULTI | ContextFlags::LUA) {
        return Err(error(
            "ERR cache miss, and a stream cannot start inside MULTI or a script; run STREAM on its own",
        ));
    }
    STATS.misses.incr();
    STATS.llm_misses.incr();
    let ns = namespace(&cfg, &args[1])?;
    let name = ns.stream_key(&generation(
        now_ms(),
        GENERATIONS.fetch_add(1, Ordering::Relaxed),
    ));
    let sopts = StreamOpts {
        name: Arc::from(name),
        pointer: (!nostore).then(|| Arc::from(pointer_key(&key))),
        linger_ms: cfg.stream_linger_ms,
        max_entries: cfg.stream_max_entries,
        deadline_ms: opts.timeout_ms.unwrap_or(u64::MAX),
    };
    let work = chat_work(ctx, &cfg, &args, &opts, key, nostore, body)?;
    match streams::start(work, sopts, now_ms()).map_err(error)? {
        Streaming::Joined(s) => Ok(reply_pair(ctx, b"stream", &s)),
        Streaming::Started(s, job) => {
            pipeline::submit_one(*job).map_err(error)?;
            Ok(reply_pair(ctx, b"stream", &s))
        }
    }
}

/// A READ position: `0`, `<ms>` or `<ms>-<seq>`.
fn last_id(arg: &[u8]) -> Result<String, RedisError> {
    let ok = match arg.iter().position(|&b| b == b'-') {
        Some(i) => parse_u64(&arg[..i]).is_some() && parse_u64(&arg[i + 1..]).is_some(),
        None => parse_u64(arg).is_some(),
    };
    if !ok {
        return Err(error(
            "ERR last-id must be 0 or a stream entry id such as 1700000000000-3",
        ));
    }
    Ok(String::from_utf8_lossy(arg).into_owned())
}

/// LLMCACHE.READ ns stream-key last-id [COUNT n] [BLOCK ms]
/// Entries after last-id as XRANGE returns them; nil when there are none
/// (after BLOCK ms, when given).
pub fn read(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() < 4 {
        return Err(RedisError::WrongArity);
    }
    let cfg = Settings::snapshot();
    let ns = namespace(&cfg, &args[1])?;
    let stream = args[2].as_slice();
    if !ns.owns_stream(stream) {
        return Err(error(
            "ERR stream-key is not a stream of this namespace (use the key LLMCACHE.STREAM replied)",
        ));
    }
    let start = format!("({}", last_id(args[3].as_slice())?);
    let (mut count, mut block) = (None, None);
    let mut i = 4;
    while i < args.len() {
        let a = args[i].as_slice();
        let v = args.get(i + 1).map(|v| v.as_slice());
        if is_word(a, "COUNT") {
            count = Some(number(v, "COUNT", 1, 1_000_000)?.to_string());
        } else if is_word(a, "BLOCK") {
            block = Some(number(v, "BLOCK", 0, crate::config::LEASE_MS.max as u64)?);
        } else {
            return Err(unknown_option(a, "COUNT or BLOCK"));
        }
        i += 2;
    }
    let mut xrange: Vec<Vec<u8>> = vec![stream.to_vec(), start.into_bytes(), b"+".to_vec()];
    if let Some(c) = count {
        xrange.extend([b"COUNT".to_vec(), c.into_bytes()]);
    }
    let xargs: Vec<&[u8]> = xrange.iter().map(Vec::as_slice).collect();
    if ffi::reply_if_entries(ctx, "XRANGE", &xargs)? > 0 {
        return Ok(RedisValue::NoReply);
    }
    let flags = ctx.get_flags();
    // Writes paused (CLIENT PAUSE, failover) or a replica: only wait.
    let writable = matches!(ffi::write_state(ctx), ffi::WriteState::Writable);
    if writable && !streams::is_live(stream) {
        // No fill here writes it: it has ended, or its fill is gone.
        match ffi::last_stream_entry(ctx, stream)? {
            None => {
                return Err(error(
                    "ERR no such stream: it ended more than aicache.stream-linger-ms ago, or never started",
                ))
            }
            Some((_, true)) => return Ok(ffi::reply_null(ctx)),
            Some((id, false)) => {
                end_orphan(ctx, stream, &id, cfg.stream_linger_ms);
                if ffi::reply_if_entries(ctx, "XRANGE", &xargs)? > 0 {
                    return Ok(RedisValue::NoReply);
                }
                return Ok(ffi::reply_null(ctx));
            }
        }
    }
    let can_block =
        !flags.intersects(ContextFlags::MULTI | ContextFlags::LUA | ContextFlags::DENY_BLOCKING);
    let Some(ms) = block.filter(|_| can_block) else {
        return Ok(ffi::reply_null(ctx));
    };
    // BLOCK 0 waits as long as a fill may run, never forever.
    let ms = if ms == 0 { cfg.lease_ms } else { ms };
    let serve = Box::new(move |c: &Context| {
        let a: Vec<&[u8]> = xrange.iter().map(Vec::as_slice).collect();
        ffi::reply_if_entries(c, "XRANGE", &a).is_ok_and(|n| n > 0)
    });
    if !keywait::block_on_key(ctx, stream, ms, serve) {
        return Err(error("ERR this client cannot be blocked"));
    }
    STATS.stream_reads_blocked.incr();
    Ok(RedisValue::NoReply)
}

/// A Stream left without an end (its fill died with the module, the
/// server or a failover): end it with an error, so its readers stop.
fn end_orphan(ctx: &Context, stream: &[u8], last: &str, linger_ms: u64) {
    let Some((ms, seq)) = last.split_once('-') else {
        return;
    };
    let (Some(ms), Some(seq)) = (parse_u64(ms.as_bytes()), parse_u64(seq.as_bytes())) else {
        return;
    };
    let id = entry_id(ms, seq.saturating_add(1));
    let end = Frame::Error(
        "ERR the stream's fill is gone (module reloaded, server restarted or failed over)".into(),
    );
    let fields = end.fields();
    let mut a: Vec<&[u8]> = vec![stream, id.as_bytes()];
    a.extend(fields.iter().map(Vec::as_slice));
    let _ = ffi::call(ctx, "XADD", &a, true, |_| ());
    let at = (now_ms() + linger_ms).to_string();
    let _ = ffi::call(ctx, "PEXPIREAT", &[stream, at.as_bytes()], true, |_| ());
}
