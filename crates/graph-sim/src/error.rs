//! Graph-shaped error answers: `{"error":{"code","message","innerError"}}` plus status and headers.

use serde_json::{Value, json};

/// An error answer the simulator sends, shaped as Graph sends it.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphError {
    /// The HTTP status.
    pub status: u16,
    /// Graph's error code, e.g. `ErrorInvalidParameter`.
    pub code: String,
    /// The human-readable message.
    pub message: String,
    /// The raw `Retry-After` header value, when the answer asks the client to wait.
    pub retry_after: Option<String>,
}

impl GraphError {
    /// An error with this status, code and message.
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> Self {
        GraphError {
            status,
            code: code.to_owned(),
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400 `ErrorInvalidParameter`.
    pub fn invalid_parameter(message: impl Into<String>) -> Self {
        Self::new(400, "ErrorInvalidParameter", message)
    }

    /// 404 `ErrorItemNotFound`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "ErrorItemNotFound", message)
    }

    /// 410 `SyncStateNotFound`, as Outlook sends it for an expired or evicted delta state.
    pub fn sync_state_not_found(message: impl Into<String>) -> Self {
        Self::new(410, "SyncStateNotFound", message)
    }

    /// The same error asking the client to wait (`Retry-After` as given).
    pub fn with_retry_after(mut self, value: String) -> Self {
        self.retry_after = Some(value);
        self
    }

    /// The JSON body Graph sends: `error.code`, `error.message` and `innerError` with the request id and date.
    pub fn body(&self, request_id: &str, client_request_id: &str, date: &str) -> Value {
        json!({
            "error": {
                "code": self.code,
                "message": self.message,
                "innerError": {
                    "date": date,
                    "request-id": request_id,
                    "client-request-id": client_request_id,
                }
            }
        })
    }
}
