//! Helpers shared by the command families: argument words, namespaces and
//! write expiry.

use std::ops::Deref;

use redis_module::{Context, RedisError, RedisResult, RedisString, RedisValue};

use crate::config::Settings;
use crate::model::errors::describe;
use crate::model::keys::{
    model_generation_field, Generations, Namespace, EMB_GENERATION_FIELD, LLM_GENERATION_FIELD,
};
use crate::model::semantic::parse_threshold;
use crate::model::ttl::{now_ms, parse_ex, JITTER_RNG};
use crate::redis::ffi::{self, error};

pub fn namespace<'a>(cfg: &'a Settings, arg: &'a RedisString) -> Result<Namespace<'a>, RedisError> {
    Namespace::new(&cfg.prefix, arg.as_slice()).map_err(|e| error(e.message()))
}

/// The namespace at its current flush generations, for commands that
/// derive entry keys; `model` is the embedding model (None for chat).
pub fn namespace_at<'a>(
    ctx: &Context,
    cfg: &'a Settings,
    arg: &'a RedisString,
    model: Option<&[u8]>,
) -> Result<Namespace<'a>, RedisError> {
    let mut ns = namespace(cfg, arg)?;
    let key = ns.generations_key();
    let model_field = model.map(model_generation_field);
    let family = match model {
        Some(_) => EMB_GENERATION_FIELD,
        None => LLM_GENERATION_FIELD,
    };
    let mut fields: Vec<&[u8]> = vec![family];
    if let Some(f) = &model_field {
        fields.push(f);
    }
    // Read through the key API, not HMGET: no command is counted, and a
    // never-flushed namespace costs one lookup.
    let Some(g) = ffi::hash_u64s(ctx, &key, &fields)? else {
        return Ok(ns);
    };
    let at = |i: usize| g.get(i).copied().flatten().unwrap_or(0);
    ns.set_generations(Generations {
        ns: at(0),
        model: if model.is_some() { at(1) } else { 0 },
    });
    Ok(ns)
}

/// EMBCACHE.FLUSH / LLMCACHE.FLUSH: bumps one generation field and
/// replies its new value. O(1) whatever the namespace holds; replicated and
/// persisted like any hash write.
pub fn bump_generation(ctx: &Context, ns: &Namespace, field: &[u8]) -> RedisResult {
    let key = ns.generations_key();
    let args: [&[u8]; 3] = [&key, field, b"1"];
    let g = ffi::call(ctx, "HINCRBY", &args, true, ffi::reply_as_i64)?;
    Ok(RedisValue::Integer(g))
}

/// Who a FETCH's upstream calls are charged to, by aicache.tenant-source:
/// the TENANT argument (`arg`), the caller's ACL user (`user`) or the
/// namespace's hash tag (`namespace`). With the last two a TENANT that
/// differs is refused, so a client cannot escape its limits by naming
/// another tenant or none.
pub fn tenant(
    ctx: &Context,
    cfg: &Settings,
    given: Option<&[u8]>,
    ns: &Namespace,
) -> Result<Option<Vec<u8>>, RedisError> {
    let derived = match &*cfg.tenant_source {
        "user" => ffi::user_name(ctx).ok_or_else(|| {
            error(
                "ERR aicache.tenant-source is user but this call has no ACL user of its own \
                 (a script or module call); run FETCH from the client",
            )
        })?,
        "namespace" => ns.tag().to_vec(),
        _ => return Ok(given.map(<[u8]>::to_vec)),
    };
    match given {
        Some(t) if t != derived.as_slice() => Err(error(format!(
            "ERR TENANT '{}' is not yours: aicache.tenant-source is {} ('{}')",
            describe(t),
            cfg.tenant_source,
            describe(&derived)
        ))),
        _ => Ok(Some(derived)),
    }
}

pub fn is_word(arg: &[u8], word: &str) -> bool {
    arg.eq_ignore_ascii_case(word.as_bytes())
}

pub fn unknown_option(arg: &[u8], expected: &str) -> RedisError {
    error(format!(
        "ERR unknown option '{}'; expected {expected}",
        describe(arg)
    ))
}

/// Parses an optional trailing `EX seconds` that starts at `args[at]`.
pub fn ex_option(args: &[RedisString], at: usize) -> Result<Option<u64>, RedisError> {
    match args.len().checked_sub(at) {
        Some(0) => Ok(None),
        Some(2) if is_word(&args[at], "EX") => {
            Ok(Some(parse_ex(args[at + 1].as_slice()).map_err(error)?))
        }
        Some(1) | Some(2) => Err(unknown_option(&args[at], "EX seconds")),
        _ => Err(RedisError::WrongArity),
    }
}

