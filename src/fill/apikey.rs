//! The API key: where it comes from, and making sure it never comes back.
//!
//! `aicache.api-key-file` (a regular file, re-read when it changes, so a
//! rotated key needs no config change) wins over the environment variable
//! named by `aicache.api-key-env`. A configured file that cannot be used
//! fails every fill with an error that names the source; nothing is sent
//! without the credentials the admin asked for. The key itself is never
//! logged, returned or echoed.

use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::config::{API_KEY_ENV, API_KEY_FILE};

struct Cached {
    path: String,
    stamp: (SystemTime, u64, u64),
    key: Result<String, String>,
}

use crate::model::routes::KeySource;

/// Keys read from files, by path: the global file and each route's.
static FILE_KEYS: Mutex<Vec<Cached>> = Mutex::new(Vec::new());
/// More paths than routes can name means a path was swapped many times.
const MAX_CACHED_FILES: usize = 16;

/// The key to send: Ok(None) when no key is configured at all (a local
/// upstream that needs none), Err when the configured file is unusable.
pub fn current() -> Result<Option<String>, String> {
    let path = API_KEY_FILE.get_string();
    if path.is_empty() {
        let name = API_KEY_ENV.get_string();
        return Ok(std::env::var(name).ok().and_then(|k| clean(&k)));
    }
    from_file(&path, "aicache.api-key-file").map(Some)
}

/// The key of a route's source. A route that names a source and cannot
/// read it sends nothing: it fails with an error naming the source.
pub fn for_source(source: &KeySource, route: &str) -> Result<Option<String>, String> {
    match source {
        KeySource::Global => current(),
        KeySource::Nothing => Ok(None),
        KeySource::Env(name) => match std::env::var(name).ok().and_then(|k| clean(&k)) {
            Some(k) => Ok(Some(k)),
            None => Err(format!(
                "ERR route {route}: the key variable {name} is not set or not printable; no request was sent"
            )),
        },
        KeySource::File(path) => from_file(path, &format!("route {route} key-file")).map(Some),
    }
}

fn from_file(path: &str, what: &str) -> Result<String, String> {
    let unusable =
        |why: &str| format!("ERR cannot use the API key from {what}: {why}; no request was sent");
    let meta = std::fs::metadata(path).map_err(|e| unusable(&format!("{}", e.kind())))?;
    let stamp = (
        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        meta.len(),
        meta.ino(),
    );
    let mut cache = FILE_KEYS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = cache.iter().find(|c| c.path == path && c.stamp == stamp) {
        return c.key.clone();
    }
    let key = crate::config::check_key_meta(&meta)
        .map_err(|e| unusable(e.trim_start_matches("api-key-file ")))
        .and_then(|()| {
            let text =
                std::fs::read_to_string(path).map_err(|e| unusable(&format!("{}", e.kind())))?;
            clean(&text).ok_or_else(|| unusable("it holds no printable key"))
        });
    cache.retain(|c| c.path != path);
    if cache.len() >= MAX_CACHED_FILES {
        cache.remove(0);
    }
    cache.push(Cached {
        path: path.to_string(),
        stamp,
        key: key.clone(),
    });
    key
}

fn clean(k: &str) -> Option<String> {
    let k = k.trim();
    (!k.is_empty() && k.bytes().all(|b| (0x21..0x7f).contains(&b))).then(|| k.to_string())
}

/// Where the key comes from, for the log (never the value).
pub fn describe_source() -> String {
    let path = API_KEY_FILE.get_string();
    if !path.is_empty() {
        return match current() {
            Ok(_) => format!("aicache: API key from file {path}"),
            Err(e) => format!("aicache: {}", e.trim_start_matches("ERR ")),
        };
    }
    let name = API_KEY_ENV.get_string();
    match current() {
        Ok(Some(_)) => format!("aicache: API key from environment variable {name}"),
        _ => format!("aicache: no API key ({name} is not set); requests go without credentials"),
    }
}

/// True when `text` contains the key in any form an upstream may echo it
/// in: as is, without its `sk-`-style prefix, in another case, URL-encoded
/// or JSON-escaped.
pub fn echoes(text: &str, key: &str) -> bool {
    let folded = fold(text);
    let key = key.to_ascii_lowercase();
    let bare = key.split_once('-').map_or(key.as_str(), |(_, rest)| rest);
    [key.as_str(), bare]
        .iter()
        .any(|k| k.len() >= 8 && folded.contains(*k))
}

