//! Stop strings over streamed text: text that might be the start of a stop
//! string is held back until it is known not to be, so a client never sees
//! part of a stop string, and the match ends generation at exactly its start.

/// Most stop strings one request may give.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StopError {
    #[error("at most {MAX_STOP_STRINGS} stop strings are allowed, got {0}")]
    TooMany(usize),
    #[error("stop string {index} is {len} bytes; the limit is {MAX_STOP_BYTES}")]
    TooLong { index: usize, len: usize },
    #[error("stop string {0} is empty")]
    Empty(usize),
}

#[derive(Clone, Debug, Default)]
pub struct StopText {
    stops: Vec<String>,
    pending: String,
    stopped: bool,
}

impl StopText {
    pub fn new(stops: Vec<String>) -> Result<Self, StopError> {
        Self::check(&stops)?;
        Ok(StopText {
            stops,
            pending: String::new(),
            stopped: false,
        })
    }

    /// The checks `new` makes: count, emptiness, length.
    pub fn check(stops: &[String]) -> Result<(), StopError> {
        if stops.len() > MAX_STOP_STRINGS {
            return Err(StopError::TooMany(stops.len()));
        }
        for (index, s) in stops.iter().enumerate() {
            if s.is_empty() {
                return Err(StopError::Empty(index));
            }
            if s.len() > MAX_STOP_BYTES {
                return Err(StopError::TooLong {
                    index,
                    len: s.len(),
                });
            }
        }
        Ok(())
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds generated text; returns what may be shown now. After a stop
    /// string matched, returns the text before it and then nothing more.
    pub fn push(&mut self, text: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.pending.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let out = self.pending[..at].to_owned();
            self.pending.clear();
            return out;
        }
        // Hold back the longest tail that is a proper prefix of a stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| s.char_indices().skip(1).map(|(i, _)| &s[..i]))
            .filter(|prefix| self.pending.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let emit_to = self.pending.len() - hold;
        let out = self.pending[..emit_to].to_owned();
        self.pending.drain(..emit_to);
        out
    }

    /// End of generation: whatever was held back is shown after all.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut s = StopText::new(stops.iter().map(|s| s.to_string()).collect()).unwrap();
        let mut out = String::new();
        for p in pieces {
            out += &s.push(p);
        }
        out += &s.finish();
        (out, s.stopped())
    }

    #[test]
    fn stop_string_split_across_pieces_is_never_shown() {
        let mut s = StopText::new(vec!["</end>".into()]).unwrap();
        assert_eq!(s.push("hello </"), "hello ");
        assert_eq!(s.push("en"), "");
        assert_eq!(s.push("d> more"), "");
        assert!(s.stopped());
        assert_eq!(s.push("x"), "");
    }

    #[test]
    fn held_text_is_released_when_it_cannot_match() {
        assert_eq!(
            run(&["STOP"], &["a S", "T", "x", "y"]),
            ("a STxy".into(), false)
        );
        assert_eq!(run(&["STOP"], &["a ST"]), ("a ST".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["bb", "a"], &["xxbba"]), ("xx".into(), true));
        assert_eq!(run(&["ü!", "zz"], &["grü", "!"]), ("gr".into(), true));
    }

    #[test]
    fn limits_are_enforced() {
        assert_eq!(
            StopText::new(vec!["x".into(); 17]).unwrap_err(),
            StopError::TooMany(17)
        );
        assert!(matches!(
            StopText::new(vec!["y".repeat(300)]),
            Err(StopError::TooLong { index: 0, len: 300 })
        ));
        assert_eq!(
            StopText::new(vec!["".into()]).unwrap_err(),
            StopError::Empty(0)
        );
    }
}
