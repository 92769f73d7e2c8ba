//! The route table's grammar and logic, Redis-free: one route per config
//! (`aicache.route-1` .. `aicache.route-8`), each a `;`-separated list of
//! `field=value` pairs; which route serves a model; the URL of each API
//! under each auth style; the failover chain a route names.
//!
//! ```text
//! name=azure;models=text-embedding-3-small,gpt-4o*;url=https://x.openai.azure.com;
//! auth=azure;api-version=2024-06-01;key-env=AZURE_OPENAI_API_KEY;fallback=openai
//! ```

/// How a route authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// `api-key: <key>`, `?api-version=`, `/openai/deployments/<d>/` paths.
    Azure,
    /// Nothing (a local server).
    None,
}

/// Where a route's key comes from. The value never enters the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The legacy `aicache.api-key-file` / `aicache.api-key-env` pair: only
    /// the default route uses it, so a self-hosted route never receives the
    /// OpenAI key by accident.
    Global,
    Env(String),
    File(String),
    Nothing,
}

/// Which API a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Embeddings,
    Chat,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    pub models: Vec<Pattern>,
    pub url: String,
    pub embeddings_url: Option<String>,
    pub chat_url: Option<String>,
    pub auth: Auth,
    pub api_version: Option<String>,
    /// Azure deployment names by model; the model's own name otherwise.
    pub deployments: Vec<(String, String)>,
    pub key: KeySource,
    /// Per-attempt and connect timeouts; None: the global configs.
    pub timeout_ms: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    /// Requests in flight to this endpoint at once; 0: no cap.
    pub max_concurrency: usize,
    /// Routes tried in order once this one's retries are spent.
    pub fallback: Vec<String>,
    /// Chat only: the model asked instead when every endpoint is unavailable.
    pub fallback_model: Option<String>,
}

pub const DEFAULT_ROUTE: &str = "default";
pub const MAX_ROUTES: usize = 8;
const MAX_FALLBACKS: usize = 8;

impl Route {
    /// The default route, from the legacy upstream configs.
    pub fn legacy(url: &str, embeddings_url: &str, chat_url: &str) -> Route {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Route {
            name: DEFAULT_ROUTE.into(),
            models: Vec::new(),
            url: url.into(),
            embeddings_url: opt(embeddings_url),
            chat_url: opt(chat_url),
            auth: Auth::Bearer,
            api_version: None,
            deployments: Vec::new(),
            key: KeySource::Global,
            timeout_ms: None,
            connect_timeout_ms: None,
            max_concurrency: 0,
            fallback: Vec::new(),
            fallback_model: None,
        }
    }

    /// How well this route's patterns match `model`: exact beats any
    /// prefix, a longer prefix beats a shorter one. None: no match.
    pub fn score(&self, model: &str) -> Option<usize> {
        self.models
            .iter()
            .filter_map(|p| match p {
                Pattern::Exact(m) if m == model => Some(usize::MAX),
                Pattern::Prefix(p) if model.starts_with(p.as_str()) => Some(p.len()),
                _ => None,
            })
            .max()
    }

    /// The URL requests for `api` and `model` go to.
    pub fn url_for(&self, api: Api, model: &str) -> String {
        let explicit = match api {
            Api::Embeddings => &self.embeddings_url,
            Api::Chat => &self.chat_url,
        };
        if let Some(u) = explicit {
            return u.clone();
        }
        let base = self.url.trim_end_matches('/');
        let path = match api {
            Api::Embeddings => "embeddings",
            Api::Chat => "chat/completions",
        };
        match self.auth {
            Auth::Azure => {
                let dep = self
                    .deployments
                    .iter()
                    .find(|(m, _)| m == model)
                    .map_or(model, |(_, d)| d.as_str());
                format!(
                    "{base}/openai/deployments/{}/{path}?api-version={}",
                    url_escape(dep),
                    self.api_version.as_deref().unwrap_or("")
                )
            }
            _ => format!("{base}/{path}"),
        }
    }
}

/// Percent-encodes everything but unreserved characters: a model name is
/// user input and must not add path segments or a query.
fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// INFO fields spell a name's `-` as `_`: with no `_` allowed, two names
/// never share fields.
fn name_ok(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn model_ok(s: &str) -> bool {
    (1..=256).contains(&s.len()) && s.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b',')
}

/// Checks applied to URLs and key sources, injected so this stays pure.
pub struct Checks {
    pub url: fn(&str) -> Result<(), String>,
    pub env: fn(&str) -> Result<(), String>,
    pub file: fn(&str) -> Result<(), String>,
}

