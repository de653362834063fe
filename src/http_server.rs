//! The HTTP/1.1 server: tally's own accept loop around hyper, so that a
//! stranger at the port cannot stop the service for everyone else.
//!
//! poem's `Server` (3.1.12) gives hyper no timer, so there is no header-read
//! timeout; its idle timeout is reset by every byte read, so a client that
//! trickles its headers is never cut; it logs at info for every closed
//! connection; and it bounds neither open connections nor accept errors
//! (EMFILE makes it spin). This module bounds:
//!
//! - **Header-read time** ([`ServerSettings::header_read_timeout`]): hyper's
//!   `header_read_timeout`, armed when hyper starts waiting for a request's
//!   head. Tried against hyper 1.12 (the test
//!   `hyper_cuts_an_idle_keep_alive_connection_at_the_header_read_timeout`,
//!   and `proto/h1/conn.rs`): hyper arms it also while a keep-alive
//!   connection waits idle for its next request, as soon as the previous
//!   response is written, and ends the connection with a timeout error when
//!   no head has arrived by then. So a connection idle longer than this is
//!   closed whatever the keep-alive timeout says, and the keep-alive timeout
//!   only matters below it (hence its lower default). A connection cut this
//!   way gets no response at all (hyper answers 400 or 431 to a malformed or
//!   oversized head, never to a late one).
//! - **Idle keep-alive time** ([`ServerSettings::keep_alive_timeout`]): each
//!   connection keeps, from its service function, its requests in flight and
//!   when the last one finished ([`Activity`]); one timer per connection
//!   checks them once per period. Nothing is done per byte.
//! - **Open connections** ([`ServerSettings::connections_max`]): at the bound,
//!   the connections idle longest (no request in flight) are closed to make
//!   room, one [`EVICTION_BATCH_DIVISOR`]th of the bound per scan, so idle
//!   connections never keep a new client out; when every connection has a
//!   request in flight, the new one is closed at once (and no connection is
//!   scanned again until a request has finished).
//! - **Accept errors**: the loop backs off for [`ACCEPT_ERROR_BACKOFF`]
//!   rather than spin while the process is out of file descriptors.
//!
//! Connection closes are logged at debug: a flood must not flood the logs.
//!
//! A request head hyper cannot parse never reaches poem, so it gets no
//! problem+json: hyper 1.12 answers it itself (`proto/h1/conn.rs`,
//! `on_parse_error`, with the status from `Server::on_error` in
//! `proto/h1/role.rs`: 400 for a bad method, URI, version or header, which
//! covers a space in the path, a bare CR in a header and two different
//! `Content-Length`s; 431 for a head past [`READ_BUFFER_MAX_BYTES`]; 414 for a
//! URI too long) with a status line, `connection: close`, `content-length: 0`
//! and `date`, then ends the connection with the parse error. hyper offers no
//! hook for that answer; rewriting its bytes in an IO wrapper would hang on
//! their exact spelling and on write boundaries, so we leave it (the test
//! `a_head_hyper_cannot_parse_gets_its_bodiless_400_and_a_closed_connection`
//! pins it).

use std::collections::{BinaryHeap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use poem::http::uri::Scheme;
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Addr, Endpoint, Response};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

/// At the connection bound, one scan closes this fraction of the bound (at
/// least one connection): a scan walks every connection, so it must make room
/// for many accepts, not one.
pub const EVICTION_BATCH_DIVISOR: usize = 16;

/// How long the accept loop waits after an accept error that is not the
/// client's (EMFILE, ENFILE, ENOBUFS) before trying again: the connection
/// waits in the listen backlog meanwhile, and retrying at once would spin.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// hyper's read buffer, which bounds a request's head too: past it the
/// request gets 431. An honest head is a few hundred bytes; hyper's default
/// (about 400 KiB) times every open connection would be gigabytes.
pub const READ_BUFFER_MAX_BYTES: usize = 16 * 1024;

