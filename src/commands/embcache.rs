//! EMBCACHE.* command handlers: parse, validate everything, then touch keys.
//! A command either fails before its first write or writes everything.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use redis_module::{Context, RedisError, RedisResult, RedisString, RedisValue};

use crate::commands::args::{
    bump_generation, check_len, ex_option, expire_at, fetch_options, is_word, namespace,
    namespace_at, parse_u64, tenant, unknown_option,
};
use crate::config::Settings;
use crate::fill::call::Shape;
use crate::fill::pins;
use crate::fill::pipeline::{self, EmbedSpec, Entry, Kind, Work};
use crate::fill::refresh;
use crate::model::codec::{fp32_to_json, is_fp32, parse_vector};
use crate::model::keys::{
    collapse_whitespace, model_generation_field, Namespace, EMB_GENERATION_FIELD, MAX_MODEL_BYTES,
};
use crate::model::quota::estimate_tokens;
use crate::model::routes::Api;
use crate::redis::ffi::{self, error};
use crate::stats::STATS;

#[derive(Clone, Copy)]
enum Format {
    Fp32,
    Json,
}

fn model_arg(arg: &RedisString) -> Result<&[u8], RedisError> {
    let m = arg.as_slice();
    if m.is_empty() || m.len() > MAX_MODEL_BYTES {
        return Err(error(format!(
            "ERR model must be 1 to {MAX_MODEL_BYTES} bytes"
        )));
    }
    Ok(m)
}

fn text_arg<'a>(cfg: &Settings, arg: &'a RedisString) -> Result<Cow<'a, [u8]>, RedisError> {
    let t = arg.as_slice();
    check_len("text", t.len(), cfg.max_text_bytes, "max-text-bytes")?;
    let t = if cfg.normalize_whitespace {
        Cow::Owned(collapse_whitespace(t))
    } else {
        Cow::Borrowed(t)
    };
    if t.is_empty() {
        return Err(error("ERR text must not be empty"));
    }
    Ok(t)
}

fn vector_arg(cfg: &Settings, arg: &RedisString) -> Result<Vec<u8>, RedisError> {
    parse_vector(arg.as_slice(), cfg.max_dims).map_err(|e| error(e.message()))
}

/// Writes validated vectors (all of one dimension) once they fit the
/// namespace's pin (writing the pin if it is new).
fn store(
    ctx: &Context,
    cfg: &Settings,
    ns: &Namespace,
    model: &[u8],
    entries: &[(Vec<u8>, Vec<u8>)],
    ex: Option<u64>,
) -> RedisResult {
    let dims = entries.first().map_or(0, |(_, v)| v.len() / 4);
    if cfg.fixed_dims != 0 && dims != cfg.fixed_dims {
        return Err(error(format!(
            "ERR dimension mismatch: vector has {dims} dimensions, fixed-dims is {}",
            cfg.fixed_dims
        )));
    }
    let db = ffi::selected_db(ctx);
    pins::check(ctx, db, &ns.dims_key(), model, dims, true).map_err(error)?;
    for (key, vector) in entries {
        ffi::set_string(ctx, key, vector, expire_at(cfg, ex))?;
    }
    Ok(RedisValue::SimpleStringStatic("OK"))
}

/// EMBCACHE.DIMS ns model [RESET]
/// The namespace's pinned vector size for the model (nil when none), or
/// with RESET removes the pin (1 when there was one).
pub fn dims(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    let reset = match args.len() {
        3 => false,
        4 if is_word(&args[3], "RESET") => true,
        4 => return Err(unknown_option(&args[3], "RESET")),
        _ => return Err(RedisError::WrongArity),
    };
    let cfg = Settings::snapshot();
    let ns = namespace(&cfg, &args[1])?;
    let model = model_arg(&args[2])?;
    let key = ns.dims_key();
    if reset {
        let db = ffi::selected_db(ctx);
        return Ok(RedisValue::Integer(
            pins::reset(ctx, db, &key, model).map_err(error)?,
        ));
    }
    match pins::read(ctx, &key, model).map_err(error)? {
        Some(d) => Ok(RedisValue::Integer(d as i64)),
        None => Ok(RedisValue::Null),
    }
}

