//! The text clean-up open_clip's tokenizer applies before BPE: `ftfy.fix_text`, then
//! `html.unescape` twice, strip, whitespace collapse, lower-case.
//!
//! ftfy is reproduced for its deterministic, character-level fixers (HTML entities, C1
//! controls, Latin ligatures, full/half width, curly quotes, line breaks, surrogates, terminal
//! escapes, control characters, NFC), iterated to a fixed point as `fix_and_explain` does.
//! Not reproduced: ftfy's *mojibake* repair (`fix_encoding`), a heuristic that re-decodes
//! text that looks like UTF-8 read as Latin-1/Windows-1252 ("cafÃ©" → "café"). Prompts written
//! as proper Unicode never trigger it; a prompt that is itself mojibake tokenizes differently.

use std::collections::HashMap;
use std::sync::LazyLock;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

/// HTML5 named references, keyed without the leading `&` (with and without `;`, as
/// `html.entities.html5`).
static HTML5: LazyLock<HashMap<&'static str, &'static str>> =
    LazyLock::new(|| entities::ENTITIES.iter().map(|e| (&e.entity[1..], e.characters)).collect());

/// ftfy's `HTML_ENTITIES`: the `;`-terminated references plus upper-cased lower-case names
/// that are not references of their own (`&NTILDE;` → "Ñ").
static FTFY_ENTITIES: LazyLock<HashMap<String, String>> = LazyLock::new(|| {
    let mut m = HashMap::new();
    for e in entities::ENTITIES.iter().filter(|e| e.entity.ends_with(';')) {
        m.insert(e.entity.to_string(), e.characters.to_string());
    }
    for e in entities::ENTITIES.iter().filter(|e| e.entity.ends_with(';')) {
        let name = e.entity;
        if name == name.to_lowercase() {
            let upper = name.to_uppercase();
            if html_unescape(&upper) == upper {
                m.insert(upper, e.characters.to_uppercase());
            }
        }
    }
    m
});

static FTFY_ENTITY_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"&#?[0-9A-Za-z]{1,24};").expect("static regex"));
static CHARREF_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\x0C <&#;]{1,32};?)").expect("static regex")
});
static ANSI_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\x1b\[((?:\d|;)*)([a-zA-Z])").expect("static regex"));
static WHITESPACE_RE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\s+").expect("static regex"));

/// Windows-1252 for bytes 0x80..=0x9F; `None` where it is undefined (kept as is).
const CP1252_C1: [Option<char>; 32] = [
    Some('€'),
    None,
    Some('‚'),
    Some('ƒ'),
    Some('„'),
    Some('…'),
    Some('†'),
    Some('‡'),
    Some('ˆ'),
    Some('‰'),
    Some('Š'),
    Some('‹'),
    Some('Œ'),
    None,
    Some('Ž'),
    None,
    None,
    Some('‘'),
    Some('’'),
    Some('“'),
    Some('”'),
    Some('•'),
    Some('–'),
    Some('—'),
    Some('˜'),
    Some('™'),
    Some('š'),
    Some('›'),
    Some('œ'),
    None,
    Some('ž'),
    Some('Ÿ'),
];

/// Python's `html.unescape`: named references (longest legacy prefix without `;`), decimal
/// and hex references with the HTML5 replacements for invalid code points.
pub fn html_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    CHARREF_RE
        .replace_all(s, |c: &regex::Captures<'_>| {
            let body = &c[1];
            if let Some(num) = body.strip_prefix('#') {
                let (digits, radix) = match num.strip_prefix(['x', 'X']) {
                    Some(h) => (h, 16),
                    None => (num, 10),
                };
                let digits = digits.trim_end_matches(';');
                // Anything that overflows u64 is far above 0x10FFFF: U+FFFD, as Python does.
                let n = u64::from_str_radix(digits, radix).unwrap_or(u64::MAX);
                numeric_charref(n)
            } else if let Some(v) = HTML5.get(body) {
                v.to_string()
            } else {
                let chars: Vec<(usize, char)> = body.char_indices().collect();
                for x in (2..chars.len()).rev() {
                    let cut = chars[x].0;
                    if let Some(v) = HTML5.get(&body[..cut]) {
                        return format!("{v}{}", &body[cut..]);
                    }
                }
                format!("&{body}")
            }
        })
        .into_owned()
}

fn numeric_charref(n: u64) -> String {
    match n {
        0x00 => "\u{FFFD}".into(),
        0x0D => "\r".into(),
        0x80..=0x9F => match CP1252_C1[(n - 0x80) as usize] {
            Some(c) => c.to_string(),
            None => char::from_u32(n as u32).map(String::from).unwrap_or_default(),
        },
        0xD800..=0xDFFF => "\u{FFFD}".into(),
        n if n > 0x10FFFF => "\u{FFFD}".into(),
        0x01..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F | 0xFDD0..=0xFDEF => String::new(),
        n if n & 0xFFFE == 0xFFFE => String::new(),
        n => char::from_u32(n as u32).map(String::from).unwrap_or_default(),
    }
}

/// ftfy's `unescape_html` fixer: only complete `&...;` references, and numeric ones only when
/// fully consumed.
fn ftfy_unescape(s: &str) -> String {
    FTFY_ENTITY_RE
        .replace_all(s, |c: &regex::Captures<'_>| {
            let t = &c[0];
            if let Some(v) = FTFY_ENTITIES.get(t) {
                v.clone()
            } else if t.starts_with("&#") {
                let u = html_unescape(t);
                if u.contains(';') { t.to_string() } else { u }
            } else {
                t.to_string()
            }
        })
        .into_owned()
}