/// File descriptors kept apart from the connections when checking the
/// process's limit: Redis connections, the listener, the runtime, logs.
pub const OPEN_FILES_RESERVED: u64 = 1_024;

/// Highest soft RLIMIT_NOFILE asked for when the hard limit is unlimited
/// (Linux refuses more than `fs.nr_open`, 1,048,576 by default).
pub const OPEN_FILES_CEILING: u64 = 1 << 20;

/// The server's bounds.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub header_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub connections_max: usize,
    /// How long in-flight requests get to finish once shutdown is signalled.
    pub shutdown_grace: Duration,
}

impl ServerSettings {
    pub fn from_api(api: &crate::config::ApiSettings, shutdown_grace: Duration) -> Self {
        ServerSettings {
            header_read_timeout: Duration::from_millis(api.header_read_timeout_ms),
            keep_alive_timeout: Duration::from_millis(api.keep_alive_timeout_ms),
            connections_max: api.connections_max,
            shutdown_grace,
        }
    }
}

/// Where the server is in its life; every connection watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Shutdown was signalled: idle connections close now, busy ones after
    /// their request.
    Draining,
    /// The grace period is over: every connection closes now.
    Closing,
}

/// Serves `endpoint` on `listener` until `shutdown` resolves. Then it stops
/// accepting, lets requests in flight finish within `shutdown_grace`, drops
/// whatever is left, and returns.
pub async fn serve<E>(
    listener: TcpListener,
    endpoint: E,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()>
where
    E: Endpoint<Output = Response> + 'static,
{
    assert!(
        settings.connections_max >= 1,
        "connections_max is at least 1"
    );
    assert!(!settings.header_read_timeout.is_zero() && !settings.keep_alive_timeout.is_zero());
    let local_addr = listener.local_addr()?;
    let endpoint = Arc::new(endpoint);
    let connections = Arc::new(Connections::new(settings.connections_max));
    let mut http = http1::Builder::new();
    // Every option that bounds a stranger is set here rather than trusted
    // to hyper's defaults.
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(true)
        .half_close(false)
        .max_buf_size(READ_BUFFER_MAX_BYTES);
    let http = Arc::new(http);
    let (phase, phase_watch) = watch::channel(Phase::Serving);
    // Every connection task holds a sender; `recv` answers `None` once the
    // last one has ended (the pattern of mini-redis's shutdown_complete).
    let (connection_ended, mut all_ended) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    while let Some((stream, remote_addr)) = accept(&listener, &mut shutdown).await {
        let Some(slot) = connections.admit() else {
            tracing::debug!(remote = %remote_addr, "connection refused: every connection has a request in flight");
            drop(stream);
            continue;
        };
        // Responses go out in one write; Nagle would only delay the last
        // segment of a larger one.
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            local_addr,
            remote_addr,
            keep_alive_timeout: settings.keep_alive_timeout,
            http: http.clone(),
            phase: phase_watch.clone(),
            _ended: connection_ended.clone(),
        };
        tokio::spawn(connection.serve(stream, endpoint.clone(), slot));
    }
    drop(listener);
    drop(connection_ended);
    phase.send_replace(Phase::Draining);
    let drained = tokio::time::timeout(settings.shutdown_grace, all_ended.recv()).await;
    if drained.is_err() {
        tracing::info!(
            open = connections.open(),
            "shutdown grace is over; closing the connections left"
        );
        phase.send_replace(Phase::Closing);
        // Each connection drops at once when told to close.
        let _ = all_ended.recv().await;
    }
    Ok(())
}

