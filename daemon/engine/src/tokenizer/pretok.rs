//! The llama3 pre-tokenizer (llama.cpp's `lfm2` and `llama-bpe`): splits text
//! into the words that BPE then encodes one by one, by hand as llama.cpp does,
//! since the regex needs a lookahead.
//!
//! The regex, alternatives tried in order at each position:
//! `(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
//! `\p{L}` and `\p{N}` are Unicode General Categories (marks are neither);
//! `\s` is Unicode White_Space, the 25 characters of llama.cpp's table.

use unicode_general_category::{GeneralCategory, get_general_category};

/// What the pre-tokenizer needs to know about one character.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct Class {
    letter: bool,
    number: bool,
    space: bool,
}

/// Unicode White_Space, as in llama.cpp's `unicode_set_whitespace`.
fn is_space(c: char) -> bool {
    matches!(
        c,
        '\t'..='\r'
            | ' '
            | '\u{85}'
            | '\u{A0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200A}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202F}'
            | '\u{205F}'
            | '\u{3000}'
    )
}

fn class(c: char) -> Class {
    if c.is_ascii() {
        return Class {
            letter: c.is_ascii_alphabetic(),
            number: c.is_ascii_digit(),
            space: is_space(c),
        };
    }
    use GeneralCategory::*;
    let (letter, number) = match get_general_category(c) {
        UppercaseLetter | LowercaseLetter | TitlecaseLetter | ModifierLetter | OtherLetter => {
            (true, false)
        }
        DecimalNumber | LetterNumber | OtherNumber => (false, true),
        _ => (false, false),
    };
    Class {
        letter,
        number,
        space: is_space(c),
    }
}

/// Splits `text` into pre-tokens. The pieces are non-empty and concatenate
/// back to `text`.
pub fn split(text: &str) -> Vec<&str> {
    let mut bounds = Vec::new();
    split_bounds(text, &mut bounds);
    let mut out = Vec::with_capacity(bounds.len());
    let mut start = 0;
    for end in bounds {
        out.push(&text[start..end]);
        start = end;
    }
    out
}