/// EMBCACHE.SET ns model text vector [EX seconds]
pub fn set(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() < 5 {
        return Err(RedisError::WrongArity);
    }
    let ex = ex_option(&args, 5)?;
    let cfg = Settings::snapshot();
    let model = model_arg(&args[2])?;
    let ns = namespace_at(ctx, &cfg, &args[1], Some(model))?;
    let text = text_arg(&cfg, &args[3])?;
    let vector = vector_arg(&cfg, &args[4])?;
    let entries = [(ns.embedding_key(model, &text), vector)];
    store(ctx, &cfg, &ns, model, &entries, ex)
}

/// EMBCACHE.MSET ns model text vector [text vector ...]
pub fn mset(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() < 5 || (args.len() - 3) % 2 != 0 {
        return Err(RedisError::WrongArity);
    }
    let cfg = Settings::snapshot();
    let model = model_arg(&args[2])?;
    let ns = namespace_at(ctx, &cfg, &args[1], Some(model))?;
    let mut entries: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity((args.len() - 3) / 2);
    for (i, pair) in args[3..].chunks_exact(2).enumerate() {
        let text = text_arg(&cfg, &pair[0]).map_err(|e| at_pair(e, i))?;
        let vector = vector_arg(&cfg, &pair[1]).map_err(|e| at_pair(e, i))?;
        if let Some((_, first)) = entries.first() {
            let (want, got) = (first.len() / 4, vector.len() / 4);
            if want != got {
                return Err(error(format!(
                    "ERR dimension mismatch: pair {i} has {got} dimensions, pair 0 has {want}"
                )));
            }
        }
        entries.push((ns.embedding_key(model, &text), vector));
    }
    store(ctx, &cfg, &ns, model, &entries, None)
}

fn at_pair(e: RedisError, i: usize) -> RedisError {
    match e {
        RedisError::String(s) => error(format!("{s} (pair {i})")),
        other => other,
    }
}

/// EMBCACHE.GET ns model text [FORMAT FP32|JSON]
pub fn get(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    let format = match args.len() {
        4 => Format::Fp32,
        6 if is_word(&args[4], "FORMAT") => {
            if is_word(&args[5], "FP32") {
                Format::Fp32
            } else if is_word(&args[5], "JSON") {
                Format::Json
            } else {
                return Err(unknown_option(&args[5], "FORMAT FP32 or FORMAT JSON"));
            }
        }
        5 | 6 => return Err(unknown_option(&args[4], "FORMAT FP32|JSON")),
        _ => return Err(RedisError::WrongArity),
    };
    let cfg = Settings::snapshot();
    let model = model_arg(&args[2])?;
    let ns = namespace_at(ctx, &cfg, &args[1], Some(model))?;
    let text = text_arg(&cfg, &args[3])?;
    let key = ns.embedding_key(model, &text);
    ffi::with_string(ctx, &key, |value| match (value, format) {
        (None, _) => Ok(RedisValue::Null),
        (Some(v), _) if !is_fp32(v) => Err(error("ERR entry is not an FP32 vector")),
        (Some(v), Format::Fp32) => Ok(ffi::reply_bytes(ctx, v)),
        (Some(v), Format::Json) => Ok(RedisValue::StringBuffer(fp32_to_json(v))),
    })?
}

/// Keys for `text [text ...]` starting at `args[3]`, validated before any read.
fn text_keys(
    ctx: &Context,
    cfg: &Settings,
    args: &[RedisString],
) -> Result<Vec<Vec<u8>>, RedisError> {
    let model = model_arg(&args[2])?;
    let ns = namespace_at(ctx, cfg, &args[1], Some(model))?;
    args[3..]
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let text = text_arg(cfg, a).map_err(|e| at_text(e, i))?;
            Ok(ns.embedding_key(model, &text))
        })
        .collect()
}

fn at_text(e: RedisError, i: usize) -> RedisError {
    match e {
        RedisError::String(s) => error(format!("{s} (text {i})")),
        other => other,
    }
}