/// The next connection, or `None` once `shutdown` resolves. An accept error
/// that is not one client's (out of descriptors) is logged at warn once per
/// streak, and retried after [`ACCEPT_ERROR_BACKOFF`].
async fn accept<F: Future<Output = ()>>(
    listener: &TcpListener,
    shutdown: &mut std::pin::Pin<&mut F>,
) -> Option<(TcpStream, SocketAddr)> {
    let mut failing = false;
    loop {
        let accepted = tokio::select! {
            () = shutdown.as_mut() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(accepted) => return Some(accepted),
            // The client gave up during the handshake: nothing is wrong here.
            Err(err) if is_connection_error(&err) => continue,
            Err(err) if failing => {
                tracing::debug!(error = %err, "accepting connections still fails");
            }
            Err(err) => {
                tracing::warn!(error = %err, "accepting connections fails; backing off");
                failing = true;
            }
        }
        tokio::select! {
            () = shutdown.as_mut() => return None,
            () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
        }
    }
}

/// Errors of one connection that `accept` reports: retrying at once is right.
fn is_connection_error(err: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        err.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted
    )
}

/// What one connection task needs besides its socket.
struct Connection {
    local_addr: SocketAddr,
    remote_addr: SocketAddr,
    keep_alive_timeout: Duration,
    http: Arc<http1::Builder>,
    phase: watch::Receiver<Phase>,
    /// Dropped when the task ends, which tells `serve` it has.
    _ended: mpsc::Sender<()>,
}

/// Why a connection ended, for the debug log.
enum Closed {
    /// hyper finished it: the client closed it, or asked to.
    Finished,
    /// The request head did not arrive within the header-read timeout.
    HeaderTimeout,
    /// A protocol or I/O error.
    Error(hyper::Error),
    /// No request in flight for the keep-alive timeout.
    Idle,
    /// Closed to make room at the connection bound.
    Evicted,
    /// The server is shutting down.
    Shutdown,
}

impl std::fmt::Display for Closed {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Closed::Finished => formatter.write_str("finished"),
            Closed::HeaderTimeout => formatter.write_str("header-read timeout"),
            Closed::Error(err) => write!(formatter, "error: {err}"),
            Closed::Idle => formatter.write_str("idle past the keep-alive timeout"),
            Closed::Evicted => formatter.write_str("evicted at the connection bound"),
            Closed::Shutdown => formatter.write_str("shutdown"),
        }
    }
}

impl Connection {
    async fn serve<E>(mut self, stream: TcpStream, endpoint: Arc<E>, slot: ConnectionSlot)
    where
        E: Endpoint<Output = Response> + 'static,
    {
        let activity = slot.activity.clone();
        let local_addr = LocalAddr(Addr::SocketAddr(self.local_addr));
        let remote_addr = RemoteAddr(Addr::SocketAddr(self.remote_addr));
        let service = hyper::service::service_fn({
            let activity = activity.clone();
            move |request: http::Request<Incoming>| {
                let in_flight = InFlight::begin(activity.clone());
                let endpoint = endpoint.clone();
                let request = poem::Request::from((
                    request,
                    local_addr.clone(),
                    remote_addr.clone(),
                    Scheme::HTTP,
                ));
                async move {
                    let response = endpoint.get_response(request).await;
                    drop(in_flight);
                    Ok::<_, Infallible>(http::Response::<BoxBody<Bytes, std::io::Error>>::from(
                        response,
                    ))
                }
            }
        });
        let connection = self.http.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(connection);
        let idle_check = tokio::time::sleep(self.keep_alive_timeout);
        tokio::pin!(idle_check);
        // Once hyper is asked to finish, it closes after the request in
        // flight; asking again would change nothing.
        let mut finishing = false;
        let closed = loop {
            tokio::select! {
                result = connection.as_mut() => break match result {
                    Ok(()) => Closed::Finished,
                    Err(err) if err.is_timeout() => Closed::HeaderTimeout,
                    Err(err) => Closed::Error(err),
                },
                () = activity.evict.notified() => {
                    // Idle: nothing to lose, so drop it now. Busy (a request
                    // began after the scan): let that request finish.
                    if activity.is_idle() {
                        break Closed::Evicted;
                    }
                    if !finishing {
                        connection.as_mut().graceful_shutdown();
                        finishing = true;
                    }
                }
                () = &mut idle_check => {
                    let now = Instant::now();
                    match activity.idle_since() {
                        Some(since) if now >= since + self.keep_alive_timeout => break Closed::Idle,
                        Some(since) => idle_check.as_mut().reset(since + self.keep_alive_timeout),
                        // A request is in flight; look again a period later.
                        None => idle_check.as_mut().reset(now + self.keep_alive_timeout),
                    }
                }
                changed = self.phase.changed() => {
                    let phase = match changed {
                        Ok(()) => *self.phase.borrow_and_update(),
                        Err(_) => Phase::Closing,
                    };
                    if phase == Phase::Closing || activity.is_idle() {
                        break Closed::Shutdown;
                    }
                    if !finishing {
                        connection.as_mut().graceful_shutdown();
                        finishing = true;
                    }
                }
            }
        };
        tracing::debug!(remote = %self.remote_addr, reason = %closed, "connection closed");
        drop(slot);
    }
}

