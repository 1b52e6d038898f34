//! The HTTP side: `GET /metrics` on a thread of its own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::exposition::{encode, StatsSource, CONTENT_TYPE};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics address {0} is not a loopback address: pass --metrics-allow-remote to serve it to the network")]
    NotLoopback(SocketAddr),
    #[error("cannot serve metrics on {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
}

/// A running endpoint; dropping it stops the HTTP thread.
pub struct MetricsServer {
    http: Arc<tiny_http::Server>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Serves `/metrics` on `addr`. A non-loopback address is refused unless `allow_remote`.
    pub fn start(
        addr: SocketAddr,
        allow_remote: bool,
        source: Arc<dyn StatsSource>,
    ) -> Result<Self, MetricsError> {
        if !addr.ip().is_loopback() && !allow_remote {
            return Err(MetricsError::NotLoopback(addr));
        }
        let http = tiny_http::Server::http(addr).map_err(|e| MetricsError::Bind {
            addr,
            reason: e.to_string(),
        })?;
        let bound = http
            .server_addr()
            .to_ip()
            .ok_or_else(|| MetricsError::Bind {
                addr,
                reason: "not an IP listener".into(),
            })?;
        let http = Arc::new(http);
        let thread = {
            let http = http.clone();
            std::thread::Builder::new()
                .name("metrics".into())
                .spawn(move || serve(&http, &*source))
                .map_err(|e| MetricsError::Bind {
                    addr,
                    reason: e.to_string(),
                })?
        };
        log::info!("metrics on http://{bound}/metrics");
        Ok(MetricsServer {
            http,
            addr: bound,
            thread: Some(thread),
        })
    }

    /// Where it listens (the port the kernel chose for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.http.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(http: &tiny_http::Server, source: &dyn StatsSource) {
    for request in http.incoming_requests() {
        let path = request.url().split('?').next().unwrap_or("");
        let response = if *request.method() != tiny_http::Method::Get {
            tiny_http::Response::from_string("only GET\n").with_status_code(405)
        } else if path == "/metrics" {
            let body = encode(&source.snapshot());
            let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], CONTENT_TYPE)
                .expect("a static, valid header");
            tiny_http::Response::from_string(body).with_header(header)
        } else {
            tiny_http::Response::from_string("uringblk: metrics are at /metrics\n")
                .with_status_code(404)
        };
        if let Err(e) = request.respond(response) {
            log::debug!("metrics: answering a scrape failed: {e}");
        }
    }
}
