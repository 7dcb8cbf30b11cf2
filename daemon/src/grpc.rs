//! The gRPC edge: the `lfm.v1.Lfm` service over the scheduler. It converts
//! wire messages to scheduler types and back and maps errors to status
//! codes; no model logic lives here. The only module (with `serve`) that
//! knows prost/tonic types.

use crate::constraint::ResponseFormat;
use crate::engine::PagingStats;
use crate::sampler::SamplingParams;
use crate::scheduler::{
    self, Client, Edge, ErrorKind, Event, Failure, Handle, Input, Options, Priority, SubmitError,
};
use crate::sequence::FinishReason;
use crate::tools::{Tool, ToolCall};
use lfm_proto::v1 as pb;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::Stream;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Code, Request, Response, Status};

/// Largest request message the daemon decodes (tonic's default is 4 MiB).
/// Big enough that an oversized prompt reaches the scheduler and gets its
/// explanation; bigger messages get the transport's `OUT_OF_RANGE`.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// Trailer of a RESOURCE_EXHAUSTED answer: milliseconds to wait before
/// retrying (gRPC's retry pushback).
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

pub struct LfmService {
    handle: Handle,
}

impl LfmService {
    pub fn new(handle: Handle) -> Self {
        LfmService { handle }
    }
}

/// Who is calling: the peer process on a Unix socket (fairness per process,
/// sessions per user), the peer address on TCP.
fn client_of<T>(req: &Request<T>) -> Client {
    if let Some(cred) = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
    {
        return Client::peer(cred.uid(), cred.pid(), Edge::Grpc);
    }
    // TCP peers have no credentials: they share one owner (and one
    // per-user budget).
    match req.remote_addr() {
        Some(a) => Client::anonymous("tcp", format!("tcp:{a}"), Edge::Grpc),
        None => Client::anonymous("unknown", "unknown".into(), Edge::Grpc),
    }
}

/// The request's deadline from its `grpc-timeout` header.
fn deadline_of(md: &MetadataMap) -> Option<Instant> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(v).map(|d| Instant::now() + d)
}

/// `grpc-timeout` is 1 to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn priority_from(p: i32) -> Result<Priority, Status> {
    match pb::Priority::try_from(p) {
        Ok(pb::Priority::Unspecified | pb::Priority::Interactive) => Ok(Priority::Interactive),
        Ok(pb::Priority::Background) => Ok(Priority::Background),
        Err(_) => Err(Status::invalid_argument(format!(
            "priority {p} is unknown; use PRIORITY_INTERACTIVE (1) or PRIORITY_BACKGROUND (2)"
        ))),
    }
}

fn options_from(o: Option<pb::SamplingOptions>) -> Options {
    let o = o.unwrap_or_default();
    let d = SamplingParams::default();
    Options {
        sampling: SamplingParams {
            temperature: o.temperature.unwrap_or(d.temperature),
            top_k: o.top_k.map_or(d.top_k, |k| k as usize),
            top_p: o.top_p.unwrap_or(d.top_p),
            min_p: o.min_p.unwrap_or(d.min_p),
            repeat_penalty: o.repeat_penalty.unwrap_or(d.repeat_penalty),
            presence_penalty: o.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: o.frequency_penalty.unwrap_or(d.frequency_penalty),
            seed: o.seed.unwrap_or(d.seed),
            ..d
        },
        max_tokens: o.max_tokens.map(|m| m as usize),
        stop: o.stop,
        ignore_eos: o.ignore_eos.unwrap_or(false),
        format: o.response_format.and_then(|f| format_from(f.format)),
        ..Default::default()
    }
}

/// A `ResponseFormat`'s choice in engine terms (`json_object: false` and an
/// unset oneof are no constraint).
fn format_from(f: Option<pb::response_format::Format>) -> Option<ResponseFormat> {
    use pb::response_format::Format as F;
    match f? {
        F::JsonSchema(s) => Some(ResponseFormat::JsonSchema(s)),
        F::JsonObject(true) => Some(ResponseFormat::JsonObject),
        F::JsonObject(false) => None,
        F::Regex(r) => Some(ResponseFormat::Regex(r)),
        F::Lark(g) => Some(ResponseFormat::Lark(g)),
    }
}