/// A connection's requests, as its service function sees them.
///
/// A request is in flight from its head to the handler's response, body
/// reading included (bounded by the guard's request timeout). Writing the
/// response counts as idle on purpose: what the kernel cannot buffer must be
/// read by the client within the keep-alive timeout, or it is cut, so that a
/// client reading a byte now and then cannot hold a connection for ever.
struct Activity {
    /// When the server started; times below are milliseconds since.
    epoch: Instant,
    in_flight: AtomicU32,
    /// When the last request finished, or the connection was accepted.
    idle_since_ms: AtomicU64,
    /// Chosen for eviction (read and written under the registry's lock).
    evicted: AtomicBool,
    evict: Notify,
    /// Requests finished on every connection ([`Connections::requests_finished`]).
    requests_finished: Arc<AtomicU64>,
}

impl Activity {
    fn new(epoch: Instant, requests_finished: Arc<AtomicU64>) -> Self {
        let activity = Activity {
            epoch,
            in_flight: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
            requests_finished,
        };
        activity
            .idle_since_ms
            .store(activity.now_ms(), Ordering::Relaxed);
        activity
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// When the connection became idle, or `None` while a request is in flight.
    fn idle_since(&self) -> Option<Instant> {
        if !self.is_idle() {
            return None;
        }
        let since_ms = self.idle_since_ms.load(Ordering::Acquire);
        Some(self.epoch + Duration::from_millis(since_ms))
    }
}

/// One request in flight on a connection, from its head to its response.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // The time first, so whoever sees no request in flight sees when the
        // last one finished.
        self.0
            .idle_since_ms
            .store(self.0.now_ms(), Ordering::Release);
        let before = self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before >= 1, "a request ends that began");
        self.0.requests_finished.fetch_add(1, Ordering::Release);
    }
}

/// The open connections, and the bound on them.
struct Connections {
    max: usize,
    eviction_batch: usize,
    epoch: Instant,
    /// Counts requests finished on any connection: only a finished request
    /// makes a busy connection idle, so while it stands still a scan that
    /// found no idle connection would find none again.
    requests_finished: Arc<AtomicU64>,
    registry: Mutex<Registry>,
}

struct Registry {
    next_id: u64,
    open: HashMap<u64, Arc<Activity>>,
    /// Connections told to close that have not closed yet: they make room
    /// already, so admission does not count them.
    evicting: usize,
    /// `requests_finished` when a scan last found no idle connection.
    fruitless_scan_at: Option<u64>,
}

