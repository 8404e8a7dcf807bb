//! `--metrics-listen`: a Prometheus registry served over plain HTTP/1.1.
//!
//! The server runs on a thread of its own, with its own single-threaded runtime, so that a
//! scrape never waits for the WAL stream and the stream never waits for a scrape: the
//! programs share only atomics and short locks with it. `GET /metrics` (and `HEAD`) answers
//! the registry in Prometheus' text exposition format (version 0.0.4); any other path is
//! 404, any other method 405.
//!
//! What a client may send is bounded, as anything from the network: a request head of at
//! most [`MAX_HEAD`] bytes, which must arrive within [`HEAD_TIMEOUT`] (this also closes
//! keep-alive connections left idle that long); request bodies are never read; at most
//! [`MAX_CONNECTIONS`] connections at once, more are closed at once; each connection lives
//! at most [`CONNECTION_LIFETIME`], then finishes its request and is closed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
pub use prometheus_client;
use prometheus_client::encoding::prometheus_text;
pub use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;

/// The path that answers the metrics.
pub const METRICS_PATH: &str = "/metrics";
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a request head may take to arrive, counted from the connection's start or the
/// end of its previous response.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one connection is served before it is closed (after its current request).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// Largest request head read (hyper's smallest read buffer).
pub const MAX_HEAD: usize = 8192;
/// How long a connection asked to close may take to finish its response.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// The metrics listener could not be started.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the metrics thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Binds `listen` (HOST:PORT) at once, so that a bad address fails at start-up, and serves
/// `registry` there from a thread of its own for as long as the process lives. Returns the
/// address bound (useful with port 0).
pub fn serve(listen: &str, registry: Registry) -> Result<SocketAddr, MetricsError> {
    let listen_err = |source| MetricsError::Listen {
        addr: listen.to_owned(),
        source,
    };
    let listener = std::net::TcpListener::bind(listen).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    let local = listener.local_addr().map_err(listen_err)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(MetricsError::Thread)?;
    let registry = Arc::new(registry);
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || runtime.block_on(accept_loop(listener, registry)))
        .map_err(MetricsError::Thread)?;
    tracing::info!(listen = %local, "serving Prometheus metrics at http://{local}{METRICS_PATH}");
    Ok(local)
}

async fn accept_loop(listener: std::net::TcpListener, registry: Arc<Registry>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics listener: {e}; no metrics are served");
            return;
        }
    };
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!("metrics listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics listener: too many connections; closing this one");
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            serve_connection(sock, registry).await;
            drop(place);
        });
    }
}

