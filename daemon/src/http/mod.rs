//! The HTTP edge: OpenAI-compatible routes (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/models`), `/metrics` (OpenMetrics) and
//! `/health`, on the same scheduler, limits and per-user accounting as
//! gRPC and D-Bus. axum routes, hyper serves HTTP/1.1 connections we
//! accept ourselves, so each request knows its peer (SO_PEERCRED on Unix
//! sockets) and every connection has a header timeout and a slot.
//!
//! The edge starts before the model is loaded (with socket activation, the
//! first request is what starts the daemon): until [`HttpEdge::ready`],
//! `/health` and `/metrics` answer 503 (`loading`) at once while the other
//! routes wait for the model (at most [`LOAD_WAIT`]); after
//! [`HttpEdge::stopping`] new work gets 503 while running answers finish.

pub mod metrics;
pub mod openai;

use crate::scheduler::{self, Client, Edge, Event, Handle};
use crate::serve::Bound;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{self, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use openai::{Answer, ApiError, Call};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::sync::{Semaphore, mpsc::UnboundedReceiver, watch};
use tokio::task::JoinHandle;
use tokio_stream::Stream;

/// Longest a client may take to send a request's headers (also how long an
/// idle keep-alive connection stays open).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request's body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once over all HTTP listeners (fewer if the open
/// files limit is low: see [`connection_slots`]); more are closed as they
/// arrive (the others, and gRPC and D-Bus, are not disturbed).
pub const MAX_CONNECTIONS: usize = 2048;

/// Open files kept for everything but HTTP connections (the model, gRPC
/// and D-Bus clients, /proc reads).
const RESERVED_FILES: u64 = 256;

/// Raises the soft limit of open files to the hard one (at most 65,536);
/// returns the limit in force. Under lfmd.service, whose system call filter
/// refuses setrlimit, the unit's `LimitNOFILE=` sets it instead.
pub fn raise_open_files() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let want = lim.maximum.map_or(65_536, |m| m.min(65_536));
    let current = lim.current.unwrap_or(u64::MAX);
    if current < want {
        let raised = Rlimit {
            current: Some(want),
            maximum: lim.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return want;
        }
    }
    current
}

/// HTTP connections served at once with `open_files` allowed.
pub fn connection_slots(open_files: u64) -> usize {
    let spare = open_files.saturating_sub(RESERVED_FILES).max(16);
    usize::try_from(spare).map_or(MAX_CONNECTIONS, |s| s.min(MAX_CONNECTIONS))
}

/// Longest a request that arrives while the model loads waits for it.
pub const LOAD_WAIT: Duration = Duration::from_secs(120);

const STARTING: u8 = 0;
const READY: u8 = 1;
const STOPPING: u8 = 2;

/// What every handler shares.
struct AppState {
    handle: OnceLock<Handle>,
    /// STARTING, READY or STOPPING.
    phase: watch::Sender<u8>,
    /// `created` of the model object: when the daemon started.
    started: u64,
    next_id: AtomicU64,
}

impl AppState {
    /// The scheduler, or 503 while loading or stopping.
    fn handle(&self) -> Result<&Handle, ApiError> {
        match (*self.phase.borrow(), self.handle.get()) {
            (READY, Some(h)) => Ok(h),
            (STOPPING, _) => Err(unavailable(
                "lfmd is shutting down; retry once it is running again",
            )),
            _ => Err(unavailable(
                "lfmd is loading its model; retry in a few seconds",
            )),
        }
    }

    /// The scheduler once the model is loaded (waiting at most
    /// [`LOAD_WAIT`]), or 503 while stopping.
    async fn loaded(&self) -> Result<&Handle, ApiError> {
        let mut phase = self.phase.subscribe();
        let _ = tokio::time::timeout(LOAD_WAIT, phase.wait_for(|p| *p != STARTING)).await;
        self.handle()
    }

    fn phase(&self) -> u8 {
        *self.phase.borrow()
    }
}

