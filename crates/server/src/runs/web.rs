//! A web request as a run: it ends when its response's body has been sent (a stream's last frame, a websocket's
//! upgrade answer), or when its client goes away before that (cancelled). A 5xx answer is an error.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http::{Response, StatusCode};
use hyper::body::{Frame, SizeHint};

use super::{Outcome, Recording};
use crate::apps::logs::RequestLogs;

/// `response` with its body wrapped to record the run's end.
pub fn recorded(response: Response<Body>, recording: Recording, logs: Arc<RequestLogs>) -> Response<Body> {
    let (parts, body) = response.into_parts();
    let status = parts.status;
    Response::from_parts(parts, Body::new(Recorded { body, ending: Some((recording, logs)), status }))
}

struct Recorded {
    body: Body,
    ending: Option<(Recording, Arc<RequestLogs>)>,
    status: StatusCode,
}

impl Recorded {
    fn end(&mut self, outcome: Outcome) {
        if let Some((recording, logs)) = self.ending.take() {
            for line in logs.lines() {
                recording.logs.push_at(line.time, line.source, &line.line);
            }
            recording.finish(outcome);
        }
    }

    fn answered(&self) -> Outcome {
        if self.status.is_server_error() {
            Outcome::error(format!("http-{}", self.status.as_u16()), format!("the app answered {}", self.status))
        } else {
            Outcome::Success
        }
    }
}

impl hyper::body::Body for Recorded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                let outcome = this.answered();
                this.end(outcome);
            }
            Poll::Ready(Some(Err(error))) => {
                let message = format!("the app's answer was cut off: {error}");
                this.end(Outcome::error("replica_failed", message));
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        // A body whose end was never read: empty ones (hyper may not poll them), or a client gone mid-stream.
        let outcome = if hyper::body::Body::is_end_stream(&self.body) {
            self.answered()
        } else {
            Outcome::cancelled("client-gone", "the client went away before the answer was sent")
        };
        self.end(outcome);
    }
}