/// What a `GenerateRequest` asks for, in scheduler terms. Pure: the
/// handler, the tests and the request fuzzer all convert through this.
pub fn generate_parts(r: pb::GenerateRequest) -> Result<(Input, Options, Priority), Status> {
    let priority = priority_from(r.priority)?;
    let input = Input::Prompt {
        text: r.prompt,
        add_bos: r.add_bos,
    };
    Ok((input, options_from(r.options), priority))
}

/// What a `ChatRequest` asks for, in scheduler terms (see [`generate_parts`]).
pub fn chat_parts(r: pb::ChatRequest) -> Result<(Input, Options, Priority), Status> {
    let priority = priority_from(r.priority)?;
    let mut messages = Vec::with_capacity(r.messages.len());
    for (i, m) in r.messages.into_iter().enumerate() {
        let mut message = crate::chat::ChatMessage::new(m.role, m.content);
        if !m.tool_calls.is_empty() {
            let calls = m
                .tool_calls
                .into_iter()
                .enumerate()
                .map(|(j, c)| {
                    let arguments = json_object(&c.arguments).ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "messages[{i}].tool_calls[{j}].arguments is not a JSON object: send the arguments Done.tool_calls gave, e.g. {{\"level\": 30}}"
                        ))
                    })?;
                    Ok(ToolCall {
                        id: c.id,
                        name: c.name,
                        arguments,
                    })
                })
                .collect::<Result<Vec<_>, Status>>()?;
            message.tool_calls = calls;
        }
        messages.push(message);
    }
    let input = Input::Chat {
        messages,
        session: r.session_id,
    };
    let mut options = options_from(r.options);
    options.tools = r
        .tools
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let parameters = if t.parameters.trim().is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_str(&t.parameters).map_err(|e| {
                    Status::invalid_argument(format!(
                        "tools[{i}] ({:?}).parameters is not JSON: {e}; give a JSON Schema of type object, or leave it empty",
                        t.name
                    ))
                })?
            };
            Ok(Tool {
                name: t.name,
                description: t.description,
                parameters,
            })
        })
        .collect::<Result<_, Status>>()?;
    options.tool_choice = r
        .tool_choice
        .as_deref()
        .unwrap_or("auto")
        .parse()
        .unwrap_or_default();
    Ok((input, options, priority))
}

/// `text` as a JSON object (an empty text is no arguments).
fn json_object(text: &str) -> Option<serde_json::Value> {
    if text.trim().is_empty() {
        return Some(serde_json::json!({}));
    }
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .filter(serde_json::Value::is_object)
}

fn calls_to_pb(calls: Vec<ToolCall>) -> Vec<pb::ToolCall> {
    calls
        .into_iter()
        .map(|c| pb::ToolCall {
            id: c.id,
            name: c.name,
            arguments: c.arguments.to_string(),
        })
        .collect()
}

/// The status code of each class of error.
fn code_of(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::OutOfRange => Code::OutOfRange,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::Internal => Code::Internal,
    }
}

/// The status a refused request gets.
pub fn status_from(e: SubmitError) -> Status {
    let code = code_of(e.kind());
    let msg = e.to_string();
    if let SubmitError::QueueFull { retry_after, .. } = e {
        let mut md = MetadataMap::new();
        md.insert(
            RETRY_PUSHBACK,
            MetadataValue::from(retry_after.as_millis() as u64),
        );
        return Status::with_metadata(code, msg, md);
    }
    Status::new(code, msg)
}

fn failure_status(f: Failure) -> Status {
    Status::new(code_of(f.kind()), f.to_string())
}

fn finish_reason(r: &FinishReason) -> pb::FinishReason {
    match r {
        FinishReason::Eos | FinishReason::Complete => pb::FinishReason::Stop,
        FinishReason::StopString => pb::FinishReason::StopString,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::ContextFull => pb::FinishReason::ContextFull,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
    }
}

