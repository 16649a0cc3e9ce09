//! The `exempt:` list without YAML, when it is a plain list: a million entries are 35 MB that
//! serde_yaml takes over a second to read, before the daemon can start anything else.
//!
//! Strict: the top-level `exempt:` section is taken only when every line of the file can be
//! told apart as [`super::top_level_key`] requires, the key appears once with no value on its
//! line, and every line under it is blank, an ASCII comment, or one entry of exactly the
//! form `- {prefix: P}` or `- prefix: P` at one indentation, with `P` a prefix
//! [`Prefix::from_str`](std::str::FromStr) accepts. Anything else (notes, expiries, quotes,
//! tags, anchors, trailing comments, a bad address) defers to serde_yaml for the whole file,
//! so every refusal is YAML's, with its message and position. The rest of the file is still
//! read by serde_yaml, with the section replaced by `exempt: []` and as many empty lines:
//! every other line keeps its number and column.

use super::{top_level_key, ExemptEntry, Lines};
use crate::net::Prefix;

/// The file without its `exempt:` entries (same lines elsewhere), and the entries.
pub(super) struct Split {
    pub rest: String,
    pub exempt: Vec<ExemptEntry>,
}

/// None: not the plain form; serde_yaml reads the file as it is.
pub(super) fn split_exempt(text: &str) -> Option<Split> {
    let mut section: Option<(usize, usize)> = None;
    let mut inside = false;
    let mut indent: Option<usize> = None;
    let mut exempt = Vec::new();
    let mut keyed = false;
    for line in Lines(text) {
        let at = line.as_ptr() as usize - text.as_ptr() as usize;
        let first = line.bytes().next();
        if inside {
            if !matches!(first, Some(b'a'..=b'z' | b'A'..=b'Z' | b'_')) {
                let p = entry(line, &mut indent)?;
                exempt.extend(p.map(|prefix| ExemptEntry {
                    prefix,
                    note: None,
                    until: None,
                    force: false,
                }));
                continue;
            }
            // The next top-level key ends the section.
            inside = false;
            section.as_mut().expect("opened").1 = at;
        }
        if let Some((key, value)) = top_level_key(line, keyed)? {
            keyed = true;
            if key == "exempt" {
                // Twice is YAML's to refuse; a value on the line is not a plain list.
                if section.is_some() || !value.bytes().all(|b| b == b' ') {
                    return None;
                }
                section = Some((at, text.len()));
                inside = true;
            }
        }
    }
    let (from, to) = section?;
    if exempt.is_empty() {
        return None;
    }
    let breaks = memchr::memchr_iter(b'\n', &text.as_bytes()[from..to]).count();
    let mut rest = String::with_capacity(text.len() - (to - from) + breaks + 16);
    rest.push_str(&text[..from]);
    rest.push_str("exempt: []");
    rest.extend(std::iter::repeat_n('\n', breaks));
    rest.push_str(&text[to..]);
    Some(Split { rest, exempt })
}

/// One line under `exempt:`: Some(None) for a blank or comment line, Some(Some(prefix)) for
/// an entry of the plain form at the list's indentation, None for anything else.
fn entry(line: &str, indent: &mut Option<usize>) -> Option<Option<Prefix>> {
    let body = line.trim_start_matches(' ');
    if body.is_empty() {
        return Some(None);
    }
    if body.starts_with('#') {
        // ASCII only: no character YAML could take for a line break.
        return body
            .bytes()
            .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
            .then_some(None);
    }
    let n = line.len() - body.len();
    if *indent.get_or_insert(n) != n {
        return None;
    }
    let p = body
        .strip_prefix("- {prefix: ")
        .and_then(|p| p.strip_suffix('}'))
        .or_else(|| body.strip_prefix("- prefix: "))?;
    // A plain scalar YAML reads as this very string in block and flow context: hex digits,
    // dots, colons, a slash; never starting or ending with a colon.
    let plain = p.bytes().next().is_some_and(|b| b.is_ascii_hexdigit())
        && !p.ends_with(':')
        && p.bytes()
            .all(|b| b.is_ascii_hexdigit() || matches!(b, b'.' | b':' | b'/'));
    if !plain {
        return None;
    }
    p.parse::<Prefix>().ok().map(Some)
}
