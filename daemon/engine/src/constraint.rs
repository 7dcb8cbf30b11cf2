//! Constrained decoding: a response format (a JSON Schema, any JSON object,
//! a regular expression, a Lark grammar) compiled by llguidance against the
//! model's vocabulary ([`Grammars`], built once per model), and per sequence
//! a [`Constraint`]: the tokens that keep the output a prefix of something
//! the format accepts, and whether the output is complete.
//!
//! Special tokens (`<|im_end|>`, `<|tool_call_start|>`, ...) are marked as
//! such in llguidance's trie, so the text of a format never matches one; the
//! end-of-generation tokens are allowed exactly when the output is complete.

use crate::sequence::end_of_generation_ids;
use crate::tokenizer::{TokenKind, Tokenizer};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

/// What the output must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponseFormat {
    /// One JSON value valid against this schema (JSON text).
    JsonSchema(String),
    /// Any JSON object.
    JsonObject,
    /// A regular expression the whole output matches.
    Regex(String),
    /// A Lark-style grammar (llguidance's dialect), from its `start` rule.
    Lark(String),
}

impl ResponseFormat {
    /// The name clients use for this kind (`json_schema`, `json_object`,
    /// `regex`, `lark`).
    pub fn kind(&self) -> &'static str {
        match self {
            ResponseFormat::JsonSchema(_) => "json_schema",
            ResponseFormat::JsonObject => "json_object",
            ResponseFormat::Regex(_) => "regex",
            ResponseFormat::Lark(_) => "lark",
        }
    }

    fn text(&self) -> &str {
        match self {
            ResponseFormat::JsonSchema(s) | ResponseFormat::Regex(s) | ResponseFormat::Lark(s) => s,
            ResponseFormat::JsonObject => "",
        }
    }
}

/// Longest schema, regex or grammar text accepted, in bytes.
pub const MAX_FORMAT_BYTES: usize = 64 * 1024;
/// Deepest nesting of arrays and objects in a JSON Schema's text.
pub const MAX_SCHEMA_DEPTH: usize = 32;
/// The grammar a format compiles to may have at most this many symbols.
pub const MAX_GRAMMAR_SYMBOLS: usize = 200_000;
/// Lexer work allowed to compile a format (bounds its compile time: ~0.1 s
/// of work at most on a laptop core).
pub const COMPILE_FUEL: u64 = 1_000_000;
/// Lexer work allowed per generated token (bounds the mask's time).
pub const STEP_FUEL: u64 = 200_000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FormatError {
    #[error(
        "response_format {kind} is {len} bytes, over the limit of {MAX_FORMAT_BYTES}; send a smaller one"
    )]
    TooLarge { kind: &'static str, len: usize },
    #[error("response_format {kind} is empty; give a schema, regex or grammar")]
    Empty { kind: &'static str },
    #[error("response_format json_schema is not valid JSON: {0}")]
    NotJson(String),
    #[error(
        "response_format json_schema nests deeper than {MAX_SCHEMA_DEPTH} levels at {at}; flatten it or use $defs"
    )]
    TooDeep { at: String },
    #[error("response_format {kind} cannot be compiled: {why}")]
    Invalid { kind: &'static str, why: String },
    #[error("the grammar engine could not be set up for this model's vocabulary: {0}")]
    Setup(String),
    #[error(
        "constrained decoding stopped: {0} (the format needed more work per token than allowed, or the engine is at fault)"
    )]
    Step(String),
}

