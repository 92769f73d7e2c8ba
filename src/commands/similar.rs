//! The semantic cache's commands: LLMCACHE.SIMILAR, and the semantic parts
//! of LLMCACHE.FETCH (`SIMILAR`) and LLMCACHE.SET (`VECTOR`). Everything
//! here runs on the main thread and only reads keys; embedding, searching
//! and scoring happen on a worker (fill/semantic.rs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_module::{Context, ContextFlags, RedisError, RedisResult, RedisString, RedisValue};

use crate::commands::args::{
    is_word, namespace, namespace_at, number, tenant, tenant_arg, unknown_option,
};
use crate::commands::llmcache::request_key;
use crate::config::Settings;
use crate::fill::call::{Call, Shape};
use crate::fill::job::{Job, Task};
use crate::fill::pipeline::{self, EmbedSpec, Pending};
use crate::fill::semantic::{Replier, SemSpec};
use crate::limits::spend::{self, Bill};
use crate::model::codec::{is_fp32, parse_vector};
use crate::model::keys::{collapse_whitespace, semantic_key_for};
use crate::model::quota::estimate_tokens;
use crate::model::routes::Api;
use crate::model::semantic::{context_id, floats, prompt, usable, Sidecar, NOT_ELIGIBLE};
use crate::redis::blocked::Blocked;
use crate::redis::ffi::{self, error};

/// Most entries one LLMCACHE.SIMILAR lists.
const MAX_COUNT: u64 = 100;

/// Where a request's prompt belongs: derived once, here, for lookups and
/// for SET ... VECTOR alike, so both always name the same context.
struct Located {
    text: String,
    context: [u8; 32],
    nsid: [u8; 16],
    generation: u64,
    /// The prompt's embedding-cache key and its namespace's pin hash.
    emb_key: Vec<u8>,
    pin_key: Vec<u8>,
    sem_key: Vec<u8>,
}

/// None when the request `args[2]` has no final user text.
fn locate(
    ctx: &Context,
    cfg: &Settings,
    args: &[RedisString],
    llm_key: &[u8],
) -> Result<Option<Located>, RedisError> {
    let Some(p) = prompt(args[2].as_slice()).map_err(error)? else {
        return Ok(None);
    };
    let text = match cfg.normalize_whitespace {
        // Only ASCII whitespace changes, so the text stays UTF-8.
        true => String::from_utf8_lossy(&collapse_whitespace(p.text.as_bytes())).into_owned(),
        false => p.text,
    };
    let model = cfg.semantic_model.as_bytes();
    let ns = namespace_at(ctx, cfg, &args[1], None)?;
    let generation = ns.generations().ns;
    let emb_ns = namespace_at(ctx, cfg, &args[1], Some(model))?;
    let e = emb_ns.generations();
    let sem_key = semantic_key_for(&cfg.prefix, llm_key)
        .ok_or_else(|| error("ERR internal error: no sidecar key for this entry"))?;
    Ok(Some(Located {
        context: context_id(ns.name(), generation, [e.ns, e.model], model, &p.context),
        nsid: ns.id(),
        generation,
        emb_key: emb_ns.embedding_key(model, text.as_bytes()),
        pin_key: emb_ns.dims_key(),
        sem_key,
        text,
    }))
}

/// What the request `args[2]` of namespace `args[1]` compares by, or None
/// when it is exact-only (no final user text, or a text longer than
/// aicache.max-text-bytes). Reads the prompt's cached embedding, if any.
pub fn spec(
    ctx: &Context,
    cfg: &Settings,
    args: &[RedisString],
    llm_key: &[u8],
    threshold: f64,
    count: usize,
    nostore: bool,
) -> Result<Option<SemSpec>, RedisError> {
    let Some(at) = locate(ctx, cfg, args, llm_key)? else {
        return Ok(None);
    };
    if at.text.len() > cfg.max_text_bytes {
        return Ok(None);
    }
    let model: &str = &cfg.semantic_model;
    // A key of another type there is no cached vector, not an error.
    let vector = ffi::with_string(ctx, &at.emb_key, |v| v.filter(|v| is_fp32(v)).map(floats))
        .ok()
        .flatten()
        .filter(|v| usable(v));
    let embed = EmbedSpec {
        plan: match vector {
            None => crate::fill::endpoints::table().plan(Api::Embeddings, model),
            Some(_) => Vec::new(),
        },
        model: model.to_string(),
        dims: None,
        pin_key: Some(at.pin_key),
        fixed_dims: cfg.fixed_dims,
        known_dims: crate::model::pins::known_dims(&cfg.model_dims, model),
        max_dims: cfg.max_dims,
        base64: cfg.base64,
    };
    Ok(Some(SemSpec {
        threshold,
        count,
        context: at.context,
        nsid: at.nsid,
        generation: at.generation,
        text: at.text,
        answer_key: llm_key.to_vec(),
        sem_key: at.sem_key,
        vector,
        embed: Arc::new(embed),
        emb_key: at.emb_key,
        // NOSTORE keeps nothing, the prompt's embedding included.
        emb_expiry: (!nostore).then(|| cfg.expiry(None)),
        may_fill: ctx.get_flags().contains(ContextFlags::MASTER),
    }))
}