fn unavailable(msg: &str) -> ApiError {
    ApiError {
        retry_after: Some(Duration::from_secs(2)),
        ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(after) = self.retry_after {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}

/// The connection a request came on.
#[derive(Clone, Debug)]
struct Peer(Client);

/// The HTTP listeners' tasks and shared state.
pub struct HttpEdge {
    state: Arc<AppState>,
    stop: watch::Sender<bool>,
    tasks: Vec<(String, JoinHandle<()>)>,
}

impl HttpEdge {
    /// Serves `bound` from now on (503 until [`HttpEdge::ready`]).
    pub fn start(bound: Vec<Bound>) -> HttpEdge {
        let state = Arc::new(AppState {
            handle: OnceLock::new(),
            phase: watch::Sender::new(STARTING),
            started: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            next_id: AtomicU64::new(1),
        });
        let app = router(state.clone());
        let (stop, stop_rx) = watch::channel(false);
        let open_files = raise_open_files();
        let n = connection_slots(open_files);
        if n < MAX_CONNECTIONS {
            crate::warn!(
                "HTTP: {open_files} open files allowed, so at most {n} HTTP connections at once; raise LimitNOFILE (ulimit -n) for more"
            );
        }
        let slots = Arc::new(Semaphore::new(n));
        let tasks = bound
            .into_iter()
            .map(|b| {
                let name = b.describe();
                crate::info!("HTTP: listening on {name}");
                let task =
                    tokio::spawn(accept_loop(b, app.clone(), slots.clone(), stop_rx.clone()));
                (name, task)
            })
            .collect();
        HttpEdge { state, stop, tasks }
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// The model is loaded: serve requests.
    pub fn ready(&self, handle: Handle) {
        let _ = self.state.handle.set(handle);
        self.state.phase.send_replace(READY);
    }

    /// Shutting down: new requests and `/health` get 503; running ones
    /// go on.
    pub fn stopping(&self) {
        self.state.phase.send_replace(STOPPING);
    }

    /// Stops accepting and closes connections once their answers are done
    /// (at most `wait`).
    pub async fn shutdown(self, wait: Duration) {
        self.stopping();
        let _ = self.stop.send(true);
        for (name, task) in self.tasks {
            if tokio::time::timeout(wait, task).await.is_err() {
                crate::warn!("HTTP server on {name} did not close in time");
            }
        }
    }
}

/// The routes. Without the `/v1` prefix too, as llama-server serves them
/// (clients differ on whether the base URL includes it).
fn router(state: Arc<AppState>) -> axum::Router {
    axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/metrics", get(metrics_route))
        .route("/health", get(health))
        .route("/health/ready", get(health))
        .fallback(|req: Request| async move {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no route {} {}; lfmd serves POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /metrics, GET /health",
                    req.method(),
                    req.uri().path()
                ),
            )
        })
        .method_not_allowed_fallback(|req: Request| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} is not allowed on {}", req.method(), req.uri().path()),
            )
        })
        .with_state(state)
}

/// Accepts connections until `stop`, each served on its own task with a
/// slot from `slots`; then lets open ones finish their answers.
async fn accept_loop(
    bound: Bound,
    app: axum::Router,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let (unix, tcp, guard) = match bound {
        Bound::Unix(l, g) => (Some(l), None, g),
        Bound::Tcp(l) => (None, Some(l), None),
    };
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            a = async {
                match (&unix, &tcp) {
                    (Some(l), _) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
                    (_, Some(l)) => l.accept().await.map(|(s, a)| Conn::Tcp(s, a)),
                    _ => std::future::pending().await,
                }
            } => a,
        };
        let conn = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off a little.
                crate::warn!("HTTP: accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            crate::debug!("HTTP: every connection slot is taken; closing a new connection");
            continue;
        };
        let client = conn.client();
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(Peer(client.clone()));
                tower::ServiceExt::oneshot(app.clone(), req.map(Body::new))
            });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .keep_alive(true);
        let served = match conn {
            Conn::Unix(s) => {
                let c = builder.serve_connection(hyper_util::rt::TokioIo::new(s), service);
                tokio::spawn(wait_conn(graceful.watch(c), slot))
            }
            Conn::Tcp(s, _) => {
                let c = builder.serve_connection(hyper_util::rt::TokioIo::new(s), service);
                tokio::spawn(wait_conn(graceful.watch(c), slot))
            }
        };
        drop(served);
    }
    drop((unix, tcp));
    graceful.shutdown().await;
    drop(guard);
}