/// Parses one route config; Ok(None) for an empty (unused) slot.
pub fn parse(text: &str, checks: &Checks) -> Result<Option<Route>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    let mut r = Route::legacy("", "", "");
    r.name = String::new();
    r.key = KeySource::Nothing;
    let mut auth = None;
    let mut seen: Vec<&str> = Vec::new();
    for field in text.split(';').filter(|f| !f.is_empty()) {
        let (k, v) = field
            .split_once('=')
            .ok_or_else(|| format!("route field '{field}' is not name=value"))?;
        if seen.contains(&k) {
            return Err(format!("route field '{k}' is given twice"));
        }
        seen.push(k);
        let num = |max: u64| {
            v.parse::<u64>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| format!("route {k} must be an integer from 1 to {max}"))
        };
        match k {
            "name" if name_ok(v) => r.name = v.into(),
            "name" => return Err("route name must be 1-32 of a-z 0-9 -".into()),
            "models" => r.models = patterns(v)?,
            "url" => {
                (checks.url)(v)?;
                r.url = v.into();
            }
            "embeddings-url" => {
                (checks.url)(v)?;
                r.embeddings_url = Some(v.into());
            }
            "chat-url" => {
                (checks.url)(v)?;
                r.chat_url = Some(v.into());
            }
            "auth" => {
                auth = Some(match v {
                    "bearer" => Auth::Bearer,
                    "azure" => Auth::Azure,
                    "none" => Auth::None,
                    _ => return Err("route auth must be bearer, azure or none".into()),
                })
            }
            "api-version"
                if !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
            {
                r.api_version = Some(v.into())
            }
            "api-version" => return Err("route api-version must be letters, digits and -".into()),
            "deployments" => r.deployments = deployments(v)?,
            "key-env" => {
                (checks.env)(v).map_err(|e| e.replace("api-key-env", "route key-env"))?;
                r.key = KeySource::Env(v.into());
            }
            "key-file" => {
                (checks.file)(v).map_err(|e| e.replace("api-key-file", "route key-file"))?;
                r.key = KeySource::File(v.into());
            }
            "timeout-ms" => r.timeout_ms = Some(num(3_600_000)?),
            "connect-timeout-ms" => r.connect_timeout_ms = Some(num(600_000)?),
            "max-concurrency" => r.max_concurrency = num(4096)? as usize,
            "fallback" => {
                r.fallback = v.split(',').map(str::to_string).collect();
                if r.fallback.len() > MAX_FALLBACKS || !r.fallback.iter().all(|n| name_ok(n)) {
                    return Err(format!(
                        "route fallback must be up to {MAX_FALLBACKS} route names, comma-separated"
                    ));
                }
            }
            "fallback-model" if model_ok(v) => r.fallback_model = Some(v.into()),
            "fallback-model" => return Err("route fallback-model is not a model name".into()),
            _ => return Err(format!("unknown route field '{k}'")),
        }
    }
    if r.name.is_empty() {
        return Err("route needs name=".into());
    }
    if r.name == DEFAULT_ROUTE {
        return Err("route name 'default' is the legacy upstream; pick another".into());
    }
    if r.fallback.contains(&r.name) {
        return Err("route cannot fall back to itself".into());
    }
    if r.url.is_empty() && (r.embeddings_url.is_none() || r.chat_url.is_none()) {
        return Err("route needs url= (or both embeddings-url= and chat-url=)".into());
    }
    r.auth = auth.ok_or("route needs auth=bearer, azure or none")?;
    match (&r.auth, &r.key) {
        (Auth::None, KeySource::Nothing) => {}
        (Auth::None, _) => return Err("route auth=none takes no key-env or key-file".into()),
        (_, KeySource::Nothing) => {
            return Err("route auth=bearer or azure needs key-env= or key-file=".into())
        }
        _ => {}
    }
    if r.auth == Auth::Azure && r.api_version.is_none() {
        return Err("route auth=azure needs api-version=".into());
    }
    Ok(Some(r))
}

fn patterns(v: &str) -> Result<Vec<Pattern>, String> {
    v.split(',')
        .map(|m| match m.strip_suffix('*') {
            Some(p) if p.is_empty() || model_ok(p) => Ok(Pattern::Prefix(p.into())),
            None if model_ok(m) && !m.contains('*') => Ok(Pattern::Exact(m.into())),
            _ => Err(format!(
                "route models: '{m}' is not a model name or prefix*"
            )),
        })
        .collect()
}

fn deployments(v: &str) -> Result<Vec<(String, String)>, String> {
    v.split(',')
        .map(|pair| match pair.split_once(':') {
            Some((m, d))
                if model_ok(m)
                    && (1..=64).contains(&d.len())
                    && d.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
            {
                Ok((m.to_string(), d.to_string()))
            }
            _ => Err(format!(
                "route deployments: '{pair}' is not model:deployment"
            )),
        })
        .collect()
}

/// The index of the route that serves `model`: the best score, the first
/// on a tie; None sends it to the default route.
pub fn pick<'a>(routes: impl IntoIterator<Item = &'a Route>, model: &str) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (i, r) in routes.into_iter().enumerate() {
        if let Some(s) = r.score(model) {
            if best.map_or(true, |(b, _)| s > b) {
                best = Some((s, i));
            }
        }
    }
    best.map(|(_, i)| i)
}

