//! Entry-key derivation. Pure: no Redis types, so another language can
//! reproduce every key from the README's description and these tests.
//!
//! Layout: `<prefix><kind>:v1:{<tag>}:<hex sha256>` where `<tag>` is the
//! namespace's cluster hash tag, so every entry of a namespace lives in the
//! namespace key's slot.

use sha2::{Digest, Sha256};

/// Longest namespace accepted: the tag is repeated in every entry key.
pub const MAX_NS_BYTES: usize = 1024;
/// Longest model name accepted.
pub const MAX_MODEL_BYTES: usize = 256;

#[derive(Debug, PartialEq, Eq)]
pub enum NsError {
    Empty,
    TooLong,
    /// A `}` outside a valid hash tag would end our `{...}` wrapper early and
    /// move the entries to another slot than the namespace key.
    Untaggable,
}

impl NsError {
    pub fn message(&self) -> String {
        match self {
            NsError::Empty => "ERR namespace must not be empty".into(),
            NsError::TooLong => format!("ERR namespace longer than {MAX_NS_BYTES} bytes"),
            NsError::Untaggable => "ERR namespace contains '}' outside a {hash tag}; \
                                    use a namespace such as '{tenant}:emb'"
                .into(),
        }
    }
}

/// The part of `ns` that Redis Cluster hashes: the first non-empty `{...}`,
/// otherwise the whole name (the same rule as `CLUSTER KEYSLOT`).
pub fn hash_tag(ns: &[u8]) -> Result<&[u8], NsError> {
    if ns.is_empty() {
        return Err(NsError::Empty);
    }
    if ns.len() > MAX_NS_BYTES {
        return Err(NsError::TooLong);
    }
    if let Some(open) = ns.iter().position(|&b| b == b'{') {
        if let Some(len) = ns[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return Ok(&ns[open + 1..open + 1 + len]);
            }
        }
    }
    if ns.contains(&b'}') {
        return Err(NsError::Untaggable);
    }
    Ok(ns)
}

/// Length-prefixed concatenation: each field is its length as a u64
/// big-endian followed by its bytes. Injective: no two distinct field lists
/// encode to the same bytes.
fn digest_fields(fields: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for f in fields {
        h.update((f.len() as u64).to_be_bytes());
        h.update(f);
    }
    hex(&h.finalize())
}

/// [`digest_fields`] as raw bytes.
pub fn digest_raw(fields: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for f in fields {
        h.update((f.len() as u64).to_be_bytes());
        h.update(f);
    }
    h.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn compose(prefix: &str, kind: &str, tag: &[u8], digest: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + kind.len() + tag.len() + digest.len() + 8);
    key.extend_from_slice(prefix.as_bytes());
    key.extend_from_slice(kind.as_bytes());
    key.extend_from_slice(b":v1:{");
    key.extend_from_slice(tag);
    key.extend_from_slice(b"}:");
    key.extend_from_slice(digest.as_bytes());
    key
}

/// A namespace's flush generations (EMBCACHE.FLUSH / LLMCACHE.FLUSH):
/// bumping one moves every entry of the namespace (or of one model) to new
/// keys at once, so the old entries are unreachable and simply expire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Generations {
    pub ns: u64,
    /// The embedding model's own generation (0 for chat entries).
    pub model: u64,
}

impl Generations {
    /// The digest fields a non-zero generation appends. Generation 0 adds
    /// nothing, so keys written before the first flush keep their names.
    fn fields(&self) -> Option<[u8; 16]> {
        if *self == Generations::default() {
            return None;
        }
        let mut f = [0u8; 16];
        f[..8].copy_from_slice(&self.ns.to_be_bytes());
        f[8..].copy_from_slice(&self.model.to_be_bytes());
        Some(f)
    }
}

/// Field of the generation hash holding the generation of the
/// namespace's embeddings (EMBCACHE.FLUSH ns).
pub const EMB_GENERATION_FIELD: &[u8] = b"emb";
/// Field holding the generation of the namespace's chat entries.
pub const LLM_GENERATION_FIELD: &[u8] = b"llm";

/// Field of the generation hash holding `model`'s generation.
pub fn model_generation_field(model: &[u8]) -> Vec<u8> {
    let mut f = b"m:".to_vec();
    f.extend_from_slice(model);
    f
}

/// Derives keys for one namespace; built once per command.
pub struct Namespace<'a> {
    ns: &'a [u8],
    tag: &'a [u8],
    prefix: &'a str,
    generations: Generations,
}

impl<'a> Namespace<'a> {
    pub fn new(prefix: &'a str, ns: &'a [u8]) -> Result<Self, NsError> {
        Ok(Namespace {
            ns,
            tag: hash_tag(ns)?,
            prefix,
            generations: Generations::default(),
        })
    }