async fn wait_conn<F: Future<Output = Result<(), hyper::Error>>>(
    conn: F,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    if let Err(e) = conn.await {
        crate::debug!("HTTP connection: {e}");
    }
}

enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream, std::net::SocketAddr),
}

impl Conn {
    /// Who is on the other end: the peer process on a Unix socket, the
    /// address on TCP (TCP peers share one owner, as on gRPC).
    fn client(&self) -> Client {
        match self {
            Conn::Unix(s) => match s.peer_cred() {
                Ok(cred) => Client::peer(cred.uid(), cred.pid(), Edge::Http),
                Err(_) => Client::anonymous("unix", "unix".into(), Edge::Http),
            },
            Conn::Tcp(_, a) => Client::anonymous("tcp", format!("tcp:{a}"), Edge::Http),
        }
    }
}

/// The request's body, read whole: 413 if it says (or turns out) to be
/// larger than [`openai::MAX_BODY_BYTES`], 408 if it is not all sent
/// within [`BODY_TIMEOUT`].
async fn body_of(req: Request) -> Result<(Client, Bytes), ApiError> {
    let client = req
        .extensions()
        .get::<Peer>()
        .map(|p| p.0.clone())
        .unwrap_or_else(|| Client::anonymous("unknown", "unknown".into(), Edge::Http));
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than {} MiB; send a shorter prompt",
                openai::MAX_BODY_BYTES >> 20
            ),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > openai::MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let read = axum::body::to_bytes(req.into_body(), openai::MAX_BODY_BYTES);
    match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        )),
        Ok(Err(e)) => {
            let limit = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if limit {
                Err(too_large())
            } else {
                Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("reading the request body failed: {e}"),
                ))
            }
        }
        Ok(Ok(b)) => Ok((client, b)),
    }
}

/// Which route answers, for the shape of its bodies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Chat,
    Completion,
}

async fn chat(State(st): State<Arc<AppState>>, req: Request) -> Response {
    generate(st, req, Route::Chat).await
}

async fn completions(State(st): State<Arc<AppState>>, req: Request) -> Response {
    generate(st, req, Route::Completion).await
}

async fn generate(st: Arc<AppState>, req: Request, route: Route) -> Response {
    match generate_inner(&st, req, route).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn generate_inner(st: &AppState, req: Request, route: Route) -> Result<Response, ApiError> {
    let handle = st.loaded().await?.clone();
    let (client, body) = body_of(req).await?;
    let call = match route {
        Route::Chat => openai::chat_call(&body)?,
        Route::Completion => openai::completion_call(&body)?,
    };
    let Call {
        input,
        options,
        stream,
        include_usage,
        priority,
    } = call;
    let info = handle.model_info();
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let answer = Answer {
        id: match route {
            Route::Chat => format!("chatcmpl-{n}"),
            Route::Completion => format!("cmpl-{n}"),
        },
        created: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: openai::model_id(info),
    };
    crate::debug!("HTTP request from {} ({})", client.id, answer.id);
    let request = scheduler::Request {
        input,
        options,
        client,
        priority,
        deadline: None,
    };
    // Rendering and tokenizing a long prompt takes milliseconds the I/O
    // threads should not spend.
    let submit = handle.clone();
    let generation = tokio::task::spawn_blocking(move || submit.submit(request))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("preparing the request failed: {e}"),
            )
        })?
        .map_err(ApiError::from_submit)?;
    let events = generation.into_receiver();
    if stream {
        let s = Chunks {
            events,
            answer,
            route,
            include_usage,
            pending: VecDeque::new(),
            started: false,
            tool_index: 0,
            finished: false,
        };
        return Ok(Sse::new(s)
            .keep_alive(sse::KeepAlive::default())
            .into_response());
    }
    whole(events, &answer, route).await
}

