//! The metrics endpoint's HTTP side: hyper's HTTP/1 server on the daemon's event loop. `GET
//! /metrics` answers the exposition text (read in a blocking task: the kernel's counters are
//! system calls); anything else is 404. A connection lives at most `CONNECTION_TIMEOUT`, and
//! its request head must arrive within `HEADER_TIMEOUT`, so a slow client holds nothing.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::Shared;

const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// The `OpenMetrics` text the Prometheus client writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves scrapes on `listener` until the daemon stops.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            // Out of descriptors, say: wait, then take the next.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(request, Arc::clone(&shared)));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            if tokio::time::timeout(CONNECTION_TIMEOUT, connection)
                .await
                .is_err()
            {
                tracing::debug!(%peer, "metrics connection closed after {CONNECTION_TIMEOUT:?}");
            }
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a response of constant parts")
    };
    if request.method() != Method::GET || request.uri().path() != "/metrics" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "the enforcer serves GET /metrics\n".into(),
        ));
    }
    let rendered = tokio::task::spawn_blocking(move || shared.render()).await;
    Ok(match rendered {
        Ok(Ok(text)) => reply(StatusCode::OK, CONTENT_TYPE, text),
        Ok(Err(e)) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("cannot read the counters: {e}\n"),
        ),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("the scrape failed: {e}\n"),
        ),
    })
}