/// EMBCACHE.MGET ns model text [text ...]
/// Like MGET, a key of another type reads as nil.
pub fn mget(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() < 4 {
        return Err(RedisError::WrongArity);
    }
    let cfg = Settings::snapshot();
    let keys = text_keys(ctx, &cfg, &args)?;
    ffi::reply_array(ctx, keys.len());
    for key in &keys {
        let sent = ffi::with_string(ctx, key, |value| match value {
            Some(v) if is_fp32(v) => ffi::reply_bytes(ctx, v),
            _ => ffi::reply_null(ctx),
        });
        if sent.is_err() {
            ffi::reply_null(ctx);
        }
    }
    Ok(RedisValue::NoReply)
}

/// EMBCACHE.DEL ns model text [text ...]
pub fn del(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() < 4 {
        return Err(RedisError::WrongArity);
    }
    let cfg = Settings::snapshot();
    let keys = text_keys(ctx, &cfg, &args)?;
    let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let n = ffi::call(ctx, "DEL", &refs, true, ffi::reply_as_i64)?;
    Ok(RedisValue::Integer(n))
}

/// EMBCACHE.KEY ns model text
pub fn key(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 4 {
        return Err(RedisError::WrongArity);
    }
    let cfg = Settings::snapshot();
    let mut keys = text_keys(ctx, &cfg, &args)?;
    Ok(RedisValue::StringBuffer(keys.pop().unwrap_or_default()))
}

/// EMBCACHE.FLUSH ns [MODEL m]
/// Every embedding of the namespace (or of one model) becomes unreachable
/// at once; the entries expire in their own time. Replies the new generation.
pub fn flush(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    let model = match args.len() {
        2 => None,
        4 if is_word(&args[2], "MODEL") => Some(model_arg(&args[3])?),
        3 if is_word(&args[2], "MODEL") => return Err(error("ERR MODEL needs a model name")),
        3 | 4 => return Err(unknown_option(&args[2], "MODEL m")),
        _ => return Err(RedisError::WrongArity),
    };
    let cfg = Settings::snapshot();
    let ns = namespace(&cfg, &args[1])?;
    match model {
        Some(m) => bump_generation(ctx, &ns, &model_generation_field(m)),
        None => bump_generation(ctx, &ns, EMB_GENERATION_FIELD),
    }
}

