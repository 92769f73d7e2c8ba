//! Cutting a fill's inputs into upstream requests: at most `max_count`
//! inputs and (unless one input alone is larger) `max_tokens` estimated
//! tokens each, inputs kept in order. Pure.

use std::ops::Range;

pub fn batches(tokens: &[u64], max_count: usize, max_tokens: u64) -> Vec<Range<usize>> {
    let max_count = max_count.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    let mut sum = 0u64;
    for (i, &t) in tokens.iter().enumerate() {
        let count = i - start;
        if count > 0 && (count >= max_count || sum.saturating_add(t) > max_tokens) {
            out.push(start..i);
            start = i;
            sum = 0;
        }
        sum = sum.saturating_add(t);
    }
    if start < tokens.len() {
        out.push(start..tokens.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_cuts_by_count() {
        assert_eq!(batches(&[1; 10], 3, 1000), vec![0..3, 3..6, 6..9, 9..10]);
        assert_eq!(batches(&[], 3, 1000), Vec::<Range<usize>>::new());
    }

    #[test]
    fn it_cuts_by_estimated_tokens() {
        assert_eq!(batches(&[40, 40, 40, 10], 100, 100), vec![0..2, 2..4]);
        // An input over the limit on its own still goes, alone.
        assert_eq!(batches(&[5, 500, 5], 100, 100), vec![0..1, 1..2, 2..3]);
    }
}