/// The model's vocabulary as llguidance sees it: each token's bytes (special
/// tokens marked), and our own BPE for the bytes a grammar forces.
struct Vocab {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocab {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self.tokenizer.encode(text, false, false),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// The compiler of response formats for one model's vocabulary (building
/// it indexes the vocabulary: ~0.25 s for 65,536 tokens; once per model).
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Result<Self, FormatError> {
        let n = tokenizer.n_vocab();
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|id| {
                let bytes = tokenizer.token_bytes(id).unwrap_or_default();
                let special = !matches!(
                    tokenizer.token_kind(id),
                    Some(TokenKind::Normal | TokenKind::Byte)
                );
                if special || bytes.is_empty() {
                    // llguidance's mark of a special token: never text.
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    match tokenizer.token_text(id) {
                        Some(t) if !t.is_empty() => w.extend_from_slice(t.as_bytes()),
                        _ => w.extend_from_slice(format!("<[{id}]>").as_bytes()),
                    }
                    w
                } else {
                    bytes.to_vec()
                }
            })
            .collect();
        let eog = end_of_generation_ids(&tokenizer);
        let Some(&first) = eog.first() else {
            return Err(FormatError::Setup(
                "the vocabulary has no end-of-generation token (EOS, <|im_end|>)".into(),
            ));
        };
        let mut info = TokRxInfo::new(n as u32, first);
        info.tok_bos = tokenizer.bos();
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eog);
        let env: TokEnv = Arc::new(Vocab { trie, tokenizer });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| FormatError::Setup(e.to_string()))?;
        factory.quiet();
        let limits = factory.limits_mut();
        limits.max_grammar_size = MAX_GRAMMAR_SYMBOLS;
        limits.initial_lexer_fuel = COMPILE_FUEL;
        limits.step_lexer_fuel = STEP_FUEL;
        limits.verbose_errors = false;
        Ok(Grammars { factory })
    }

    /// Compiles `format`: refused with what is wrong when it is too large,
    /// too deep, or not a valid or supported schema, regex or grammar.
    pub fn compile(&self, format: &ResponseFormat) -> Result<Constraint, FormatError> {
        let kind = format.kind();
        let len = format.text().len();
        if len > MAX_FORMAT_BYTES {
            return Err(FormatError::TooLarge { kind, len });
        }
        if len == 0 && !matches!(format, ResponseFormat::JsonObject) {
            return Err(FormatError::Empty { kind });
        }
        let grammar = match format {
            ResponseFormat::JsonSchema(text) => {
                let schema: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| FormatError::NotJson(e.to_string()))?;
                check_depth(&schema, "#", 0)?;
                TopLevelGrammar::from_json_schema(json_layout(schema))
            }
            ResponseFormat::JsonObject => TopLevelGrammar::from_json_schema(json_layout(
                serde_json::json!({"type": "object"}),
            )),
            ResponseFormat::Regex(rx) => TopLevelGrammar::from_regex(rx),
            ResponseFormat::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        };
        self.build(kind, grammar)
    }

    fn build(
        &self,
        kind: &'static str,
        grammar: TopLevelGrammar,
    ) -> Result<Constraint, FormatError> {
        let invalid = |why: String| FormatError::Invalid { kind, why };
        // A grammar the compiler trips over is this request's fault alone.
        let parser = catch_unwind(AssertUnwindSafe(|| self.factory.create_parser(grammar)))
            .map_err(|_| invalid("the grammar compiler failed on it".into()))?
            .map_err(|e| invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(e));
        }
        Ok(Constraint { matcher })
    }
}

/// Compact JSON with the usual separators (`{"a": 1, "b": [2, 3]}`) unless
/// the schema sets llguidance's own `x-guidance` options: flexible
/// whitespace lets a model pad its output without end.
pub(crate) fn json_layout(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(obj) = schema.as_object_mut()
        && !obj.contains_key("x-guidance")
    {
        let opts = JsonCompileOptions {
            item_separator: ", ".into(),
            key_separator: ": ".into(),
            whitespace_flexible: false,
            ..Default::default()
        };
        opts.apply_to(&mut schema);
    }
    schema
}

/// Refuses a schema nested deeper than [`MAX_SCHEMA_DEPTH`], naming where.
fn check_depth(v: &serde_json::Value, at: &str, depth: usize) -> Result<(), FormatError> {
    if depth > MAX_SCHEMA_DEPTH {
        return Err(FormatError::TooDeep { at: at.to_owned() });
    }
    match v {
        serde_json::Value::Object(o) => o
            .iter()
            .try_for_each(|(k, v)| check_depth(v, &format!("{at}/{k}"), depth + 1)),
        serde_json::Value::Array(a) => a
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| check_depth(v, &format!("{at}/{i}"), depth + 1)),
        _ => Ok(()),
    }
}

/// One sequence's position in its format.
pub struct Constraint {
    matcher: Matcher,
}

impl Clone for Constraint {
    /// An independent copy at the same position (its own lexer caches).
    fn clone(&self) -> Self {
        Constraint {
            matcher: self.matcher.deep_clone(),
        }
    }
}

impl Constraint {
    /// The tokens allowed next, as bits (token `t` is bit `t % 32` of word
    /// `t / 32`).
    pub fn allowed(&mut self) -> Result<Vec<u32>, FormatError> {
        let mask = self
            .matcher
            .compute_mask()
            .map_err(|e| FormatError::Step(e.to_string()))?;
        Ok(mask.as_slice().to_vec())
    }

    /// Records the token that was sampled (one [`Constraint::allowed`] let
    /// through).
    pub fn accept(&mut self, token: u32) -> Result<(), FormatError> {
        self.matcher
            .consume_token(token)
            .map_err(|e| FormatError::Step(e.to_string()))
    }

    /// The output is complete and nothing may follow it (generation ends).
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// The output so far is a whole match (it may also go on).
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }
}
