//! LLMCACHE.* command handlers. A request is keyed by its canonical form
//! (see canon.rs); a response is stored byte for byte once validated.

use redis_module::{Context, ContextFlags, RedisError, RedisResult, RedisString, RedisValue};

use std::sync::Arc;

use crate::commands::args::{
    bump_generation, check_len, expire_at, fetch_options, is_word, namespace, namespace_at, tenant,
    unknown_option, FetchOptions,
};
use crate::commands::similar;
use crate::config::Settings;
use crate::fill::call::Shape;
use crate::fill::pipeline::{self, ChatFallback, ChatSpec, Entry, Kind, Work};
use crate::fill::refresh;
use crate::model::canon::{canonical_request, tokens_in_answer, upstream_body, validate_response};
use crate::model::keys::{semantic_key_for, LLM_GENERATION_FIELD};
use crate::model::quota::estimate_tokens;
use crate::model::reply::{Meta, Reply, Status};
use crate::model::routes::Api;
use crate::model::ttl::parse_ex;
use crate::redis::ffi::{self, error};
use crate::stats::STATS;

/// Validates `args[1]` (ns) and `args[2]` (request) and returns the entry key
/// plus the request's effective temperature.
pub fn request_key(
    ctx: &Context,
    cfg: &Settings,
    args: &[RedisString],
) -> Result<(Vec<u8>, f64), RedisError> {
    let ns = namespace_at(ctx, cfg, &args[1], None)?;
    let body = args[2].as_slice();
    check_len(
        "request",
        body.len(),
        cfg.max_request_bytes,
        "max-request-bytes",
    )?;
    let canon = canonical_request(body).map_err(error)?;
    Ok((ns.llm_key(&canon.bytes), canon.temperature))
}

/// LLMCACHE.SET ns request response [EX seconds] [VECTOR fp32]
/// VECTOR also stores the prompt's vector (made with
/// aicache.semantic-model), so FETCH ... SIMILAR can find the entry.
pub fn set(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() < 4 {
        return Err(RedisError::WrongArity);
    }
    let (mut ex, mut vector) = (None, None);
    let mut i = 4;
    while i < args.len() {
        let (a, next) = (args[i].as_slice(), args.get(i + 1));
        if is_word(a, "VECTOR") {
            vector = Some(next.ok_or_else(|| error("ERR VECTOR needs a value"))?);
        } else if is_word(a, "EX") {
            let v = next.ok_or_else(|| error("ERR EX needs a value"))?;
            ex = Some(parse_ex(v.as_slice()).map_err(error)?);
        } else {
            return Err(unknown_option(a, "EX or VECTOR"));
        }
        i += 2;
    }
    let cfg = Settings::snapshot();
    let (key, temperature) = request_key(ctx, &cfg, &args)?;
    if temperature > 0.0 && !cfg.cache_sampled {
        return Err(error(
            "ERR request has temperature > 0 and aicache.cache-sampled is no; not cached",
        ));
    }
    let response = args[3].as_slice();
    check_len(
        "response",
        response.len(),
        cfg.max_response_bytes,
        "max-response-bytes",
    )?;
    validate_response(response).map_err(error)?;
    let side = match vector {
        Some(v) => Some(similar::sidecar_for_set(
            ctx,
            &cfg,
            &args,
            &key,
            v.as_slice(),
        )?),
        None => None,
    };
    // One expiry for both: the answer and its vector live and die together.
    let at = expire_at(&cfg, ex);
    ffi::set_string(ctx, &key, response, at)?;
    if let Some((sem_key, bytes)) = side {
        ffi::set_string(ctx, &sem_key, &bytes, at)?;
    }
    Ok(RedisValue::SimpleStringStatic("OK"))
}

/// LLMCACHE.GET ns request
pub fn get(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 3 {
        return Err(RedisError::WrongArity);
    }
    let cfg = Settings::snapshot();
    let (key, _) = request_key(ctx, &cfg, &args)?;
    ffi::with_string(ctx, &key, |value| match value {
        Some(v) => ffi::reply_bytes(ctx, v),
        None => RedisValue::Null,
    })
}

/// LLMCACHE.DEL ns request
pub fn del(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 3 {
        return Err(RedisError::WrongArity);
    }
    let cfg = Settings::snapshot();
    let (key, _) = request_key(ctx, &cfg, &args)?;
    let n = ffi::call(ctx, "DEL", &[&key], true, ffi::reply_as_i64)?;
    if let Some(sem) = semantic_key_for(&cfg.prefix, &key) {
        ffi::call(ctx, "DEL", &[&sem], true, |_| ())?;
    }
    Ok(RedisValue::Integer(n))
}

