//! Server-sent events, parsed incrementally as an upstream streams them
//! (for LLMCACHE.STREAM, issue 9). Pure: bytes in, events out.
//!
//! Lines end in `\n` or `\r\n` (a lone `\r` ends a line too, as the spec
//! allows); `data:` lines of one event are joined with `\n`; an empty line
//! ends the event; `:` lines are comments; `event:` names the event. The
//! buffer is bounded, so an upstream that never ends a line cannot grow it.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// One event's data, with its `event:` name when it had one.
    Data { name: Option<String>, data: String },
    /// `data: [DONE]`, OpenAI's end of stream.
    Done,
}

pub struct Parser {
    line: Vec<u8>,
    /// A `\r` ended the last line: a `\n` right after it belongs to it.
    after_cr: bool,
    name: Option<String>,
    data: Option<String>,
    max_event_bytes: usize,
    pending: usize,
}

impl Parser {
    pub fn new(max_event_bytes: usize) -> Self {
        Parser {
            line: Vec::new(),
            after_cr: false,
            name: None,
            data: None,
            max_event_bytes,
            pending: 0,
        }
    }

    /// Feeds the next bytes of the body; returns the events they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<Event>, String> {
        let mut out = Vec::new();
        for &b in bytes {
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                continue;
            }
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(e) = self.line_done(&line)? {
                        out.push(e);
                    }
                }
                _ => {
                    self.line.push(b);
                    self.pending += 1;
                    if self.pending > self.max_event_bytes {
                        return Err(format!(
                            "an event is longer than {} bytes",
                            self.max_event_bytes
                        ));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The body ended: an event not closed by an empty line is still
    /// delivered (some servers omit the last blank line).
    pub fn finish(mut self) -> Result<Vec<Event>, String> {
        let mut out = Vec::new();
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            if let Some(e) = self.line_done(&line)? {
                out.push(e);
            }
        }
        if let Some(e) = self.dispatch() {
            out.push(e);
        }
        Ok(out)
    }

    fn line_done(&mut self, line: &[u8]) -> Result<Option<Event>, String> {
        if line.is_empty() {
            return Ok(self.dispatch());
        }
        if line[0] == b':' {
            return Ok(None);
        }
        let text = std::str::from_utf8(line).map_err(|_| "an event is not UTF-8".to_string())?;
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (text, ""),
        };
        match field {
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            "event" => self.name = Some(value.to_string()),
            _ => {} // id, retry and unknown fields change nothing here
        }
        Ok(None)
    }

    fn dispatch(&mut self) -> Option<Event> {
        self.pending = 0;
        let name = self.name.take();
        let data = self.data.take()?;
        if data == "[DONE]" && name.is_none() {
            return Some(Event::Done);
        }
        Some(Event::Data { name, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(s: &str) -> Event {
        Event::Data {
            name: None,
            data: s.into(),
        }
    }

    fn all(chunks: &[&[u8]]) -> Vec<Event> {
        let mut p = Parser::new(1 << 20);
        let mut out = Vec::new();
        for c in chunks {
            out.extend(p.feed(c).unwrap());
        }
        out.extend(p.finish().unwrap());
        out
    }

    #[test]
    fn it_reads_openai_style_streams() {
        let body = b"data: {\"a\":1}\n\ndata: {\"a\":2}\n\ndata: [DONE]\n\n";
        assert_eq!(
            all(&[body]),
            vec![data("{\"a\":1}"), data("{\"a\":2}"), Event::Done]
        );
    }

    #[test]
    fn events_may_be_cut_anywhere_and_use_any_line_ending() {
        let body = b"data: one\r\n\r\n: keep-alive\r\ndata:two\rdata: more\r\rdata: [DONE]\n\n";
        let want = vec![data("one"), data("two\nmore"), Event::Done];
        for cut in 0..body.len() {
            assert_eq!(all(&[&body[..cut], &body[cut..]]), want, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(all(&bytes), want);
    }

    #[test]
    fn named_events_and_a_missing_last_blank_line() {
        let body = b"event: error\ndata: {\"error\":{\"message\":\"x\"}}\n\ndata: tail";
        assert_eq!(
            all(&[body]),
            vec![
                Event::Data {
                    name: Some("error".into()),
                    data: "{\"error\":{\"message\":\"x\"}}".into()
                },
                data("tail")
            ]
        );
    }

    #[test]
    fn an_endless_line_is_refused_not_buffered() {
        let mut p = Parser::new(16);
        assert!(p.feed(b"data: 0123456789").is_ok());
        assert!(p.feed(b"abcdefgh").unwrap_err().contains("longer than 16"));
        let mut p = Parser::new(16);
        assert!(p.feed(b"data: \xff\xfe\n").unwrap_err().contains("UTF-8"));
    }
}
