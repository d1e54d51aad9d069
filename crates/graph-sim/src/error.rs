//! Graph-shaped error answers: `{"error":{"code","message","innerError"}}` plus status and headers.

use serde_json::{Value, json};

/// An error answer the simulator sends, shaped as Graph sends it.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphError {
    pub status: u16,
    pub code: String,
    pub message: String,
    /// The raw `Retry-After` header value, when the answer asks the client to wait.
    pub retry_after: Option<String>,
}

impl GraphError {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> Self {
        GraphError {
            status,
            code: code.to_owned(),
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn invalid_parameter(message: impl Into<String>) -> Self {
        Self::new(400, "ErrorInvalidParameter", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "ErrorItemNotFound", message)
    }

    pub fn sync_state_not_found(message: impl Into<String>) -> Self {
        Self::new(410, "SyncStateNotFound", message)
    }

    pub fn with_retry_after(mut self, value: String) -> Self {
        self.retry_after = Some(value);
        self
    }

    pub fn body(&self, request_id: &str, date: &str) -> Value {
        json!({
            "error": {
                "code": self.code,
                "message": self.message,
                "innerError": {
                    "date": date,
                    "request-id": request_id,
                    "client-request-id": request_id,
                }
            }
        })
    }
}