fn fix_c1_controls(s: &str) -> String {
    s.chars()
        .map(|c| match c as u32 {
            n @ 0x80..=0x9F => CP1252_C1[(n - 0x80) as usize].unwrap_or(c),
            _ => c,
        })
        .collect()
}

fn fix_latin_ligatures(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            'Ĳ' => out.push_str("IJ"),
            'ĳ' => out.push_str("ij"),
            'ŉ' => out.push_str("ʼn"),
            'Ǳ' => out.push_str("DZ"),
            'ǲ' => out.push_str("Dz"),
            'ǳ' => out.push_str("dz"),
            'Ǆ' => out.push_str("DŽ"),
            'ǅ' => out.push_str("Dž"),
            'ǆ' => out.push_str("dž"),
            'Ǉ' => out.push_str("LJ"),
            'ǈ' => out.push_str("Lj"),
            'ǉ' => out.push_str("lj"),
            'Ǌ' => out.push_str("NJ"),
            'ǋ' => out.push_str("Nj"),
            'ǌ' => out.push_str("nj"),
            'ﬀ' => out.push_str("ff"),
            'ﬁ' => out.push_str("fi"),
            'ﬂ' => out.push_str("fl"),
            'ﬃ' => out.push_str("ffi"),
            'ﬄ' => out.push_str("ffl"),
            'ﬅ' => out.push_str("ſt"),
            'ﬆ' => out.push_str("st"),
            c => out.push(c),
        }
    }
}

/// ftfy's width map: U+3000 → space, and every U+FF01..U+FFEF with an NFKC alternative.
fn fix_character_width(s: &str, out: &mut String) {
    for c in s.chars() {
        match c as u32 {
            0x3000 => out.push(' '),
            0xFF01..=0xFFEF => out.extend(std::iter::once(c).nfkc()),
            _ => out.push(c),
        }
    }
}

fn is_removed_control(c: char) -> bool {
    matches!(c as u32,
        0x00..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F | 0x206A..=0x206F | 0xFEFF | 0xFFF9..=0xFFFC)
}

/// One pass of ftfy's fixers (without `fix_encoding`), then NFC.
fn ftfy_pass(s: &str, unescape: bool) -> String {
    let s = if unescape { ftfy_unescape(s) } else { s.to_string() };
    let s = fix_c1_controls(&s);
    let mut a = String::with_capacity(s.len());
    fix_latin_ligatures(&s, &mut a);
    let mut b = String::with_capacity(a.len());
    fix_character_width(&a, &mut b);
    let s: String = b
        .chars()
        .map(|c| match c {
            '\u{02BC}' | '\u{2018}'..='\u{201B}' => '\'',
            '\u{201C}'..='\u{201F}' => '"',
            c => c,
        })
        .collect();
    let s = s.replace("\r\n", "\n").replace(['\r', '\u{2028}', '\u{2029}', '\u{0085}'], "\n");
    // Rust strings cannot hold lone surrogates, so ftfy's surrogate fixer has nothing to do.
    let s = ANSI_RE.replace_all(&s, "");
    let s: String = s.chars().filter(|c| !is_removed_control(*c)).collect();
    s.nfc().collect()
}

/// `ftfy.fix_text` with its defaults, minus mojibake repair (see the module docs): works per
/// line, and once a line holds `<` HTML unescaping is off for the rest of the text.
pub fn ftfy_fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut unescape = true;
    for segment in text.split_inclusive('\n') {
        if segment.contains('<') {
            unescape = false;
        }
        let mut cur = segment.to_string();
        loop {
            let next = ftfy_pass(&cur, unescape);
            if next == cur {
                break;
            }
            cur = next;
        }
        out.push_str(&cur);
    }
    out
}

/// open_clip's `basic_clean` + `whitespace_clean` + lower-case, as HPSv2's tokenizer runs it.
pub fn clean(text: &str) -> String {
    let t = ftfy_fix_text(text);
    let t = html_unescape(&html_unescape(&t));
    let t = WHITESPACE_RE.replace_all(t.trim(), " ");
    t.trim().to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_matches_python_rules() {
        // Values from Python 3.11 `html.unescape`.
        assert_eq!(
            html_unescape("&amp;amp; &lt &notit; &#39; &#x41; &#128; &#0; &#1;x"),
            "&amp; < ¬it; ' A € \u{FFFD} x"
        );
        assert_eq!(
            html_unescape("&#99999999999999999999; &bogus; & alone"),
            "\u{FFFD} &bogus; & alone"
        );
    }

    #[test]
    fn ftfy_fixers() {
        assert_eq!(
            ftfy_fix_text("ﬁne “quotes” Ｆｕｌｌ\r\nx\u{feff}y"),
            "fine \"quotes\" Full\nxy"
        );
        assert_eq!(ftfy_fix_text("&amp;amp;lt;"), "<");
        // A literal '<' switches unescaping off for that line and the rest.
        assert_eq!(ftfy_fix_text("a<b &amp; c"), "a<b &amp; c");
        assert_eq!(clean("  Hello\t\tWORLD  "), "hello world");
    }
}