    /// Keys derived from here on belong to these flush generations.
    pub fn set_generations(&mut self, g: Generations) {
        self.generations = g;
    }

    /// Digest of `fields` plus the generation fields, when there are any.
    fn entry_digest(&self, fields: &[&[u8]]) -> String {
        match self.generations.fields() {
            None => digest_fields(fields),
            Some(g) => {
                let mut all = fields.to_vec();
                all.push(b"gen");
                all.push(&g[..8]);
                all.push(&g[8..]);
                digest_fields(&all)
            }
        }
    }

    /// Key of the hash holding the namespace's flush generations. It has
    /// no TTL: losing it would bring flushed entries back.
    pub fn generations_key(&self) -> Vec<u8> {
        let d = digest_fields(&[b"gen:v1", self.ns]);
        compose(self.prefix, "gen", self.tag, &d)
    }

    /// The flush generations keys are derived at.
    pub fn generations(&self) -> Generations {
        self.generations
    }

    /// A short id of the namespace itself (not of its generation), which
    /// semantic index entries carry so a flush can drop them.
    pub fn id(&self) -> [u8; 16] {
        let d = digest_raw(&[b"ns-id:v1", self.ns]);
        let mut id = [0u8; 16];
        id.copy_from_slice(&d[..16]);
        id
    }

    /// The name of the namespace, as given.
    pub fn name(&self) -> &[u8] {
        self.ns
    }

    /// The namespace's cluster hash tag.
    pub fn tag(&self) -> &[u8] {
        self.tag
    }

    /// Key of the embedding for (model, text). The namespace is hashed too:
    /// `{t}:a` and `{t}:b` share a tag but must not share entries.
    pub fn embedding_key(&self, model: &[u8], text: &[u8]) -> Vec<u8> {
        let d = self.entry_digest(&[b"emb:v1", self.ns, model, text]);
        compose(self.prefix, "emb", self.tag, &d)
    }

    /// Key of the embedding for (model, text) at an explicit `dimensions`
    /// (OpenAI's shortened embeddings): a different vector, so a different key.
    pub fn embedding_key_dims(&self, model: &[u8], dims: u32, text: &[u8]) -> Vec<u8> {
        let d = self.entry_digest(&[b"emb-dims:v1", self.ns, model, &dims.to_be_bytes(), text]);
        compose(self.prefix, "emb", self.tag, &d)
    }

    /// Key of the cached response for a canonical chat-completions request.
    pub fn llm_key(&self, canonical_request: &[u8]) -> Vec<u8> {
        let d = self.entry_digest(&[b"llm:v1", self.ns, canonical_request]);
        compose(self.prefix, "llm", self.tag, &d)
    }

    /// Key of the Stream of one streamed generation: `<prefix>stream:v1:
    /// {<tag>}:<ns digest>:<generation>`. The namespace digest lets READ
    /// tell which namespace a Stream belongs to; the generation (unique
    /// per fill) keeps a new generation from appending to an old Stream.
    pub fn stream_key(&self, generation: &str) -> Vec<u8> {
        let mut k = self.stream_prefix();
        k.extend_from_slice(generation.as_bytes());
        k
    }

    /// True when `key` names a Stream of this namespace.
    pub fn owns_stream(&self, key: &[u8]) -> bool {
        let prefix = self.stream_prefix();
        key.strip_prefix(prefix.as_slice())
            .is_some_and(is_generation)
    }

    fn stream_prefix(&self) -> Vec<u8> {
        let d = digest_fields(&[b"stream:v1", self.ns]);
        let mut k = compose(self.prefix, "stream", self.tag, &d[..16]);
        k.push(b':');
        k
    }

    /// Key of the hash that pins each model's vector dimension in this namespace.
    pub fn dims_key(&self) -> Vec<u8> {
        let d = digest_fields(&[b"dims:v1", self.ns]);
        compose(self.prefix, "dims", self.tag, &d)
    }
}

/// The key of the semantic sidecar of chat entry `llm_key` (its prompt
/// vector): the same name with kind `sem`, so both share a slot and a
/// deleted entry names its sidecar. None for a key that is no chat entry.
pub fn semantic_key_for(prefix: &str, llm_key: &[u8]) -> Option<Vec<u8>> {
    let rest = llm_key
        .strip_prefix(prefix.as_bytes())?
        .strip_prefix(b"llm:v1:")?;
    let mut k = Vec::with_capacity(llm_key.len());
    k.extend_from_slice(prefix.as_bytes());
    k.extend_from_slice(b"sem:v1:");
    k.extend_from_slice(rest);
    Some(k)
}