/// A non-streamed answer: every event gathered into one body. If the
/// client goes away meanwhile, hyper drops this future and with it the
/// receiver, which cancels the request.
async fn whole(
    mut events: UnboundedReceiver<Event>,
    answer: &Answer,
    route: Route,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Delta(d) => text.push_str(&d.text),
            Event::Done(d) => {
                let body = match route {
                    Route::Chat => answer.chat(&text, &d),
                    Route::Completion => answer.completion(&text, &d),
                };
                return Ok(axum::Json(body).into_response());
            }
            Event::Failed(f) => return Err(ApiError::from_failure(f)),
        }
    }
    Err(engine_gone())
}

fn engine_gone() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the lfmd engine stopped before finishing this request; see the daemon's log",
    )
}

/// A streamed answer as server-sent events, ending with `data: [DONE]`.
/// Dropping it (the client went away) drops the receiver, which cancels the
/// request before the engine's next step.
struct Chunks {
    events: UnboundedReceiver<Event>,
    answer: Answer,
    route: Route,
    include_usage: bool,
    pending: VecDeque<sse::Event>,
    /// The first chunk (a chat's carries the assistant role) was sent.
    started: bool,
    /// Index of the next tool call in the answer.
    tool_index: usize,
    finished: bool,
}

fn data(v: &Value) -> sse::Event {
    sse::Event::default().data(v.to_string())
}

impl Chunks {
    /// Queues the chunks one engine event makes.
    fn on(&mut self, ev: Option<Event>) {
        let a = &self.answer;
        match ev {
            Some(Event::Delta(d)) => match self.route {
                Route::Chat => {
                    if !self.started {
                        self.started = true;
                        self.pending.push_back(data(
                            &a.chat_chunk(json!({"role": "assistant", "content": ""}), None),
                        ));
                    }
                    if !d.text.is_empty() {
                        self.pending
                            .push_back(data(&a.chat_chunk(json!({"content": d.text}), None)));
                    }
                    if !d.tool_calls.is_empty() {
                        let calls = openai::tool_calls(&d.tool_calls, Some(self.tool_index));
                        self.tool_index += d.tool_calls.len();
                        self.pending
                            .push_back(data(&a.chat_chunk(json!({"tool_calls": calls}), None)));
                    }
                }
                Route::Completion => {
                    // The first token gets a chunk even when its text is
                    // held back (an incomplete UTF-8 sequence), as a chat's
                    // first chunk carries the role: the client sees the
                    // answer has begun.
                    if !d.text.is_empty() || !self.started {
                        self.started = true;
                        self.pending
                            .push_back(data(&a.completion_chunk(&d.text, None)));
                    }
                }
            },
            Some(Event::Done(d)) => {
                let reason = openai::finish_reason(&d);
                let (last, object) = match self.route {
                    Route::Chat => (
                        a.chat_chunk(json!({}), Some(reason)),
                        "chat.completion.chunk",
                    ),
                    Route::Completion => (a.completion_chunk("", Some(reason)), "text_completion"),
                };
                self.pending.push_back(data(&last));
                if self.include_usage {
                    self.pending
                        .push_back(data(&a.usage_chunk(object, &d.stats)));
                }
                self.pending.push_back(sse::Event::default().data("[DONE]"));
                self.finished = true;
            }
            Some(Event::Failed(f)) => {
                // Headers are long sent: the error travels as a chunk, as
                // OpenAI's own streams carry them.
                self.pending
                    .push_back(data(&ApiError::from_failure(f).body()));
                self.finished = true;
            }
            None => {
                self.pending.push_back(data(&engine_gone().body()));
                self.finished = true;
            }
        }
    }
}