/// LLMCACHE.KEY ns request
pub fn key(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 3 {
        return Err(RedisError::WrongArity);
    }
    let cfg = Settings::snapshot();
    let (key, _) = request_key(ctx, &cfg, &args)?;
    Ok(RedisValue::StringBuffer(key))
}

/// LLMCACHE.FLUSH ns
/// Every chat entry of the namespace becomes unreachable at once.
pub fn flush(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 2 {
        return Err(RedisError::WrongArity);
    }
    let cfg = Settings::snapshot();
    let ns = namespace(&cfg, &args[1])?;
    let bumped = bump_generation(ctx, &ns, LLM_GENERATION_FIELD)?;
    // The old generation's contexts can no longer match; drop them now
    // rather than as their entries expire.
    if let RedisValue::Integer(g) = bumped {
        crate::fill::semindex::note_flush_namespace(ffi::selected_db(ctx), ns.id(), g as u64);
    }
    Ok(bumped)
}

/// LLMCACHE.FETCH ns request [TIMEOUT ms] [REFRESH] [NOSTORE] [EX seconds]
/// [WITHMETA] [TENANT t] [SIMILAR [threshold]]
pub fn fetch(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    let FetchCall {
        cfg,
        opts,
        key,
        nostore,
    } = FetchCall::parse(ctx, &args)?;
    if !opts.refresh && opts.with_meta {
        let hit = ffi::with_string(ctx, &key, |v| {
            v.map(|v| (Arc::from(v), tokens_in_answer(v)))
        })?;
        if let Some((value, tokens)) = hit {
            count_llm_hit(tokens, args[2].len());
            let meta = Meta {
                status: Status::Hit,
                key: Arc::from(&key[..]),
                stored: true,
            };
            let reply = Reply::WithMeta {
                inner: Box::new(Reply::Bulk(value)),
                meta: vec![meta],
                single: true,
            };
            let sent = ffi::send_now(ctx, reply);
            refresh_ahead(ctx, &cfg, &args, &opts, key, nostore);
            return Ok(sent);
        }
    } else if !opts.refresh {
        // Straight from the key's buffer, as LLMCACHE.GET does.
        let hit = ffi::with_string(ctx, &key, |v| {
            v.map(|v| (ffi::reply_bytes(ctx, v), tokens_in_answer(v)))
        })?;
        if let Some((sent, tokens)) = hit {
            count_llm_hit(tokens, args[2].len());
            refresh_ahead(ctx, &cfg, &args, &opts, key, nostore);
            return Ok(sent);
        }
    }
    let body = upstream_body(args[2].as_slice()).map_err(error)?;
    let semantic = match opts.similar {
        // REFRESH skips every cached answer, similar ones too, but the
        // new entry is still indexed.
        // A replica cannot keep what REFRESH fetches: the plain refusal.
        Some(_) if opts.refresh && !ctx.get_flags().contains(ContextFlags::MASTER) => None,
        Some(t) => {
            let t = if opts.refresh {
                f64::INFINITY
            } else {
                t.unwrap_or(cfg.semantic_threshold)
            };
            let s = similar::spec(ctx, &cfg, &args, &key, t, 1, nostore)?;
            if s.is_none() {
                STATS.semantic_skipped.incr();
            }
            s
        }
        None => None,
    };
    let mut work = chat_work(ctx, &cfg, &args, &opts, key, nostore, body)?;
    if let (Some(s), Kind::Chat(spec)) = (semantic, &mut work.kind) {
        if let Some(spec) = Arc::get_mut(spec) {
            spec.semantic = Some(Arc::new(s));
        }
    }
    let replied = pipeline::fetch(ctx, work)?;
    STATS.misses.incr();
    STATS.llm_misses.incr();
    Ok(replied)
}

/// After a hit: refreshes the entry in the background when it is late in
/// its TTL. Any error here only means no refresh.
fn refresh_ahead(
    ctx: &Context,
    cfg: &Settings,
    args: &[RedisString],
    opts: &FetchOptions,
    key: Vec<u8>,
    nostore: bool,
) {
    if nostore || !refresh::due(ctx, &key, cfg.expiry(opts.ex).ttl_secs) {
        return;
    }
    let Ok(body) = upstream_body(args[2].as_slice()) else {
        return;
    };
    let quiet = FetchOptions {
        ex: opts.ex,
        timeout_ms: opts.timeout_ms,
        ..FetchOptions::default()
    };
    if let Ok(work) = chat_work(ctx, cfg, args, &quiet, key, nostore, body) {
        refresh::start(ctx, work);
    }
}

