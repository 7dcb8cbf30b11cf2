//! `lfmd generate`: one completion (or chat turn) on the command line,
//! streamed as it is sampled.

use anyhow::{Context, Result, bail};
use std::path::PathBuf;

#[derive(clap::Args)]
pub(crate) struct GenerateArgs {
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Wrap the prompt as a user turn of the model's chat template.
    #[arg(long)]
    pub(crate) chat: bool,
    /// System prompt (implies --chat).
    #[arg(long)]
    pub(crate) system: Option<String>,
    #[arg(long, default_value_t = 0.3)]
    pub(crate) temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub(crate) top_p: f32,
    #[arg(long, default_value_t = 0.15)]
    pub(crate) min_p: f32,
    #[arg(long, default_value_t = 1.05)]
    pub(crate) repeat_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub(crate) presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub(crate) frequency_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    #[arg(long, default_value_t = 256)]
    pub(crate) max_tokens: usize,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    pub(crate) stop: Vec<String>,
    /// Compute threads (default: one per core).
    #[arg(short = 't', long)]
    pub(crate) threads: Option<usize>,
    /// Print ids, text and timings as JSON at the end instead of streaming.
    #[arg(long)]
    pub(crate) json: bool,
    pub(crate) prompt: String,
}

pub(crate) fn generate(a: GenerateArgs) -> Result<()> {
    use lfmd::engine::{BatchItem, EngineOptions, LogitsWanted, Model};
    use lfmd::sequence::Sequence;
    use std::io::Write;
    let params = lfmd::sampler::SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        seed: a.seed,
        ..Default::default()
    };
    params.validate()?;
    if a.prompt.is_empty() {
        bail!("the prompt is empty: give some text to continue");
    }
    let stop = lfmd::stop::StopText::new(a.stop.clone())?;
    let opts = EngineOptions {
        threads: a.threads,
        ..Default::default()
    };
    let model = Model::open_with(&a.model, opts)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let tok = std::sync::Arc::new(lfmd::tokenizer::Tokenizer::from_gguf(model.gguf())?);
    let prompt_text = if a.chat || a.system.is_some() {
        let template = match model
            .gguf()
            .get("tokenizer.chat_template")
            .and_then(lfmd::gguf::Value::as_str)
        {
            Some(src) => lfmd::chat::ChatTemplate::new(src)?,
            None => lfmd::chat::ChatTemplate::builtin(),
        };
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(lfmd::chat::ChatMessage::new("system", s.clone()));
        }
        msgs.push(lfmd::chat::ChatMessage::new("user", a.prompt.clone()));
        let bos = tok
            .bos()
            .and_then(|b| tok.piece(b, true))
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        template.render(&msgs, None, true, &bos)?
    } else {
        a.prompt.clone()
    };
    // A rendered chat template already starts with BOS.
    let add_bos = tok.special_ids().add_bos && !(a.chat || a.system.is_some());
    let prompt = tok.encode(&prompt_text, add_bos, true);
    if prompt.len() >= model.desc.n_ctx_train {
        bail!(
            "the prompt is {} tokens; the model's context holds {}",
            prompt.len(),
            model.desc.n_ctx_train
        );
    }
    let mut seq = Sequence::new(
        &model,
        tok.clone(),
        prompt.clone(),
        params,
        a.max_tokens,
        stop,
    );
    let t0 = std::time::Instant::now();
    let mut t_first = None;
    let mut text = String::new();
    let mut out = std::io::stdout().lock();
    const PREFILL_CHUNK: usize = 512;
    while !seq.is_finished() {
        let chunk = seq.next_input(PREFILL_CHUNK).to_vec();
        let want = seq.needs_logits(chunk.len());
        let logits = model.forward(&mut [BatchItem {
            state: &mut seq.state,
            tokens: &chunk,
            logits: if want {
                LogitsWanted::Last
            } else {
                LogitsWanted::None
            },
        }])?;
        if let Some(step) = seq.advance(chunk.len(), want.then(|| &logits[0][..]))? {
            t_first.get_or_insert_with(|| t0.elapsed());
            if !a.json {
                let _ = out
                    .write_all(step.text.as_bytes())
                    .and_then(|()| out.flush());
            }
            text.push_str(&step.text);
        }
    }
    let total = t0.elapsed();
    let reason = seq.finish_reason().map_or("unknown", |r| r.as_str());
    if a.json {
        let ttft = t_first.unwrap_or(total).as_secs_f64();
        let n = seq.generated().len();
        let v = serde_json::json!({
            "prompt_ids": prompt,
            "ids": seq.generated(),
            "text": text,
            "finish_reason": reason,
            "prompt_tokens": prompt.len(),
            "generated_tokens": n,
            "time_to_first_token_s": ttft,
            "total_s": total.as_secs_f64(),
            "prefill_tokens_per_s": prompt.len() as f64 / ttft.max(1e-9),
            "decode_tokens_per_s": if n > 1 { (n - 1) as f64 / (total.as_secs_f64() - ttft).max(1e-9) } else { 0.0 },
            "memory": lfmd::procstat::memory(),
        });
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&v)?);
    } else {
        let _ = writeln!(out);
        eprintln!(
            "[{reason}; {} prompt + {} generated tokens in {:.2}s]",
            prompt.len(),
            seq.generated().len(),
            total.as_secs_f64()
        );
    }
    Ok(())
}