/// Indexes into `all` of route `first` and the fallbacks it names, in
/// order, each once; names of absent routes are skipped.
pub fn chain(all: &[&Route], first: usize) -> Vec<usize> {
    let mut out = vec![first];
    for name in &all[first].fallback {
        if let Some(i) = all.iter().position(|r| &r.name == name) {
            if !out.contains(&i) {
                out.push(i);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(_: &str) -> Result<(), String> {
        Ok(())
    }

    const C: Checks = Checks {
        url: ok,
        env: ok,
        file: ok,
    };

    fn route(text: &str) -> Route {
        parse(text, &C).unwrap().unwrap()
    }

    #[test]
    fn it_parses_every_field() {
        let r = route(
            "name=az;models=text-embedding-3-small,gpt-4o*;url=https://x.example/;auth=azure;\
             api-version=2024-06-01;key-env=AZ_KEY;timeout-ms=900;connect-timeout-ms=50;\
             max-concurrency=4;fallback=oa,local;fallback-model=gpt-4o-mini;deployments=gpt-4o:Prod4o",
        );
        assert_eq!(r.auth, Auth::Azure);
        assert_eq!(r.key, KeySource::Env("AZ_KEY".into()));
        assert_eq!(r.timeout_ms, Some(900));
        assert_eq!(r.max_concurrency, 4);
        assert_eq!(r.fallback, vec!["oa", "local"]);
        assert_eq!(
            r.url_for(Api::Chat, "gpt-4o"),
            "https://x.example/openai/deployments/Prod4o/chat/completions?api-version=2024-06-01"
        );
        assert_eq!(
            r.url_for(Api::Embeddings, "a/../b?c"),
            "https://x.example/openai/deployments/a%2F..%2Fb%3Fc/embeddings?api-version=2024-06-01"
        );
        assert_eq!(parse("", &C), Ok(None));
    }

    #[test]
    fn it_refuses_what_an_operator_would_get_wrong() {
        for (text, why) in [
            ("models=x;url=http://h;auth=none", "needs name="),
            ("name=A;url=http://h;auth=none", "route name must be"),
            ("name=default;url=http://h;auth=none", "legacy upstream"),
            ("name=a;auth=none", "needs url="),
            ("name=a;url=http://h", "needs auth="),
            ("name=a;url=http://h;auth=bearer", "needs key-env="),
            (
                "name=a;url=http://h;auth=none;key-env=K_KEY",
                "takes no key",
            ),
            (
                "name=a;url=http://h;auth=azure;key-env=K_KEY",
                "api-version",
            ),
            ("name=a;url=http://h;auth=none;fallback=a", "itself"),
            ("name=a;url=http://h;auth=none;name=b", "twice"),
            (
                "name=a;url=http://h;auth=none;colour=red",
                "unknown route field",
            ),
            ("name=a;url=http://h;auth=none;timeout-ms=0", "from 1 to"),
            (
                "name=a;url=http://h;auth=none;models=a*b",
                "not a model name",
            ),
            ("name=a;url=http://h;auth=none;bare", "not name=value"),
        ] {
            let e = parse(text, &C).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn exact_beats_prefix_and_longer_prefix_beats_shorter() {
        let routes = vec![
            route("name=all;models=*;url=http://a;auth=none"),
            route("name=emb;models=text-embedding-*;url=http://b;auth=none"),
            route("name=small;models=text-embedding-3-small;url=http://c;auth=none"),
            route("name=emb2;models=text-embedding-*;url=http://d;auth=none"),
        ];
        let name = |m: &str| pick(&routes, m).map(|i| routes[i].name.as_str());
        assert_eq!(name("text-embedding-3-small"), Some("small"));
        assert_eq!(
            name("text-embedding-3-large"),
            Some("emb"),
            "first slot wins a tie"
        );
        assert_eq!(name("gpt-4o"), Some("all"));
        assert_eq!(pick(&routes[1..2], "gpt-4o"), None);
    }

    #[test]
    fn a_chain_follows_fallbacks_once_each() {
        let routes = [
            route("name=a;url=http://a;auth=none;fallback=b,zz,b,c"),
            route("name=b;url=http://b;auth=none;fallback=a"),
            route("name=c;url=http://c;auth=none"),
        ];
        let refs: Vec<&Route> = routes.iter().collect();
        assert_eq!(chain(&refs, 0), vec![0, 1, 2]);
        assert_eq!(chain(&refs, 1), vec![1, 0]);
        let legacy = Route::legacy("http://h/v1/", "", "http://c/chat");
        assert_eq!(
            legacy.url_for(Api::Embeddings, "m"),
            "http://h/v1/embeddings"
        );
        assert_eq!(legacy.url_for(Api::Chat, "m"), "http://c/chat");
    }
}