/// A chat hit saves the tokens the stored answer reports, or an estimate
/// from the request's size when it reports none.
pub fn count_llm_hit(answer_tokens: Option<u64>, request_bytes: usize) {
    STATS.hits.incr();
    STATS.llm_hits.incr();
    let saved = answer_tokens.unwrap_or_else(|| estimate_tokens(request_bytes));
    STATS.tokens_saved.add(saved);
}

/// What FETCH and STREAM share: settings, options, entry key, and whether
/// the answer is kept.
pub struct FetchCall {
    pub cfg: Settings,
    pub opts: FetchOptions,
    pub key: Vec<u8>,
    pub nostore: bool,
}

impl FetchCall {
    /// Parses `ns request [options]`.
    pub fn parse(ctx: &Context, args: &[RedisString]) -> Result<FetchCall, RedisError> {
        if args.len() < 3 {
            return Err(RedisError::WrongArity);
        }
        let cfg = Settings::snapshot();
        let opts = fetch_options(&args[3..], false, 0)?;
        let (key, temperature) = request_key(ctx, &cfg, args)?;
        // A sampled answer is still fetched for the caller, just not kept.
        let nostore = opts.nostore || (temperature > 0.0 && !cfg.cache_sampled);
        Ok(FetchCall {
            cfg,
            opts,
            key,
            nostore,
        })
    }
}

/// A chat fill of `key` with the request `body` as it goes upstream.
pub fn chat_work(
    ctx: &Context,
    cfg: &Settings,
    args: &[RedisString],
    opts: &FetchOptions,
    key: Vec<u8>,
    nostore: bool,
    body: Vec<u8>,
) -> Result<Work, RedisError> {
    let ns = namespace(cfg, &args[1])?;
    let tenant = tenant(ctx, cfg, opts.tenant.as_deref(), &ns)?;
    let tokens = estimate_tokens(body.len()).saturating_add(max_output_tokens(&body));
    let table = crate::fill::endpoints::table();
    let model = request_model(args[2].as_slice());
    let fallback = match table.fallback_model(&model) {
        Some(m) => Some(fallback_request(ctx, cfg, args, &m, &table)?),
        None => None,
    };
    let spec = ChatSpec {
        plan: table.plan(Api::Chat, &model),
        body,
        max_bytes: cfg.max_response_bytes,
        fallback,
        semantic: None,
    };
    Ok(Work {
        db: ffi::selected_db(ctx),
        kind: Kind::Chat(Arc::new(spec)),
        entries: vec![Entry {
            key,
            input: String::new(),
            tokens,
            hit: None,
        }],
        shape: Shape::Single,
        expiry: (!nostore).then(|| cfg.expiry(opts.ex)),
        tenant,
        timeout_ms: opts.timeout_ms.unwrap_or(cfg.wait_timeout_ms),
        batch_size: 1,
        batch_max_tokens: u64::MAX,
        lease_ms: cfg.lease_ms,
        max_fills: cfg.max_fills,
        fail_memory_ms: cfg.fail_memory_ms,
        with_meta: opts.with_meta,
    })
}

/// The request's `model` ("" when absent: the default route serves it).
fn request_model(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("model")?.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The same request for the fallback `model`: its body, and the key its
/// answer is stored under (the key that request would have on its own).
fn fallback_request(
    ctx: &Context,
    cfg: &Settings,
    args: &[RedisString],
    model: &str,
    table: &crate::fill::endpoints::Table,
) -> Result<ChatFallback, RedisError> {
    let mut req: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(args[2].as_slice())
            .map_err(|_| error("ERR request is not a JSON object"))?;
    req.insert("model".into(), serde_json::Value::String(model.into()));
    let raw = serde_json::to_vec(&req).map_err(|_| error("ERR request cannot be serialised"))?;
    let ns = namespace_at(ctx, cfg, &args[1], None)?;
    let canon = canonical_request(&raw).map_err(error)?;
    Ok(ChatFallback {
        model: model.into(),
        body: upstream_body(&raw).map_err(error)?,
        key: ns.llm_key(&canon.bytes),
        plan: table.plan(Api::Chat, model),
    })
}

/// The request's cap on output tokens, counted in the estimate (the prompt
/// alone would under-charge long answers). Bounded like every limit.
fn max_output_tokens(body: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let n = v
                .get("max_completion_tokens")
                .or_else(|| v.get("max_tokens"))?;
            // 1e30 is no u64, and must not estimate as zero.
            n.as_u64()
                .or_else(|| n.as_f64().map(|f| f.clamp(0.0, 9e15) as u64))
        })
        .unwrap_or(0)
        .min(1 << 53)
}