/// Absolute expiry in Unix ms for one write, or None for no expiry.
pub fn expire_at(cfg: &Settings, ex: Option<u64>) -> Option<u64> {
    let ttl = ex.unwrap_or(cfg.default_ttl_secs);
    crate::model::ttl::expire_at(now_ms(), ttl, cfg.jitter_pct, JITTER_RNG.next())
}

/// Options of EMBCACHE.FETCH and LLMCACHE.FETCH.
#[derive(Default)]
pub struct FetchOptions {
    pub timeout_ms: Option<u64>,
    pub refresh: bool,
    pub nostore: bool,
    pub dims: Option<u32>,
    pub json: bool,
    pub ex: Option<u64>,
    pub tenant: Option<Vec<u8>>,
    pub with_meta: bool,
    /// `SIMILAR [threshold]` (LLMCACHE.FETCH): `Some(None)` asks for the
    /// configured threshold.
    pub similar: Option<Option<f64>>,
}

/// Longest TIMEOUT a call may ask for: one day.
const MAX_WAIT_MS: u64 = 86_400_000;

/// A plain decimal integer, as Redis reads one: digits only (no sign, no
/// spaces), at most 20 of them.
pub fn parse_u64(arg: &[u8]) -> Option<u64> {
    if arg.is_empty() || arg.len() > 20 || !arg.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(arg).ok()?.parse().ok()
}

/// An integer argument in `min..=max`, or an error naming it and the range.
pub fn number(arg: Option<&[u8]>, what: &str, min: u64, max: u64) -> Result<u64, RedisError> {
    let bad = || error(format!("ERR {what} must be an integer from {min} to {max}"));
    let arg = arg.ok_or_else(bad)?;
    let n = parse_u64(arg).ok_or_else(bad)?;
    if n < min || n > max {
        return Err(bad());
    }
    Ok(n)
}

/// A `TENANT` value: 1 to 256 bytes.
pub fn tenant_arg(arg: Option<&[u8]>) -> Result<Vec<u8>, RedisError> {
    match arg {
        Some(t) if !t.is_empty() && t.len() <= 256 => Ok(t.to_vec()),
        _ => Err(error("ERR TENANT must be 1 to 256 bytes")),
    }
}

/// Parses `[TIMEOUT ms] [REFRESH] [NOSTORE] [EX seconds]`, plus
/// `[DIMENSIONS d] [FORMAT FP32|JSON]` when `vectors` is set.
pub fn fetch_options<A: Deref<Target = [u8]>>(
    args: &[A],
    vectors: bool,
    max_dims: usize,
) -> Result<FetchOptions, RedisError> {
    let at = |i: usize| args.get(i).map(|a| &**a);
    let mut o = FetchOptions::default();
    let expected = if vectors {
        "TIMEOUT, REFRESH, NOSTORE, EX, TENANT, DIMENSIONS, FORMAT or WITHMETA"
    } else {
        "TIMEOUT, REFRESH, NOSTORE, EX, TENANT, WITHMETA or SIMILAR"
    };
    let mut i = 0;
    while i < args.len() {
        let a: &[u8] = &args[i];
        if is_word(a, "REFRESH") {
            o.refresh = true;
        } else if is_word(a, "NOSTORE") {
            o.nostore = true;
        } else if is_word(a, "WITHMETA") {
            o.with_meta = true;
        } else if is_word(a, "TIMEOUT") {
            i += 1;
            o.timeout_ms = Some(number(at(i), "TIMEOUT", 1, MAX_WAIT_MS)?);
        } else if is_word(a, "EX") {
            i += 1;
            let v = at(i).ok_or_else(|| error("ERR EX needs a value"))?;
            o.ex = Some(parse_ex(v).map_err(error)?);
        } else if is_word(a, "TENANT") {
            i += 1;
            o.tenant = Some(tenant_arg(at(i))?);
        } else if vectors && is_word(a, "DIMENSIONS") {
            i += 1;
            o.dims = Some(number(at(i), "DIMENSIONS", 1, max_dims as u64)? as u32);
        } else if !vectors && is_word(a, "SIMILAR") {
            // The threshold is optional: option words never start with a
            // digit or a dot, numbers always do.
            let t = match at(i + 1) {
                Some(n) if n.first().is_some_and(|c| c.is_ascii_digit() || *c == b'.') => {
                    i += 1;
                    Some(parse_threshold(n).ok_or_else(|| {
                        error("ERR SIMILAR threshold must be a number from 0 to 1")
                    })?)
                }
                _ => None,
            };
            o.similar = Some(t);
        } else if vectors && is_word(a, "FORMAT") {
            i += 1;
            o.json = match at(i) {
                Some(f) if is_word(f, "JSON") => true,
                Some(f) if is_word(f, "FP32") => false,
                _ => return Err(error("ERR FORMAT must be FP32 or JSON")),
            };
        } else {
            return Err(unknown_option(a, expected));
        }
        i += 1;
    }
    Ok(o)
}