async fn serve_connection(sock: tokio::net::TcpStream, registry: Arc<Registry>) {
    let service = hyper::service::service_fn(move |req| {
        let registry = registry.clone();
        async move { Ok::<_, Infallible>(answer(&req, &registry)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(sock), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
}

/// The answer to one request. Never reads the request's body.
fn answer(req: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.uri().path() != METRICS_PATH {
        return reply(
            StatusCode::NOT_FOUND,
            format!("not found: the metrics are at {METRICS_PATH}\n"),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET or HEAD\n".to_owned(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let mut text = String::new();
    if let Err(e) = prometheus_text::encode(&mut text, registry) {
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the metrics: {e}\n"),
        );
    }
    let mut r = reply(StatusCode::OK, text);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(prometheus_text::CONTENT_TYPE),
    );
    r
}

/// Helpers for a [`Collector`](prometheus_client::collector::Collector) that reads its
/// values at scrape time.
pub mod collect {
    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;
    use prometheus_client::metrics::MetricType;

    /// One metric family, whose samples are written one by one.
    pub struct Family<'a> {
        enc: MetricEncoder<'a>,
        counter: bool,
    }

    impl Family<'_> {
        /// Writes a sample with `labels` (name and value pairs).
        pub fn sample(&mut self, labels: &[(&str, &str)], v: i64) -> std::fmt::Result {
            let enc = self.enc.encode_family(&labels)?;
            if self.counter {
                ConstCounter::new(v.max(0) as u64).encode(enc)
            } else {
                ConstGauge::new(v).encode(enc)
            }
        }

        /// Writes a gauge sample with a fractional value.
        pub fn sample_f64(&mut self, labels: &[(&str, &str)], v: f64) -> std::fmt::Result {
            let enc = self.enc.encode_family(&labels)?;
            ConstGauge::new(v).encode(enc)
        }
    }

    /// A gauge family: `name` is the full name, its unit included.
    pub fn gauge<'a>(
        enc: &'a mut DescriptorEncoder<'_>,
        name: &'a str,
        help: &str,
    ) -> Result<Family<'a>, std::fmt::Error> {
        Ok(Family {
            enc: enc.encode_descriptor(name, help, None, MetricType::Gauge)?,
            counter: false,
        })
    }

    /// A counter family: `name` without the `_total` the encoder appends.
    pub fn counter<'a>(
        enc: &'a mut DescriptorEncoder<'_>,
        name: &'a str,
        help: &str,
    ) -> Result<Family<'a>, std::fmt::Error> {
        Ok(Family {
            enc: enc.encode_descriptor(name, help, None, MetricType::Counter)?,
            counter: true,
        })
    }

    /// A gauge family with one sample and no labels.
    pub fn gauge_value(
        enc: &mut DescriptorEncoder<'_>,
        name: &str,
        help: &str,
        v: i64,
    ) -> std::fmt::Result {
        gauge(enc, name, help)?.sample(&[], v)
    }

    /// A counter family with one sample and no labels.
    pub fn counter_value(
        enc: &mut DescriptorEncoder<'_>,
        name: &str,
        help: &str,
        v: u64,
    ) -> std::fmt::Result {
        counter(enc, name, help)?.sample(&[], v.min(i64::MAX as u64) as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The server may close before it has read everything sent (a head over the limit).
        let _ = s.write_all(request);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn serves_metrics_only_at_its_path_and_bounds_the_request_head() {
        let mut registry = Registry::default();
        let gauge: prometheus_client::metrics::gauge::Gauge = Default::default();
        gauge.set(42);
        registry.register("walship_test_value", "A test value", gauge);
        let addr = serve("127.0.0.1:0", registry).unwrap();

        let ok = exchange(addr, b"GET /metrics HTTP/1.0\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.0 200"), "{ok}");
        assert!(ok.contains(prometheus_text::CONTENT_TYPE), "{ok}");
        assert!(ok.contains("\nwalship_test_value 42\n"), "{ok}");
        let head = exchange(addr, b"HEAD /metrics HTTP/1.0\r\n\r\n");
        assert!(head.starts_with("HTTP/1.0 200"), "{head}");
        assert!(!head.contains("walship_test_value 42"), "{head}");
        let other = exchange(addr, b"GET /other HTTP/1.0\r\n\r\n");
        assert!(other.starts_with("HTTP/1.0 404"), "{other}");
        let post = exchange(
            addr,
            b"POST /metrics HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi",
        );
        assert!(post.starts_with("HTTP/1.0 405"), "{post}");
        // A head beyond the limit is refused, and nothing is served.
        let mut big = b"GET /metrics HTTP/1.0\r\nX-Filler: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 4 * MAX_HEAD));
        big.extend(b"\r\n\r\n");
        let refused = exchange(addr, &big);
        assert!(!refused.contains("walship_test_value"), "{refused}");
        assert!(
            refused.is_empty() || refused.starts_with("HTTP/1.1 431"),
            "{refused}"
        );
        // The server still serves after all that.
        assert!(exchange(addr, b"GET /metrics HTTP/1.0\r\n\r\n").contains("walship_test_value 42"));
    }

    #[test]
    fn an_address_in_use_is_an_error_at_once() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let e = serve(&addr, Registry::default()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("cannot listen for metrics on {addr}")),
            "{e}"
        );
    }
}