fn response(ev: Event) -> Result<pb::GenerateResponse, Status> {
    use pb::generate_response::Event as E;
    let event = match ev {
        Event::Delta(d) => E::Delta(pb::Delta {
            text: d.text,
            token_ids: d.tokens,
            tool_calls: calls_to_pb(d.tool_calls),
        }),
        Event::Done(d) => {
            let s = &d.stats;
            let reason = match d.reason {
                FinishReason::Eos | FinishReason::Complete if !d.tool_calls.is_empty() => {
                    pb::FinishReason::ToolCalls
                }
                ref r => finish_reason(r),
            };
            E::Done(pb::Done {
                finish_reason: reason.into(),
                stats: Some(pb::GenerationStats {
                    prompt_tokens: s.prompt_tokens as u32,
                    prefilled_tokens: s.prefilled_tokens as u32,
                    generated_tokens: s.generated_tokens as u32,
                    queue_seconds: s.queue.as_secs_f64(),
                    time_to_first_token_seconds: s.time_to_first_token.as_secs_f64(),
                    total_seconds: s.total.as_secs_f64(),
                    decode_tokens_per_second: s.decode_tokens_per_second(),
                    prefill_tokens_per_second: s.prefill_tokens_per_second(),
                }),
                session_id: d.session,
                output_incomplete: d.output_incomplete,
                tool_calls: calls_to_pb(d.tool_calls),
            })
        }
        Event::Failed(f) => return Err(failure_status(f)),
    };
    Ok(pb::GenerateResponse { event: Some(event) })
}

/// A request's events as a response stream. Dropping it (the client went
/// away, or its deadline passed) drops the receiver, which cancels the
/// request at the engine's next step.
pub struct EventStream {
    events: UnboundedReceiver<Event>,
    ended: bool,
}

impl Stream for EventStream {
    type Item = Result<pb::GenerateResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let item = match std::task::ready!(self.events.poll_recv(cx)) {
            Some(ev) => {
                self.ended = !matches!(ev, Event::Delta(_));
                response(ev)
            }
            None => {
                self.ended = true;
                Err(Status::internal(
                    "the lfmd engine stopped before finishing this request; see the daemon's log",
                ))
            }
        };
        Poll::Ready(Some(item))
    }
}

impl LfmService {
    /// Submits on a blocking thread: rendering and tokenizing a long prompt
    /// takes milliseconds that the I/O threads should not spend.
    async fn submit(
        &self,
        input: Input,
        options: Options,
        client: Client,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Result<Response<EventStream>, Status> {
        let handle = self.handle.clone();
        crate::debug!(
            "{} request from {} (uid {}, pid {})",
            match &input {
                Input::Prompt { .. } => "generate",
                Input::Chat { .. } => "chat",
            },
            client.id,
            client.uid.map_or("-".into(), |u| u.to_string()),
            client.pid.map_or("-".into(), |p| p.to_string()),
        );
        let req = scheduler::Request {
            input,
            options,
            client,
            priority,
            deadline,
        };
        let generation = tokio::task::spawn_blocking(move || handle.submit(req))
            .await
            .map_err(|e| Status::internal(format!("preparing the request failed: {e}")))?
            .map_err(status_from)?;
        Ok(Response::new(EventStream {
            events: generation.into_receiver(),
            ended: false,
        }))
    }
}

#[tonic::async_trait]
impl pb::lfm_server::Lfm for LfmService {
    type GenerateStream = EventStream;
    type ChatStream = EventStream;

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let (client, deadline) = (client_of(&req), deadline_of(req.metadata()));
        let (input, options, priority) = generate_parts(req.into_inner())?;
        self.submit(input, options, client, priority, deadline)
            .await
    }

    async fn chat(&self, req: Request<pb::ChatRequest>) -> Result<Response<EventStream>, Status> {
        let (client, deadline) = (client_of(&req), deadline_of(req.metadata()));
        let (input, options, priority) = chat_parts(req.into_inner())?;
        self.submit(input, options, client, priority, deadline)
            .await
    }

    async fn tokenize(
        &self,
        req: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let r = req.into_inner();
        let handle = self.handle.clone();
        // Megabytes of text take a while: keep it off the I/O threads.
        let token_ids = tokio::task::spawn_blocking(move || {
            handle.tokenize(&r.text, r.add_bos, r.parse_special.unwrap_or(true))
        })
        .await
        .map_err(|e| Status::internal(format!("tokenizing failed: {e}")))?;
        Ok(Response::new(pb::TokenizeResponse { token_ids }))
    }

    async fn detokenize(
        &self,
        req: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let text = self
            .handle
            .detokenize(&req.into_inner().token_ids)
            .map_err(status_from)?;
        Ok(Response::new(pb::DetokenizeResponse { text }))
    }