/// EMBCACHE.FETCH ns model numtexts text [text ...] [TIMEOUT ms] [REFRESH]
///     [NOSTORE] [DIMENSIONS d] [FORMAT FP32|JSON] [EX seconds]
/// The count makes the options unambiguous whatever the texts say.
pub fn fetch(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() < 5 {
        return Err(RedisError::WrongArity);
    }
    let n = parse_u64(args[3].as_slice())
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n >= 1)
        .ok_or_else(|| error("ERR numtexts must be a positive integer"))?;
    if n > args.len() - 4 {
        return Err(error(format!(
            "ERR numtexts is {n} but only {} texts follow",
            args.len() - 4
        )));
    }
    let cfg = Settings::snapshot();
    let opts = fetch_options(&args[4 + n..], true, cfg.max_dims)?;
    if let (Some(d), f) = (opts.dims, cfg.fixed_dims) {
        if f != 0 && d as usize != f {
            return Err(error(format!(
                "ERR DIMENSIONS {d} conflicts with aicache.fixed-dims {f}"
            )));
        }
    }
    let model = model_arg(&args[2])?;
    let ns = namespace_at(ctx, &cfg, &args[1], Some(model))?;
    let model_str =
        std::str::from_utf8(model).map_err(|_| error("ERR model must be valid UTF-8"))?;
    // Duplicate texts share one slot, one fill and one upstream input.
    let mut slot_of: HashMap<Vec<u8>, usize> = HashMap::with_capacity(n);
    let mut entries: Vec<Entry> = Vec::new();
    let mut texts: Vec<Cow<[u8]>> = Vec::new(); // the text of each entry
    let mut order = Vec::with_capacity(n);
    for (i, a) in args[4..4 + n].iter().enumerate() {
        let t = text_arg(&cfg, a).map_err(|e| at_text(e, i))?;
        if std::str::from_utf8(&t).is_err() {
            return Err(error(format!(
                "ERR text {i} is not valid UTF-8 and cannot be sent upstream"
            )));
        }
        let key = match opts.dims {
            Some(d) => ns.embedding_key_dims(model, d, &t),
            None => ns.embedding_key(model, &t),
        };
        let next = entries.len();
        let slot = *slot_of.entry(key.clone()).or_insert_with(|| {
            entries.push(Entry {
                key,
                input: String::new(),
                tokens: estimate_tokens(t.len()),
                hit: None,
            });
            next
        });
        if slot == next {
            texts.push(t);
        }
        order.push(slot);
    }
    if !opts.refresh {
        for e in entries.iter_mut() {
            e.hit = ffi::with_string(ctx, &e.key, |v| v.filter(|v| is_fp32(v)).map(Arc::from))?;
        }
    }
    let expiry = (!opts.nostore).then(|| cfg.expiry(opts.ex));
    // Hits late in their TTL are refreshed in the background.
    let stale: Vec<usize> = match expiry {
        Some(x) if !opts.refresh => (0..entries.len())
            .filter(|&i| entries[i].hit.is_some() && refresh::due(ctx, &entries[i].key, x.ttl_secs))
            .collect(),
        _ => Vec::new(),
    };
    // Only misses go upstream, so only they need their text as a String.
    let mut is_stale = vec![false; entries.len()];
    for &i in &stale {
        is_stale[i] = true;
    }
    for ((e, t), stale) in entries.iter_mut().zip(&texts).zip(is_stale) {
        if e.hit.is_none() || stale {
            e.input = String::from_utf8_lossy(t).into_owned();
        }
    }
    // Only a call that misses is charged, so only it needs a tenant (and a
    // script serving hits needs none).
    let tenant = match entries.iter().any(|e| e.hit.is_none()) {
        true => tenant(ctx, &cfg, opts.tenant.as_deref(), &ns)?,
        false => None,
    };
    let (hit_inputs, saved) = order
        .iter()
        .filter(|&&s| entries[s].hit.is_some())
        .fold((0u64, 0u64), |(n, t), &s| (n + 1, t + entries[s].tokens));
    // An all-hit call with nothing to refresh goes nowhere: no route lookup.
    let fills = entries.iter().any(|e| e.hit.is_none()) || !stale.is_empty();
    let spec = EmbedSpec {
        plan: match fills {
            true => crate::fill::endpoints::table().plan(Api::Embeddings, model_str),
            false => Vec::new(),
        },
        model: model_str.to_string(),
        dims: opts.dims,
        pin_key: opts.dims.is_none().then(|| ns.dims_key()),
        fixed_dims: cfg.fixed_dims,
        known_dims: crate::model::pins::known_dims(&cfg.model_dims, model_str),
        max_dims: cfg.max_dims,
        base64: cfg.base64,
    };
    let work = Work {
        db: ffi::selected_db(ctx),
        kind: Kind::Embed(Arc::new(spec)),
        entries,
        shape: Shape::Vectors {
            order,
            json: opts.json,
        },
        expiry,
        tenant,
        timeout_ms: opts.timeout_ms.unwrap_or(cfg.wait_timeout_ms),
        batch_size: cfg.batch_size,
        batch_max_tokens: cfg.batch_max_tokens,
        lease_ms: cfg.lease_ms,
        max_fills: cfg.max_fills,
        fail_memory_ms: cfg.fail_memory_ms,
        with_meta: opts.with_meta,
    };
    let refreshing = (!stale.is_empty()).then(|| Work {
        entries: stale
            .iter()
            .map(|&i| Entry {
                key: work.entries[i].key.clone(),
                input: work.entries[i].input.clone(),
                tokens: work.entries[i].tokens,
                hit: None,
            })
            .collect(),
        shape: Shape::Vectors {
            order: (0..stale.len()).collect(),
            json: false,
        },
        ..work.background()
    });
    let replied = pipeline::fetch(ctx, work)?;
    if let Some(w) = refreshing {
        refresh::start(ctx, w);
    }
    // Counted once the call is taken: a call refused as a whole (MULTI,
    // replica, spend limits) served nothing and saved nothing.
    let misses = n as u64 - hit_inputs;
    STATS.hits.add(hit_inputs);
    STATS.misses.add(misses);
    STATS.emb_hits.add(hit_inputs);
    STATS.emb_misses.add(misses);
    STATS.tokens_saved.add(saved);
    Ok(replied)
}