/// Lower-case with %XX and \uXXXX escapes decoded.
fn fold(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    let hex = |s: &[u8]| {
        std::str::from_utf8(s)
            .ok()
            .and_then(|s| u32::from_str_radix(s, 16).ok())
    };
    while i < b.len() {
        let decoded = match b[i] {
            b'%' if i + 3 <= b.len() => hex(&b[i + 1..i + 3]).map(|c| (c, 3)),
            b'\\' if i + 6 <= b.len() && b[i + 1] == b'u' => hex(&b[i + 2..i + 6]).map(|c| (c, 6)),
            _ => None,
        };
        match decoded.and_then(|(c, n)| char::from_u32(c).map(|c| (c, n))) {
            Some((c, n)) => {
                out.push(c.to_ascii_lowercase());
                i += n;
            }
            None => {
                out.push((b[i] as char).to_ascii_lowercase());
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-Test0123456789abcdef";

    #[test]
    fn it_finds_every_echo_of_the_key() {
        for t in [
            "Incorrect API key provided: sk-Test0123456789abcdef.",
            "key Test0123456789abcdef is invalid",
            "KEY SK-TEST0123456789ABCDEF",
            "key=sk%2DTest0123456789abcdef",
            "key=%73%6b%2d%54est0123456789abcdef",
            "\\u0073\\u006b-Test0123456789abcdef",
        ] {
            assert!(echoes(t, KEY), "{t}");
        }
        assert!(!echoes("Rate limit reached for requests", KEY));
        assert!(
            !echoes("sk-Test01", KEY),
            "a prefix of the key is not the key"
        );
    }

    #[test]
    fn it_keeps_only_printable_keys() {
        assert_eq!(clean("  sk-abc\n").as_deref(), Some("sk-abc"));
        assert_eq!(clean("\n"), None);
        assert_eq!(clean("sk abc"), None);
    }
}

/// A warning when a key is configured and an upstream URL is plain
/// `http://` to a host other than this machine: the key would cross the
/// network in clear text.
pub fn cleartext_warning() -> Option<String> {
    let key_set = matches!(current(), Ok(Some(_)) | Err(_));
    let urls = [
        crate::config::UPSTREAM_URL.get_string(),
        crate::config::EMBEDDINGS_URL.get_string(),
        crate::config::CHAT_URL.get_string(),
    ];
    let exposed = urls.iter().find(|u| is_remote_http(u))?;
    key_set.then(|| {
        format!("aicache: WARNING the API key is sent in clear text to {exposed}; use https://")
    })
}

/// One log line per configured route: where its key comes from (never
/// the key), with a warning when it would go to a remote `http://` URL.
pub fn route_lines() -> Vec<String> {
    let table = crate::fill::endpoints::table();
    let mut out = Vec::new();
    for r in table
        .routes()
        .filter(|r| r.name != crate::model::routes::DEFAULT_ROUTE)
    {
        let (source, keyed) = match &r.key {
            KeySource::Env(n) => (format!("environment variable {n}"), true),
            KeySource::File(p) => (format!("file {p}"), true),
            _ => ("none".to_string(), false),
        };
        out.push(format!(
            "aicache: route {}: API key source {source}",
            r.name
        ));
        let urls = [Some(&r.url), r.embeddings_url.as_ref(), r.chat_url.as_ref()];
        if let Some(u) = urls
            .into_iter()
            .flatten()
            .find(|u| keyed && is_remote_http(u))
        {
            out.push(format!(
                "aicache: WARNING route {} sends its API key in clear text to {u}; use https://",
                r.name
            ));
        }
    }
    out
}

fn is_remote_http(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !loopback
}

#[cfg(test)]
mod url_tests {
    use super::is_remote_http;

    #[test]
    fn only_plain_http_off_this_machine_is_remote() {
        assert!(is_remote_http("http://api.example.com/v1"));
        assert!(is_remote_http("http://10.0.0.5:8080/v1"));
        assert!(!is_remote_http("http://127.0.0.1:8089/v1"));
        assert!(!is_remote_http("http://localhost/v1"));
        assert!(!is_remote_http("http://[::1]:80/v1"));
        assert!(!is_remote_http("https://api.openai.com/v1"));
    }
}
