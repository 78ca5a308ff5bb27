//! Caption clean-up exactly as OpenCLIP's `_clean_lower` does it:
//! `whitespace_clean(basic_clean(text)).lower()` where
//! `basic_clean = strip(html.unescape(html.unescape(ftfy.fix_text(text))))`.
//!
//! ftfy's default fixes are reproduced from its own tables (see `gen_tables.py`) except
//! `fix_encoding` (mojibake repair, a statistical heuristic): text that is already valid
//! Unicode — the normal case for shards built from UTF-8 sources — is unaffected by it.

use std::sync::OnceLock;

use regex::{Captures, Regex};
use unicode_normalization::UnicodeNormalization;

use super::tables;

/// The caption as OpenCLIP's tokenizer sees it before the word split.
pub fn clean_lower(text: &str) -> String {
    let text = fix_text(text);
    let text = html_unescape(&html_unescape(&text));
    let text = text.trim_matches(py_isspace);
    // " ".join(text.split()) — split on Python's whitespace.
    let joined = text
        .split(py_isspace)
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    joined.to_lowercase()
}

/// Python's `str.isspace`: Unicode White_Space plus the ASCII separators U+001C..U+001F.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `ftfy.fix_text` with default settings (minus mojibake repair), line by line as ftfy does.
pub fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // unescape_html="auto": off from the first line holding '<' (it looks like HTML) onwards.
    let mut unescape = true;
    for segment in text.split_inclusive('\n') {
        if segment.contains('<') {
            unescape = false;
        }
        out.push_str(&fix_segment(segment, unescape));
    }
    out
}

/// ftfy's `fix_and_explain`: apply every fix until the text stops changing.
fn fix_segment(segment: &str, unescape: bool) -> String {
    let mut text = segment.to_string();
    loop {
        let orig = text.clone();
        if unescape {
            text = ftfy_unescape_html(&text);
        }
        text = text
            .chars()
            .map(|c| match c {
                '\u{80}'..='\u{9f}' => tables::C1_TO_WINDOWS_1252[c as usize - 0x80],
                _ => c,
            })
            .collect();
        text = translate(&text, tables::LIGATURES);
        text = translate(&text, tables::WIDTH_MAP);
        text = uncurl_quotes(&text);
        text = fix_line_breaks(&text);
        text = terminal_escape_re().replace_all(&text, "").into_owned();
        text.retain(|c| tables::CONTROL_CHARS.binary_search(&c).is_err());
        text = text.nfc().collect();
        if text == orig {
            return text;
        }
    }
}

fn translate(text: &str, table: &[(char, &str)]) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match table.binary_search_by_key(&c, |&(k, _)| k) {
            Ok(i) => out.push_str(table[i].1),
            Err(_) => out.push(c),
        }
    }
    out
}

fn uncurl_quotes(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
            '\u{201c}'..='\u{201f}' => '"',
            _ => c,
        })
        .collect()
}

fn fix_line_breaks(text: &str) -> String {
    text.replace("\r\n", "\n")
        .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n")
}

fn terminal_escape_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\x1b\[((?:\d|;)*)([a-zA-Z])").expect("static regex"))
}

/// ftfy's `unescape_html`: only `&name;` / `&#num;` forms, plus upper-case entity names.
fn ftfy_unescape_html(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"&#?[0-9A-Za-z]{1,24};").expect("static regex"));
    re.replace_all(text, |caps: &Captures| {
        let m = &caps[0];
        if let Some(v) = lookup(tables::FTFY_EXTRA_ENTITIES, m) {
            return v.to_string();
        }
        if let Some(v) = lookup(tables::HTML5, &m[1..]) {
            return v.to_string();
        }
        if m.starts_with("&#") {
            let un = html_unescape(m);
            return if un.contains(';') { m.to_string() } else { un };
        }
        m.to_string()
    })
    .into_owned()
}

fn lookup(table: &'static [(&'static str, &'static str)], key: &str) -> Option<&'static str> {
    table
        .binary_search_by(|&(k, _)| k.as_bytes().cmp(key.as_bytes()))
        .ok()
        .map(|i| table[i].1)
}

/// CPython's `html.unescape` (HTML5 rules: legacy names without ';', longest-prefix names,
/// numeric references with the Windows-1252 fix-ups).
pub fn html_unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| {
        Regex::new(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\x0c <&#;]{1,32};?)")
            .expect("static regex")
    });
    re.replace_all(text, |caps: &Captures| replace_charref(&caps[1]))
        .into_owned()
}

fn replace_charref(s: &str) -> String {
    if let Some(num) = s.strip_prefix('#') {
        let (digits, radix) = match num.strip_prefix(['x', 'X']) {
            Some(hex) => (hex, 16),
            None => (num, 10),
        };
        let digits = digits.trim_end_matches(';');
        // Anything that overflows u32 is above U+10FFFF, which Python maps to U+FFFD.
        let n = u32::from_str_radix(digits, radix).unwrap_or(u32::MAX);
        if let Ok(i) = tables::INVALID_CHARREFS.binary_search_by_key(&n, |&(k, _)| k) {
            return tables::INVALID_CHARREFS[i].1.to_string();
        }
        if (0xD800..=0xDFFF).contains(&n) || n > 0x10FFFF {
            return "\u{FFFD}".to_string();
        }
        if tables::INVALID_CODEPOINTS.binary_search(&n).is_ok() {
            return String::new();
        }
        return char::from_u32(n).map(String::from).unwrap_or_default();
    }
    if let Some(v) = lookup(tables::HTML5, s) {
        return v.to_string();
    }
    // The longest prefix (at least two chars) that names an entity, as the standard says.
    let ends: Vec<usize> = s.char_indices().map(|(i, _)| i).skip(2).collect();
    for &end in ends.iter().rev() {
        if let Some(v) = lookup(tables::HTML5, &s[..end]) {
            return format!("{v}{}", &s[end..]);
        }
    }
    format!("&{s}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_unescape_follows_python() {
        assert_eq!(html_unescape("&amp;lt;"), "&lt;");
        assert_eq!(html_unescape("a &amp b"), "a & b");
        assert_eq!(html_unescape("&notit;"), "¬it;");
        assert_eq!(html_unescape("&#128;&#x41;&#0;"), "€A\u{FFFD}");
        assert_eq!(html_unescape("&#99999999999;"), "\u{FFFD}");
        assert_eq!(html_unescape("&bogus;"), "&bogus;");
    }

    #[test]
    fn ftfy_fixes() {
        assert_eq!(fix_text("ﬂuﬃeﬆ"), "fluffiest");
        assert_eq!(fix_text("ＬＯＵＤ　ＮＯＩＳＥＳ"), "LOUD NOISES");
        assert_eq!(fix_text("\u{201c}here\u{2019}s\u{201d}"), "\"here's\"");
        assert_eq!(fix_text("P&EACUTE;REZ"), "PÉREZ");
        assert_eq!(fix_text("<b>&amp;</b>"), "<b>&amp;</b>");
        assert_eq!(fix_text("\u{1b}[36;44mblue\u{1b}[0m"), "blue");
        assert_eq!(fix_text("e\u{301}"), "é");
    }

    #[test]
    fn clean_lower_collapses_whitespace() {
        assert_eq!(clean_lower("  A\t\tB \u{3000} C\n"), "a b c");
        assert_eq!(clean_lower(""), "");
    }
}
