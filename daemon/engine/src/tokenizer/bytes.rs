//! GPT-2's byte-to-unicode map: byte-level BPE vocabularies store every byte
//! as a printable character (space is `Ġ`, newline `Ċ`), so token texts are
//! strings over a 256-character alphabet that maps back to raw bytes one to one.

/// The character that stands for each byte in token texts.
pub const BYTE_TO_CHAR: [char; 256] = byte_to_char_table();

/// Bytes that stand for themselves: `!`..=`~`, `¡`..=`¬`, `®`..=`ÿ`. The
/// other 68 bytes, in order, become U+0100, U+0101, ...
const fn is_printable(b: u8) -> bool {
    matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

const fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut shifted = 0u32;
    let mut b = 0usize;
    while b < 256 {
        let cp = if is_printable(b as u8) {
            b as u32
        } else {
            shifted += 1;
            0x100 + shifted - 1
        };
        table[b] = match char::from_u32(cp) {
            Some(c) => c,
            None => panic!("GPT-2 byte map stays below U+0144"),
        };
        b += 1;
    }
    table
}

/// Index `cp - 0x100` gives the byte that U+0100 + i stands for.
const SHIFTED_TO_BYTE: [u8; 68] = shifted_table();

const fn shifted_table() -> [u8; 68] {
    let mut table = [0u8; 68];
    let mut n = 0usize;
    let mut b = 0usize;
    while b < 256 {
        if !is_printable(b as u8) {
            table[n] = b as u8;
            n += 1;
        }
        b += 1;
    }
    table
}

/// The byte a token-text character stands for, if it is in the alphabet.
pub fn char_to_byte(c: char) -> Option<u8> {
    let cp = u32::from(c);
    match cp {
        0..=0xFF if is_printable(cp as u8) => Some(cp as u8),
        0x100..=0x143 => Some(SHIFTED_TO_BYTE[(cp - 0x100) as usize]),
        _ => None,
    }
}

/// Raw bytes of a token text, or `None` if a character is outside the
/// alphabet (such a text can never be produced from input bytes).
pub fn text_to_bytes(text: &str) -> Option<Vec<u8>> {
    text.chars().map(char_to_byte).collect()
}

/// Raw bytes of a token text for display: characters outside the alphabet
/// keep their own UTF-8 bytes.
pub fn text_to_bytes_lossy(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

/// The token text of raw bytes.
pub fn bytes_to_text(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| BYTE_TO_CHAR[usize::from(b)])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_characters() {
        assert_eq!(BYTE_TO_CHAR[b' ' as usize], 'Ġ');
        assert_eq!(BYTE_TO_CHAR[b'\n' as usize], 'Ċ');
        assert_eq!(BYTE_TO_CHAR[b'\t' as usize], 'ĉ');
        assert_eq!(BYTE_TO_CHAR[0], 'Ā');
        assert_eq!(BYTE_TO_CHAR[0xAD], 'Ń');
        assert_eq!(BYTE_TO_CHAR[b'a' as usize], 'a');
        assert_eq!(bytes_to_text(" hello\n".as_bytes()), "ĠhelloĊ");
    }

    #[test]
    fn map_is_a_bijection() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = BYTE_TO_CHAR[usize::from(b)];
            assert!(seen.insert(c), "{c:?} twice");
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(char_to_byte(' '), None);
        assert_eq!(char_to_byte('\u{144}'), None);
        assert_eq!(char_to_byte('é'), Some(0xE9));
        assert_eq!(text_to_bytes("aĠb"), Some(b"a b".to_vec()));
        assert_eq!(text_to_bytes("a b"), None);
        assert_eq!(text_to_bytes_lossy("a bĊ"), b"a b\n".to_vec());
    }
}