/// True when `key` names a semantic sidecar under `prefix`.
pub fn is_semantic_key(prefix: &str, key: &[u8]) -> bool {
    key.strip_prefix(prefix.as_bytes())
        .is_some_and(|r| r.starts_with(b"sem:v1:"))
}

/// A generation id: `<ms hex>-<counter hex>`, as [`generation`] makes.
fn is_generation(g: &[u8]) -> bool {
    let mut parts = g.split(|&b| b == b'-');
    let hex = |p: Option<&[u8]>| {
        p.is_some_and(|p| !p.is_empty() && p.len() <= 16 && p.iter().all(u8::is_ascii_hexdigit))
    };
    hex(parts.next()) && hex(parts.next()) && parts.next().is_none()
}

/// The generation id of a new Stream: the time and a process counter, so
/// ids differ across module reloads and within one millisecond.
pub fn generation(now_ms: u64, counter: u64) -> String {
    format!("{now_ms:x}-{counter:x}")
}

/// Collapses every run of ASCII whitespace to one space and trims both ends.
/// Byte-wise, so it is defined for invalid UTF-8 too; non-ASCII whitespace
/// (U+3000 and friends) is left alone.
pub fn collapse_whitespace(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut pending_space = false;
    for &b in text {
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
            pending_space = !out.is_empty();
        } else {
            if pending_space {
                out.push(b' ');
                pending_space = false;
            }
            out.push(b);
        }
    }
    out
}