impl Connections {
    fn new(max: usize) -> Self {
        Connections {
            max,
            eviction_batch: (max / EVICTION_BATCH_DIVISOR).max(1),
            epoch: Instant::now(),
            requests_finished: Arc::new(AtomicU64::new(0)),
            registry: Mutex::new(Registry {
                next_id: 0,
                open: HashMap::new(),
                evicting: 0,
                fruitless_scan_at: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // The registry stays consistent through a panic elsewhere: each
        // change under the lock is a single insert or remove.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn open(&self) -> usize {
        self.lock().open.len()
    }

    /// A slot for a new connection, or `None` when every open one is busy.
    /// Evicted connections close within moments, so the open sockets pass
    /// the bound by at most one batch, and only for that long.
    fn admit(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let mut registry = self.lock();
        assert!(registry.evicting <= registry.open.len());
        if registry.open.len() - registry.evicting >= self.max {
            // Read before the scan, so a request that finishes during it
            // makes the next admission scan again.
            let finished = self.requests_finished.load(Ordering::Acquire);
            if registry.fruitless_scan_at == Some(finished) {
                return None;
            }
            if self.evict_idle_longest(&mut registry) == 0 {
                registry.fruitless_scan_at = Some(finished);
                return None;
            }
        }
        let id = registry.next_id;
        registry.next_id += 1;
        let activity = Arc::new(Activity::new(self.epoch, self.requests_finished.clone()));
        registry.open.insert(id, activity.clone());
        Some(ConnectionSlot {
            connections: self.clone(),
            id,
            activity,
        })
    }

    /// Tells up to one batch of the connections idle longest to close;
    /// returns how many. One pass over the open connections, keeping the
    /// batch in a heap whose top is the most recently idle of those kept.
    fn evict_idle_longest(&self, registry: &mut Registry) -> usize {
        let mut chosen: BinaryHeap<(u64, u64)> = BinaryHeap::with_capacity(self.eviction_batch + 1);
        for (id, activity) in &registry.open {
            if activity.evicted.load(Ordering::Relaxed) || !activity.is_idle() {
                continue;
            }
            // The id breaks ties: the connection accepted first goes first.
            chosen.push((activity.idle_since_ms.load(Ordering::Acquire), *id));
            if chosen.len() > self.eviction_batch {
                chosen.pop();
            }
        }
        let evicted = chosen.len();
        for (_, id) in chosen {
            let activity = &registry.open[&id];
            activity.evicted.store(true, Ordering::Relaxed);
            activity.evict.notify_one();
        }
        registry.evicting += evicted;
        tracing::debug!(
            evicted,
            open = registry.open.len(),
            "closing idle connections at the bound"
        );
        evicted
    }
}

/// A connection's place in the count, freed when its task ends (panics included).
struct ConnectionSlot {
    connections: Arc<Connections>,
    id: u64,
    activity: Arc<Activity>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut registry = self.connections.lock();
        let removed = registry.open.remove(&self.id);
        debug_assert!(removed.is_some(), "a slot is in the registry until dropped");
        if self.activity.evicted.load(Ordering::Relaxed) {
            registry.evicting -= 1;
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit (or to
/// [`OPEN_FILES_CEILING`]), so that `connections_max`, not the descriptor
/// limit, is what bounds connections; warns when even that is too low.
/// Returns the soft limit in force.
pub fn raise_open_files_limit(connections_max: usize) -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    let target = if limit.rlim_max == libc::RLIM_INFINITY {
        OPEN_FILES_CEILING
    } else {
        limit.rlim_max
    };
    if target > before {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit(2) only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let soft = before.max(target);
    tracing::debug!(
        soft_before = before,
        soft,
        hard = limit.rlim_max,
        "open files limit"
    );
    let needed = connections_max as u64 + OPEN_FILES_RESERVED;
    if soft < needed {
        tracing::warn!(
            soft,
            connections_max,
            "the open files limit is below the connection bound plus {OPEN_FILES_RESERVED}: \
             the descriptors, not TALLY_CONNECTIONS_MAX, will bound connections; \
             raise the hard limit (ulimit -Hn) or lower TALLY_CONNECTIONS_MAX"
        );
    }
    Ok(soft)
}