    async fn get_model_info(
        &self,
        _req: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let m = self.handle.model_info();
        Ok(Response::new(pb::ModelInfo {
            path: m.path.clone(),
            architecture: m.architecture.clone(),
            name: m.name.clone(),
            file_type: m.file_type.clone(),
            file_bytes: m.file_bytes,
            n_params: m.n_params,
            n_layer: m.n_layer as u32,
            n_embd: m.n_embd as u32,
            n_vocab: m.n_vocab as u32,
            n_expert: m.n_expert as u32,
            n_expert_used: m.n_expert_used as u32,
            n_ctx_train: m.n_ctx_train as u32,
            context_tokens: m.context as u32,
            has_chat_template: m.has_chat_template,
            isa: m.isa.clone(),
            threads: m.threads as u32,
        }))
    }

    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::DaemonStatus>, Status> {
        let experts = req.get_ref().experts;
        let s = self.handle.status();
        // With `experts`, residency is read from the page tables: off the
        // runtime either way (the pager's lock).
        let handle = self.handle.clone();
        let paging = tokio::task::spawn_blocking(move || handle.paging_stats(experts))
            .await
            .ok()
            .flatten()
            .map(|p| paging_pb(p, experts));
        let m = self.handle.model_info();
        let mem = s.memory.unwrap_or_default();
        Ok(Response::new(pb::DaemonStatus {
            active_requests: s.active as u32,
            queued_requests: s.queued as u32,
            max_concurrent: s.max_concurrent as u32,
            queue_capacity: s.queue_capacity as u32,
            sessions: s.sessions as u32,
            requests_total: s.requests_total,
            prompt_tokens_total: s.prompt_tokens_total,
            generated_tokens_total: s.generated_tokens_total,
            generated_tokens_per_second: s.generated_tokens_per_second,
            prefill_tokens_per_second: s.prefill_tokens_per_second,
            isa: m.isa.clone(),
            threads: m.threads as u32,
            uptime_seconds: s.uptime.as_secs_f64(),
            rss_bytes: mem.rss_bytes,
            rss_anon_bytes: mem.rss_anon_bytes,
            rss_file_bytes: mem.rss_file_bytes,
            peak_rss_bytes: mem.peak_rss_bytes,
            version: env!("CARGO_PKG_VERSION").into(),
            paging,
            prefix_cache: Some(pb::PrefixCache {
                entries: s.prefix_cache.entries as u64,
                bytes: s.prefix_cache.bytes,
                limit_bytes: s.prefix_cache.limit_bytes,
                hits: s.prefix_cache.hits,
                misses: s.prefix_cache.misses,
                tokens_saved: s.prefix_cache.tokens_saved,
            }),
        }))
    }
}