/// Rejects an argument longer than the config `limit_name` allows.
pub fn check_len(what: &str, len: usize, limit: usize, limit_name: &str) -> Result<(), RedisError> {
    if len > limit {
        return Err(error(format!(
            "ERR {what} is {len} bytes, more than {limit_name} {limit}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(words: &[&str], vectors: bool) -> Result<FetchOptions, String> {
        let args: Vec<&[u8]> = words.iter().map(|w| w.as_bytes()).collect();
        fetch_options(&args, vectors, 8192).map_err(|e| match e {
            RedisError::String(s) => s,
            other => format!("{other:?}"),
        })
    }

    #[test]
    fn it_reads_every_fetch_option_in_any_case_and_order() {
        let o = opts(
            &[
                "timeout",
                "250",
                "REFRESH",
                "nostore",
                "Ex",
                "60",
                "TENANT",
                "t1",
                "DIMENSIONS",
                "256",
                "format",
                "json",
            ],
            true,
        )
        .unwrap();
        assert_eq!(o.timeout_ms, Some(250));
        assert!(o.refresh && o.nostore && o.json);
        assert_eq!((o.ex, o.dims), (Some(60), Some(256)));
        assert_eq!(o.tenant.as_deref(), Some(&b"t1"[..]));
        let none = opts(&[], true).unwrap();
        assert!(none.timeout_ms.is_none() && !none.refresh && !none.json && none.tenant.is_none());
    }

    #[test]
    fn it_refuses_bad_options_with_a_reason() {
        let table: &[(&[&str], bool, &str)] = &[
            (
                &["TIMEOUT"],
                true,
                "TIMEOUT must be an integer from 1 to 86400000",
            ),
            (&["TIMEOUT", "0"], true, "TIMEOUT must be an integer"),
            (&["TIMEOUT", "+5"], true, "TIMEOUT must be an integer"),
            (&["TIMEOUT", "5 "], true, "TIMEOUT must be an integer"),
            (&["TIMEOUT", "86400001"], true, "TIMEOUT must be an integer"),
            (&["EX"], true, "EX needs a value"),
            (&["EX", "0"], true, "EX must be a positive integer"),
            (&["TENANT", ""], true, "TENANT must be 1 to 256 bytes"),
            (
                &["DIMENSIONS", "8193"],
                true,
                "DIMENSIONS must be an integer from 1 to 8192",
            ),
            (&["FORMAT", "XML"], true, "FORMAT must be FP32 or JSON"),
            (&["DIMENSIONS", "8"], false, "unknown option 'DIMENSIONS'"),
            (&["bogus\u{0}"], true, "unknown option 'bogus"),
        ];
        for (words, vectors, want) in table {
            let err = opts(words, *vectors).err().unwrap_or_default();
            assert!(err.contains(want), "{words:?}: {err}");
        }
    }

    #[test]
    fn similar_takes_an_optional_threshold() {
        let o = opts(&["SIMILAR", "0.8", "NOSTORE"], false).unwrap();
        assert_eq!(o.similar, Some(Some(0.8)));
        assert!(o.nostore);
        let o = opts(&["similar", "WITHMETA"], false).unwrap();
        assert_eq!(o.similar, Some(None));
        assert!(o.with_meta);
        assert_eq!(opts(&["SIMILAR"], false).unwrap().similar, Some(None));
        for bad in ["1.5", "0.9x", ".", "1e400"] {
            let err = opts(&["SIMILAR", bad], false).err().unwrap_or_default();
            assert!(err.contains("SIMILAR threshold must be"), "{bad}: {err}");
        }
        assert!(opts(&["SIMILAR"], true).is_err(), "not an EMBCACHE option");
    }

    #[test]
    fn integers_are_plain_digits() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b" 1",
            b"1.0",
            b"18446744073709551616",
            b"0x10",
        ] {
            assert_eq!(parse_u64(bad), None, "{bad:?}");
        }
    }
}