impl Stream for Chunks {
    type Item = Result<sse::Event, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(e)));
            }
            if self.finished {
                return Poll::Ready(None);
            }
            let ev = std::task::ready!(self.events.poll_recv(cx));
            self.on(ev);
        }
    }
}

async fn models(State(st): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let h = st.loaded().await?;
    Ok(axum::Json(openai::models(h.model_info(), st.started)).into_response())
}

async fn model(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let h = st.loaded().await?;
    let info = h.model_info();
    if id != openai::model_id(info) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no model {id:?}: this lfmd serves {:?} (GET /v1/models)",
                openai::model_id(info)
            ),
        ));
    }
    Ok(axum::Json(openai::model(info, st.started)).into_response())
}

async fn metrics_route(State(st): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let h = st.handle()?.clone();
    // /proc reads and the pager's lock: off the I/O threads.
    let text = tokio::task::spawn_blocking(move || metrics::render(&h))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("collecting metrics failed: {e}"),
            )
        })?;
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response())
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    let (status, word) = match st.phase() {
        READY => (StatusCode::OK, "ok"),
        STOPPING => (StatusCode::SERVICE_UNAVAILABLE, "stopping"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "loading"),
    };
    (status, axum::Json(json!({"status": word}))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: &str, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn until_the_model_is_ready_work_waits_and_health_says_loading() {
        let bound = crate::serve::bind_tcp("127.0.0.1:0", false).await.unwrap();
        let addr = bound.describe().strip_prefix("tcp:").unwrap().to_owned();
        let edge = HttpEdge::start(vec![bound]);
        let health = get(&addr, "/health").await;
        assert!(health.starts_with("HTTP/1.1 503"), "{health}");
        assert!(health.contains(r#"{"status":"loading"}"#), "{health}");
        let a = get(&addr, "/metrics").await;
        assert!(a.starts_with("HTTP/1.1 503"), "{a}");
        assert!(a.to_ascii_lowercase().contains("retry-after: 2"), "{a}");
        assert!(a.contains("loading its model"), "{a}");
        // Work waits for the model (here it never comes) until stopping.
        let waiting = tokio::spawn({
            let addr = addr.clone();
            async move { get(&addr, "/v1/models").await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiting.is_finished(),
            "a request during loading did not wait"
        );
        edge.stopping();
        let a = waiting.await.unwrap();
        assert!(a.starts_with("HTTP/1.1 503"), "{a}");
        assert!(a.contains("shutting down"), "{a}");
        let health = get(&addr, "/health").await;
        assert!(health.contains(r#"{"status":"stopping"}"#), "{health}");
        edge.shutdown(Duration::from_secs(2)).await;
        assert!(
            tokio::net::TcpStream::connect(&addr).await.is_err(),
            "still listening"
        );
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_413_with_or_without_its_length() {
        let big = vec![b' '; openai::MAX_BODY_BYTES + 1];
        // Streamed in (no Content-Length): refused once the limit is passed.
        let r = Request::new(Body::from(big));
        let e = body_of(r).await.unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE, "{e:?}");
        // Announced: refused before a byte is read (the body never ends).
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let endless = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut r = Request::new(endless);
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(64u64 << 20));
        let e = tokio::time::timeout(Duration::from_secs(5), body_of(r))
            .await
            .expect("answered without reading")
            .unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE, "{e:?}");
        let ok = body_of(Request::new(Body::from("{}"))).await.unwrap();
        assert_eq!(&ok.1[..], b"{}");
    }

    #[test]
    fn connection_slots_leave_files_for_the_rest() {
        assert_eq!(connection_slots(1024), 768);
        assert_eq!(connection_slots(100), 16);
        assert_eq!(connection_slots(1 << 20), MAX_CONNECTIONS);
    }
}