/// The pager's figures on the wire; per-expert counters only when asked.
fn paging_pb(p: PagingStats, experts: bool) -> pb::ExpertPaging {
    let layers = if experts {
        p.layer_ids
            .iter()
            .zip(p.experts)
            .map(|(&layer, ex)| pb::ExpertLayer {
                layer: layer as u32,
                experts: ex
                    .into_iter()
                    .map(|e| pb::ExpertCounters {
                        hits: e.hits,
                        resident: e.resident,
                        locked: e.locked,
                        loads: e.loads,
                        bytes_in: e.bytes_in,
                        evictions: e.evictions,
                    })
                    .collect(),
            })
            .collect()
    } else {
        Vec::new()
    };
    pb::ExpertPaging {
        budget_mode: p.budget_mode,
        budget_bytes: p.budget_bytes,
        fixed_bytes: p.fixed_bytes,
        expert_resident_bytes: p.expert_resident_bytes,
        expert_cap_bytes: p.expert_cap_bytes,
        expert_total_bytes: p.expert_total_bytes,
        locked_bytes: p.locked_bytes,
        loads: p.loads,
        bytes_in: p.bytes_in,
        load_seconds: p.load_seconds,
        evictions: p.evictions,
        predictions: p.predictions,
        predictions_used: p.predictions_used,
        major_faults: p.major_faults,
        memory_pressure: p.memory_pressure,
        layers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::SessionError;
    use proptest::prelude::*;

    #[test]
    fn grpc_timeouts_parse_and_garbage_does_not() {
        assert_eq!(
            parse_grpc_timeout("1500m"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "12", "1x", "-1S", "123456789S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn unset_options_take_the_documented_defaults() {
        let o = options_from(None);
        assert_eq!(o.sampling, SamplingParams::default());
        assert_eq!((o.max_tokens, o.stop.len(), o.ignore_eos), (None, 0, false));
        let o = options_from(Some(pb::SamplingOptions {
            temperature: Some(0.0),
            top_k: Some(5),
            max_tokens: Some(7),
            ..Default::default()
        }));
        assert_eq!((o.sampling.temperature, o.sampling.top_k), (0.0, 5));
        assert_eq!(o.sampling.min_p, 0.15);
        assert_eq!(o.max_tokens, Some(7));
        assert!(priority_from(9).is_err());
        assert_eq!(priority_from(0).unwrap(), Priority::Interactive);
        assert_eq!(priority_from(2).unwrap(), Priority::Background);
    }

    #[test]
    fn errors_map_to_the_documented_codes() {
        let s = status_from(SubmitError::QueueFull {
            queued: 4,
            max_concurrent: 2,
            retry_after: Duration::from_millis(1500),
        });
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(s.metadata().get(RETRY_PUSHBACK).unwrap(), "1500");
        assert!(s.message().contains("--queue"), "{}", s.message());
        assert_eq!(
            status_from(SubmitError::Invalid("x".into())).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            status_from(SubmitError::TooLong("x".into())).code(),
            Code::OutOfRange
        );
        assert_eq!(
            status_from(SubmitError::ShuttingDown).code(),
            Code::Unavailable
        );
        assert_eq!(
            status_from(SubmitError::Session(SessionError::Busy("s".into()))).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            failure_status(Failure::DeadlineExceeded).code(),
            Code::DeadlineExceeded
        );
    }

    /// Floats at and around every documented bound, and non-finite ones.
    fn edgy_f32() -> impl Strategy<Value = f32> {
        prop_oneof![
            prop::sample::select(vec![
                0.0,
                -0.0,
                1.0,
                10.0,
                -10.0,
                100.0,
                f32::MIN_POSITIVE,
                1.0 + f32::EPSILON,
                10.000_001,
                -10.000_001,
                100.000_01,
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MAX,
            ]),
            -200.0f32..200.0,
            any::<f32>(),
        ]
    }

    fn any_options() -> impl Strategy<Value = pb::SamplingOptions> {
        let stop = prop_oneof![
            Just(String::new()),
            "[a-z<|>]{1,8}",
            Just("x".repeat(256)),
            Just("y".repeat(257)),
        ];
        (
            prop::array::uniform7(prop::option::of(edgy_f32())),
            prop::option::of(any::<u32>()),
            prop::option::of(prop_oneof![Just(0u32), Just(1), any::<u32>()]),
            prop::collection::vec(stop, 0..20),
            prop::option::of(any::<u64>()),
        )
            .prop_map(|(f, top_k, max_tokens, stop, seed)| pb::SamplingOptions {
                temperature: f[0],
                top_p: f[1],
                min_p: f[2],
                repeat_penalty: f[3],
                presence_penalty: f[4],
                frequency_penalty: f[5],
                top_k,
                seed,
                max_tokens,
                stop,
                ignore_eos: f[6].map(|x| x > 0.0),
                response_format: None,
            })
    }

    /// The ranges `lfm.proto` documents, written out independently of
    /// `SamplingParams::validate`.
    fn documented(o: &pb::SamplingOptions) -> bool {
        let within = |v: Option<f32>, ok: fn(f32) -> bool| v.is_none_or(ok);
        within(o.temperature, |t| (0.0..=100.0).contains(&t))
            && within(o.top_p, |p| p > 0.0 && p <= 1.0)
            && within(o.min_p, |m| (0.0..=1.0).contains(&m))
            && within(o.repeat_penalty, |r| r > 0.0 && r <= 10.0)
            && within(o.presence_penalty, |p| (-10.0..=10.0).contains(&p))
            && within(o.frequency_penalty, |p| (-10.0..=10.0).contains(&p))
            && o.max_tokens != Some(0)
            && o.stop.len() <= 16
            && o.stop.iter().all(|s| (1..=256).contains(&s.len()))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn options_are_accepted_exactly_in_their_documented_ranges(o in any_options()) {
            let want = documented(&o);
            let r = pb::GenerateRequest {
                prompt: "x".into(),
                options: Some(o.clone()),
                ..Default::default()
            };
            let (input, options, _) = generate_parts(r).unwrap();
            let got = scheduler::validate(&input, &options);
            prop_assert_eq!(got.is_ok(), want, "{:?}: {:?}", o, got.err());
            if let Err(e) = got {
                prop_assert_eq!(status_from(e).code(), Code::InvalidArgument);
            }
        }

        #[test]
        fn decoded_bytes_get_exactly_the_documented_verdict(
            raw in prop::collection::vec(any::<u8>(), 0..256),
            generate in (any_options(), prop_oneof![Just(String::new()), "[a-z ]{1,12}"]),
            chat in (any_options(), prop::collection::vec(prop_oneof![Just(String::new()), "[a-z]{1,9}"], 0..4),
                     prop::option::of(prop_oneof![Just(0usize), Just(1), Just(128), Just(129)])),
            flip in prop::option::of((any::<prop::sample::Index>(), any::<u8>())),
            which in 0u8..3,
        ) {
            use prost::Message;
            // Bytes off the wire: noise, or a real request's encoding with
            // perhaps one byte changed (so most cases decode to something).
            let mut bytes = match which {
                0 => raw,
                1 => pb::GenerateRequest {
                    prompt: generate.1.clone(),
                    options: Some(generate.0.clone()),
                    ..Default::default()
                }.encode_to_vec(),
                _ => pb::ChatRequest {
                    messages: chat.1.iter().map(|role| pb::ChatMessage { role: role.clone(), content: "hi".into(), ..Default::default() }).collect(),
                    options: Some(chat.0.clone()),
                    session_id: chat.2.map(|n| "s".repeat(n)),
                    ..Default::default()
                }.encode_to_vec(),
            };
            if let (Some((at, b)), false) = (flip, bytes.is_empty()) {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            // A message that does not decode is the transport's (tonic
            // answers INTERNAL before any handler); one that does gets the
            // verdict the documented rules give, written out here again.
            let options_ok = |o: &Option<pb::SamplingOptions>| o.as_ref().is_none_or(documented);
            let (parts, want) = if which == 2 {
                let Ok(r) = pb::ChatRequest::decode(&bytes[..]) else { return Ok(()) };
                let want = options_ok(&r.options)
                    && (0..=2).contains(&r.priority)
                    && !r.messages.is_empty()
                    && r.messages.iter().all(|m| !m.role.is_empty())
                    && r.session_id.as_ref().is_none_or(|s| (1..=128).contains(&s.len()));
                (chat_parts(r), want)
            } else {
                let Ok(r) = pb::GenerateRequest::decode(&bytes[..]) else { return Ok(()) };
                let want = options_ok(&r.options) && (0..=2).contains(&r.priority) && !r.prompt.is_empty();
                (generate_parts(r), want)
            };
            let verdict = parts.and_then(|(input, options, _)| {
                scheduler::validate(&input, &options).map_err(status_from)
            });
            prop_assert_eq!(verdict.is_ok(), want, "{:?}", verdict.as_ref().err());
            if let Err(status) = verdict {
                prop_assert_eq!(status.code(), Code::InvalidArgument);
                prop_assert!(!status.message().is_empty());
            }
        }

        #[test]
        fn chat_requests_are_checked_before_any_model_work(
            roles in prop::collection::vec(prop_oneof![Just(String::new()), "[a-z]{1,9}"], 0..4),
            session in prop::option::of(prop_oneof![Just(0usize), Just(1), Just(128), Just(129), 0usize..300]),
        ) {
            let r = pb::ChatRequest {
                messages: roles
                    .iter()
                    .map(|role| pb::ChatMessage { role: role.clone(), content: "hi".into(), ..Default::default() })
                    .collect(),
                session_id: session.map(|n| "s".repeat(n)),
                ..Default::default()
            };
            let (input, options, _) = chat_parts(r).unwrap();
            let want = !roles.is_empty()
                && roles.iter().all(|r| !r.is_empty())
                && session.is_none_or(|n| (1..=128).contains(&n));
            prop_assert_eq!(scheduler::validate(&input, &options).is_ok(), want);
        }
    }
}