/// LLMCACHE.SET ... VECTOR: the sidecar to store next to the answer, from
/// the caller's own FP32 prompt vector (made with aicache.semantic-model).
pub fn sidecar_for_set(
    ctx: &Context,
    cfg: &Settings,
    args: &[RedisString],
    llm_key: &[u8],
    vector: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), RedisError> {
    let bytes = parse_vector(vector, cfg.max_dims).map_err(|e| error(e.message()))?;
    if !usable(&floats(&bytes)) {
        return Err(error("ERR VECTOR must not be all zeros"));
    }
    let model: &str = &cfg.semantic_model;
    if let Some(want) = crate::model::pins::known_dims(&cfg.model_dims, model) {
        if want != bytes.len() / 4 {
            return Err(error(format!(
                "ERR VECTOR has {} dimensions but aicache.semantic-model {model} makes {want}",
                bytes.len() / 4
            )));
        }
    }
    let at = locate(ctx, cfg, args, llm_key)?
        .ok_or_else(|| error(format!("ERR VECTOR given but the {NOT_ELIGIBLE}")))?;
    let side = Sidecar {
        context: at.context,
        nsid: at.nsid,
        generation: at.generation,
        answer_key: llm_key,
        text: at.text.as_bytes(),
        vector: &bytes,
    };
    Ok((at.sem_key, side.encode()))
}

/// LLMCACHE.SIMILAR ns request [COUNT k] [TIMEOUT ms] [TENANT t]
/// The k stored entries of the request's context nearest to it, as
/// `[score, key, prompt]`, best first. Fills nothing; embeds the prompt
/// (through the embedding cache) when it is not cached yet.
pub fn similar(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() < 3 {
        return Err(RedisError::WrongArity);
    }
    let cfg = Settings::snapshot();
    let (mut count, mut timeout, mut given_tenant) = (10u64, cfg.wait_timeout_ms, None);
    let mut i = 3;
    while i < args.len() {
        let a = args[i].as_slice();
        let next = args.get(i + 1).map(|v| v.as_slice());
        if is_word(a, "COUNT") {
            count = number(next, "COUNT", 1, MAX_COUNT)?;
        } else if is_word(a, "TIMEOUT") {
            timeout = number(next, "TIMEOUT", 1, 86_400_000)?;
        } else if is_word(a, "TENANT") {
            given_tenant = Some(tenant_arg(next)?);
        } else {
            return Err(unknown_option(a, "COUNT, TIMEOUT or TENANT"));
        }
        i += 2;
    }
    let (key, _) = request_key(ctx, &cfg, &args)?;
    let spec = spec(ctx, &cfg, &args, &key, 0.0, count as usize, false)?
        .ok_or_else(|| error(format!("ERR {NOT_ELIGIBLE}")))?;
    let flags = ctx.get_flags();
    if flags.intersects(ContextFlags::MULTI | ContextFlags::LUA | ContextFlags::DENY_BLOCKING) {
        return Err(error(
            "ERR LLMCACHE.SIMILAR blocks and this context cannot block (MULTI, script or module call)",
        ));
    }
    // Only an embedding call costs anything, so only it is charged.
    let charge = match spec.vector {
        Some(_) => None,
        None => {
            let ns = namespace(&cfg, &args[1])?;
            let who = tenant(ctx, &cfg, given_tenant.as_deref(), &ns)?;
            let tokens = estimate_tokens(spec.text.len());
            Some(spend::admit(who.as_deref(), 1, tokens).map_err(error)?)
        }
    };
    let call = Call::new(vec![None], Shape::Single);
    let weak = Arc::downgrade(&call);
    let on_deadline = Box::new(move || {
        if let Some(c) = weak.upgrade() {
            c.expire();
        }
    });
    let Some(blocked) = Blocked::new(ctx, timeout, on_deadline) else {
        Bill::new(charge).refund();
        return Err(error("ERR this client cannot be blocked"));
    };
    call.attach(Box::new(blocked));
    let job = Job {
        pending: Pending::new(Vec::new(), Vec::new(), 0),
        bill: Bill::new(charge),
        db: ffi::selected_db(ctx),
        expiry: None,
        deadline: Instant::now() + Duration::from_millis(cfg.lease_ms),
        queued: Instant::now(),
        task: Task::Similar {
            spec: Arc::new(spec),
            reply: Replier::new(call),
        },
    };
    // A refused job answers the client with the reason itself.
    let _ = pipeline::submit_one(job);
    Ok(RedisValue::NoReply)
}
