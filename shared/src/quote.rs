//! Quoting input in messages: an error, a dead-letter reason or a log line quotes at most
//! [`MAX_QUOTED`] characters of anything a user sent, escaped, so the explanation around it
//! always survives (and binary bytes never reach a terminal raw).

/// The most characters of one input a message quotes.
pub const MAX_QUOTED: usize = 100;

/// `s` in double quotes, escaped like Rust's `{:?}`, cut to [`MAX_QUOTED`] characters with
/// the length of what was cut: `"aaaa…" (5000 bytes)`.
pub fn quote(s: &str) -> String {
    let shown: String = s.chars().take(MAX_QUOTED).collect();
    if shown.len() == s.len() { format!("{s:?}") } else { format!("{:?} ({} bytes)", format!("{shown}…"), s.len()) }
}

/// `s` with control characters and U+FFFD (what a lossy decoding of binary bytes leaves)
/// escaped (`\u{1b}`, `\u{fffd}`), so a message about a corrupt input never prints its
/// bytes raw into a terminal or a log line. Other text, non-ASCII included, stays as it is.
pub fn escape_unprintable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || c == '\u{fffd}' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A message cut to at most `max` characters by dropping its middle, so both its start (what
/// failed) and its end (what to do, what was expected) stay.
pub fn shorten(message: &str, max: usize) -> String {
    let count = message.chars().count();
    if count <= max {
        return message.to_owned();
    }
    let keep = max.saturating_sub(3) / 2;
    let head: String = message.chars().take(keep).collect();
    let tail: String = message.chars().skip(count - keep).collect();
    format!("{head} … {tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_bytes_are_escaped_and_text_kept() {
        let lossy = String::from_utf8_lossy(b"Q\xff*1V\x1b[31m\x00");
        assert_eq!(escape_unprintable(&lossy), "Q\\u{fffd}*1V\\u{1b}[31m\\u{0}");
        assert_eq!(escape_unprintable("usr/share/zoneinfo/Am\u{e9}rica"), "usr/share/zoneinfo/Am\u{e9}rica");
    }

    #[test]
    fn long_input_is_cut_and_escaped() {
        assert_eq!(quote("web"), "\"web\"");
        assert_eq!(quote("a\u{1}b"), "\"a\\u{1}b\"");
        let long = "x".repeat(5000);
        let q = quote(&long);
        assert!(q.len() < 130 && q.ends_with("…\" (5000 bytes)"), "{q}");
    }

    #[test]
    fn a_shortened_message_keeps_both_ends() {
        let msg = format!("unknown variant `{}`, expected one of `prepare`, `activate`", "y".repeat(3000));
        let s = shorten(&msg, 200);
        assert!(s.chars().count() <= 200, "{}", s.len());
        assert!(s.starts_with("unknown variant `yyy") && s.ends_with("expected one of `prepare`, `activate`"), "{s}");
        assert_eq!(shorten("short", 200), "short");
    }
}