/// The byte offsets at which the pre-tokens of `text` end, in order.
pub fn split_bounds(text: &str, bounds: &mut Vec<usize>) {
    bounds.clear();
    let chars: Vec<(usize, char, Class)> = text
        .char_indices()
        .map(|(at, c)| (at, c, class(c)))
        .collect();
    let n = chars.len();
    // Past either end a position has no character and no class, as in
    // llama.cpp's `_get_cpt` / `_get_flags`.
    let cpt = |pos: usize| chars.get(pos).map(|&(_, c, _)| c);
    let cls = |pos: usize| chars.get(pos).map(|&(_, _, k)| k).unwrap_or_default();
    let byte_at = |pos: usize| chars.get(pos).map_or(text.len(), |&(at, _, _)| at);
    let is_crlf = |c: Option<char>| matches!(c, Some('\r' | '\n'));

    let mut pos = 0;
    let emit = |end: usize, bounds: &mut Vec<usize>| {
        let at = byte_at(end);
        if bounds.last().copied().unwrap_or(0) < at {
            bounds.push(at);
        }
    };
    while pos < n {
        let c = chars[pos].1;
        let k = chars[pos].2;

        // (?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])
        if c == '\'' && pos + 1 < n {
            let next = lower(cpt(pos + 1));
            if matches!(next, Some('s' | 't' | 'm' | 'd')) {
                pos += 2;
                emit(pos, bounds);
                continue;
            }
            if pos + 2 < n {
                let next2 = lower(cpt(pos + 2));
                if matches!(
                    (next, next2),
                    (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l'))
                ) {
                    pos += 3;
                    emit(pos, bounds);
                    continue;
                }
            }
        }

        // [^\r\n\p{L}\p{N}]?\p{L}+
        if !(c == '\r' || c == '\n' || k.number) && (k.letter || cls(pos + 1).letter) {
            pos += 1;
            while cls(pos).letter {
                pos += 1;
            }
            emit(pos, bounds);
            continue;
        }

        // \p{N}{1,3}
        if k.number {
            let mut start = pos;
            while cls(pos).number {
                pos += 1;
                if pos - start >= 3 {
                    emit(pos, bounds);
                    start = pos;
                }
            }
            emit(pos, bounds);
            continue;
        }

        // <space>?[^\s\p{L}\p{N}]+[\r\n]*
        let punct = |pos: usize| {
            let k = cls(pos);
            pos < n && !(k.space || k.letter || k.number)
        };
        let lead = if c == ' ' { pos + 1 } else { pos };
        if pos + 1 >= n && c == ' ' || punct(lead) {
            // llama.cpp's form also takes a lone trailing space here, which
            // `\s+` would have matched the same way.
            pos = lead;
            while punct(pos) {
                pos += 1;
            }
            while is_crlf(cpt(pos)) {
                pos += 1;
            }
            emit(pos, bounds);
            continue;
        }

        let mut spaces = 0;
        let mut last_crlf_end = None;
        while cls(pos + spaces).space {
            if is_crlf(cpt(pos + spaces)) {
                last_crlf_end = Some(pos + spaces + 1);
            }
            spaces += 1;
        }
        // \s*[\r\n]+
        if let Some(end) = last_crlf_end {
            pos = end;
            emit(pos, bounds);
            continue;
        }
        // \s+(?!\S)
        if spaces > 1 && pos + spaces < n {
            pos += spaces - 1;
            emit(pos, bounds);
            continue;
        }
        // \s+
        if spaces > 0 {
            pos += spaces;
            emit(pos, bounds);
            continue;
        }
        // Nothing matched (cannot happen: every character is a letter, a
        // number, a space or something else); take it alone.
        pos += 1;
        emit(pos, bounds);
    }
}

/// Lowercase for the contraction check. Only ASCII letters matter there, and
/// no non-ASCII character lowercases to one of `s t m d r e v l` in
/// UnicodeData's simple mappings.
fn lower(c: Option<char>) -> Option<char> {
    c.map(|c| c.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(text: &str, want: &[&str]) {
        assert_eq!(split(text), want, "splitting {text:?}");
    }

    #[test]
    fn contractions() {
        check("I'm", &["I", "'m"]);
        check(
            "we'RE they'Ve she'll he'D",
            &["we", "'RE", " they", "'Ve", " she", "'ll", " he", "'D"],
        );
        check("don't", &["don", "'t"]);
        // Not a contraction: the apostrophe leads the letters.
        check("'x rock'n'roll", &["'x", " rock", "'n", "'roll"]);
        check("'", &["'"]);
        check("'l", &["'l"]);
        check("' era", &["'", " era"]);
    }

    #[test]
    fn numbers_in_groups_of_three() {
        check("3", &["3"]);
        check("3333333", &["333", "333", "3"]);
        check("12345 67", &["123", "45", " ", "67"]);
        check("w048 7tuijk", &["w", "048", " ", "7", "tuijk"]);
        // Other numbers count too: superscripts, Roman numerals, fractions.
        check("x²½Ⅻ", &["x", "²½Ⅻ"]);
    }

    #[test]
    fn whitespace_runs() {
        check("   Hello", &["  ", " Hello"]);
        check("Hello   ", &["Hello", "   "]);
        check("a  \n\n b", &["a", "  \n\n", " b"]);
        check("\t\n", &["\t\n"]);
        check("\n =", &["\n", " ="]);
        check("x \u{3000}y", &["x", " ", "\u{3000}y"]);
        check(" ", &[" "]);
        check("  ", &["  "]);
        check("a \n", &["a", " \n"]);
        check(
            "    Hello\n    Hello",
            &["   ", " Hello", "\n", "   ", " Hello"],
        );
    }

    #[test]
    fn punctuation_and_newlines() {
        check("Hello, world!", &["Hello", ",", " world", "!"]);
        check("x = {};\n\ny", &["x", " =", " {};\n\n", "y"]);
        check(" ((", &[" (("]);
        check("a.\r\nb", &["a", ".\r\n", "b"]);
        check("$9", &["$", "9"]);
    }

    #[test]
    fn emoji_and_other_scripts() {
        check(" this is 🦙.cpp", &[" this", " is", " 🦙.", "cpp"]);
        check("нещо на Български", &["нещо", " на", " Български"]);
        check("我想在apple工作", &["我想在apple工作"]);
        check("😶‍🌫️ x", &["😶‍🌫️", " x"]);
    }

    #[test]
    fn marks_are_not_letters() {
        // Khmer: vowel signs (Mc/Mn) end a letter run and may lead the next.
        check("កាន់", &["ក", "ាន", "់"]);
        // Devanagari: the virama and vowel signs are marks.
        check("हिन्दी", &["ह", "िन", "्द", "ी"]);
        // A combining acute after a letter.
        check("e\u{301}t\u{301}", &["e", "\u{301}t", "\u{301}"]);
    }

    #[test]
    fn whitespace_set_is_unicode_white_space() {
        for c in (0..0x11_0000).filter_map(char::from_u32) {
            assert_eq!(is_space(c), c.is_whitespace(), "{c:?}");
        }
    }

    #[test]
    fn long_runs_are_linear() {
        for c in ['a', '1', '!', ' ', '\n', '\u{301}', '😀'] {
            let text: String = std::iter::repeat_n(c, 200_000).collect();
            let pieces = split(&text);
            assert_eq!(pieces.concat(), text);
        }
    }
}