/// A key prefix must keep the `{tag}` the first braces in every key and stay
/// readable in `SCAN` output.
pub fn validate_prefix(p: &str) -> Result<(), String> {
    if p.len() > 64 {
        return Err("key-prefix must be at most 64 bytes".into());
    }
    if let Some(c) = p
        .chars()
        .find(|c| !c.is_ascii_graphic() || *c == '{' || *c == '}')
    {
        return Err(format!(
            "key-prefix may only hold printable ASCII without braces or spaces (found 0x{:02x})",
            c as u32
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emb(ns: &[u8], model: &[u8], text: &[u8]) -> Vec<u8> {
        Namespace::new("aicache:", ns)
            .unwrap()
            .embedding_key(model, text)
    }

    #[test]
    fn generation_zero_keeps_the_old_keys_and_any_bump_moves_every_key() {
        let ns = b"tenantA";
        let at = |g: Generations| {
            let mut n = Namespace::new("aicache:", ns).unwrap();
            n.set_generations(g);
            (
                n.embedding_key(b"m", b"t"),
                n.embedding_key_dims(b"m", 256, b"t"),
                n.llm_key(b"{}"),
            )
        };
        let base = at(Generations::default());
        assert_eq!(base.0, emb(ns, b"m", b"t"));
        let ns1 = at(Generations { ns: 1, model: 0 });
        let m1 = at(Generations { ns: 0, model: 1 });
        for moved in [&ns1, &m1] {
            assert_ne!(moved.0, base.0);
            assert_ne!(moved.1, base.1);
            assert_ne!(moved.2, base.2);
        }
        assert_ne!(ns1.0, m1.0, "namespace and model generations are distinct");
        // Same tag: the moved entries stay in the namespace's slot.
        assert!(ns1.0.starts_with(b"aicache:emb:v1:{tenantA}:"));
        // The generation fields are length-prefixed like every other field.
        let mut enc = Vec::new();
        for f in [
            &b"emb:v1"[..],
            ns,
            b"m",
            b"t",
            b"gen",
            &1u64.to_be_bytes(),
            &0u64.to_be_bytes(),
        ] {
            enc.extend_from_slice(&(f.len() as u64).to_be_bytes());
            enc.extend_from_slice(f);
        }
        let expect = format!("aicache:emb:v1:{{tenantA}}:{}", hex(&Sha256::digest(&enc)));
        assert_eq!(String::from_utf8(ns1.0.clone()).unwrap(), expect);
        let g = Namespace::new("aicache:", ns).unwrap().generations_key();
        assert!(g.starts_with(b"aicache:gen:v1:{tenantA}:"));
    }

    #[test]
    fn it_matches_the_documented_known_answer() {
        // Same bytes as the README's Python recipe.
        let key = emb(b"tenantA", b"text-embedding-3-small", b"hello world");
        let mut enc = Vec::new();
        for f in [
            &b"emb:v1"[..],
            b"tenantA",
            b"text-embedding-3-small",
            b"hello world",
        ] {
            enc.extend_from_slice(&(f.len() as u64).to_be_bytes());
            enc.extend_from_slice(f);
        }
        let expect = format!("aicache:emb:v1:{{tenantA}}:{}", hex(&Sha256::digest(&enc)));
        assert_eq!(String::from_utf8(key).unwrap(), expect);
        // Pinned literal (computed by the README's Python recipe) so a silent
        // change of the encoding fails this test.
        assert_eq!(
            expect,
            "aicache:emb:v1:{tenantA}:\
             62ef2558b98e44fd3d329d210fa5605f308972843443012ec2721736c208aef3"
        );
    }

    #[test]
    fn it_never_collides_when_field_boundaries_move() {
        let cases: [(&[u8], &[u8]); 5] = [
            (b"a b", b"c"),
            (b"a", b"b c"),
            (b"ab", b""),
            (b"a", b"b"),
            (b"", b"ab"),
        ];
        let mut keys: Vec<Vec<u8>> = cases.iter().map(|(m, t)| emb(b"ns", m, t)).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), cases.len());
    }

    #[test]
    fn it_separates_namespaces_that_share_a_tag() {
        assert_ne!(emb(b"{t}:a", b"m", b"x"), emb(b"{t}:b", b"m", b"x"));
        assert_ne!(emb(b"{x}", b"m", b"x"), emb(b"x", b"m", b"x"));
    }

    #[test]
    fn it_is_binary_safe() {
        let a = emb(b"ns", b"m", b"a\0b");
        let b = emb(b"ns", b"m", b"a\0c");
        let c = emb(b"ns", b"m", &[0xff, 0xfe]);
        let d = emb(b"ns", b"m", "一二三".as_bytes());
        assert!(a != b && b != c && c != d);
    }

    #[test]
    fn it_uses_the_cluster_hash_tag_rules() {
        assert_eq!(hash_tag(b"tenantA").unwrap(), b"tenantA");
        assert_eq!(hash_tag(b"{user1000}.following").unwrap(), b"user1000");
        assert_eq!(hash_tag(b"foo{}{bar}"), Err(NsError::Untaggable));
        assert_eq!(hash_tag(b"a{b").unwrap(), b"a{b");
        assert_eq!(hash_tag(b"{a}}").unwrap(), b"a");
        assert_eq!(hash_tag(b"a}b"), Err(NsError::Untaggable));
        assert_eq!(hash_tag(b"{}x}"), Err(NsError::Untaggable));
        assert_eq!(hash_tag(b""), Err(NsError::Empty));
        assert_eq!(hash_tag(&[b'x'; MAX_NS_BYTES + 1]), Err(NsError::TooLong));
    }

    #[test]
    fn it_keeps_entries_and_dims_in_the_namespace_slot() {
        let ns = Namespace::new("p:", b"{shop}:emb").unwrap();
        let k = ns.embedding_key(b"m", b"t");
        assert!(k.starts_with(b"p:emb:v1:{shop}:"));
        assert_eq!(k.len(), "p:emb:v1:{shop}:".len() + 64);
        assert!(ns.dims_key().starts_with(b"p:dims:v1:{shop}:"));
        assert!(ns.llm_key(b"{}").starts_with(b"p:llm:v1:{shop}:"));
        assert_ne!(ns.llm_key(b"{}"), ns.llm_key(b"{ }"));
    }

    #[test]
    fn stream_keys_belong_to_exactly_one_namespace() {
        let a = Namespace::new("p:", b"{t}:a").unwrap();
        let b = Namespace::new("p:", b"{t}:b").unwrap();
        let k = a.stream_key(&generation(0x18c, 7));
        assert!(k.starts_with(b"p:stream:v1:{t}:"));
        assert!(k.ends_with(b":18c-7"));
        assert!(a.owns_stream(&k));
        assert!(!b.owns_stream(&k), "same tag, other namespace");
        assert!(!a.owns_stream(&a.llm_key(b"{}")));
        let mut bad = a.stream_key("zz-1");
        assert!(!a.owns_stream(&bad));
        bad = a.stream_key("1-2-3");
        assert!(!a.owns_stream(&bad));
        assert!(!a.owns_stream(&a.stream_key("-1")));
    }

    #[test]
    fn it_collapses_ascii_whitespace_only() {
        assert_eq!(collapse_whitespace(b"  a \t\n b  "), b"a b");
        assert_eq!(collapse_whitespace(b"\n\n"), b"");
        assert_eq!(collapse_whitespace(b"a\0 b"), b"a\0 b");
        let ideographic = "a\u{3000}b".as_bytes();
        assert_eq!(collapse_whitespace(ideographic), ideographic);
    }

    #[test]
    fn it_rejects_prefixes_that_break_the_hash_tag() {
        assert!(validate_prefix("aicache:").is_ok());
        assert!(validate_prefix("").is_ok());
        assert!(validate_prefix("a{b").is_err());
        assert!(validate_prefix("a}").is_err());
        assert!(validate_prefix("a b").is_err());
        assert!(validate_prefix("é").is_err());
        assert!(validate_prefix(&"x".repeat(65)).is_err());
    }
}
