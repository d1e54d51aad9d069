//! Change-notification subscriptions (issue 24; notes §5): create, renew and delete, on the
//! same token and HTTP stack as the delta requests. What a notification says is never trusted
//! beyond "this calendar changed": the delta round finds what.

use crate::{GraphClient, GraphError, classify, transport};
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::Method;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;
use url::Url;

/// A subscription to create.
pub struct NewSubscription<'a> {
    /// What to watch (`/users/{id}/calendars/{id}/events`).
    pub resource: &'a str,
    /// Where Graph posts notifications.
    pub notification_url: &'a str,
    /// Where Graph posts lifecycle events.
    pub lifecycle_url: &'a str,
    /// When it should end.
    pub expires: DateTime<Utc>,
    /// The secret Graph echoes in every notification (at most 128 characters).
    pub client_state: &'a SecretString,
}

impl std::fmt::Debug for NewSubscription<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSubscription")
            .field("resource", &self.resource)
            .field("notification_url", &self.notification_url)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// A subscription as Graph answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribed {
    /// Graph's id.
    pub id: String,
    /// When Graph ends it (it may differ from what was asked: a short one is raised to 45
    /// minutes).
    pub expires: DateTime<Utc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubscriptionBody {
    id: String,
    expiration_date_time: DateTime<Utc>,
}

impl GraphClient {
    fn subscriptions_url(&self, id: Option<&str>, action: Option<&str>) -> Url {
        let mut url = self.base_url().clone();
        if let Ok(mut segs) = url.path_segments_mut() {
            segs.pop_if_empty().push("subscriptions");
            if let Some(id) = id {
                segs.push(id);
            }
            if let Some(a) = action {
                segs.push(a);
            }
        }
        url
    }

    /// Sends a subscription request with a JSON body (a fresh token once on 401); answers the
    /// status and body.
    async fn subscription_call(
        &self,
        method: Method,
        url: Url,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, Vec<u8>, Option<std::time::Duration>), GraphError> {
        let mut token = self.tokens().token().await?;
        for attempt in 0..2 {
            let mut bearer =
                HeaderValue::from_str(&format!("Bearer {}", token.secret.expose_secret()))
                    .map_err(|_| GraphError::AuthUnavailable {
                        reason: "the access token is not a valid header value".into(),
                    })?;
            bearer.set_sensitive(true);
            let mut request = self
                .inner
                .http
                .request(method.clone(), url.clone())
                .header(AUTHORIZATION, bearer);
            if let Some(b) = &body {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(b.to_string());
            }
            let resp = request.send().await.map_err(transport)?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| crate::parse_retry_after(v, std::time::SystemTime::now()));
            let bytes = resp.bytes().await.map_err(transport)?.to_vec();
            if status == 401 && attempt == 0 {
                self.tokens().invalidate(&token).await;
                token = self.tokens().token().await?;
                continue;
            }
            return Ok((status, bytes, retry_after));
        }
        Err(GraphError::AuthUnavailable {
            reason: "graph refused two tokens in a row".into(),
        })
    }

    fn subscribed(body: &[u8]) -> Result<Subscribed, GraphError> {
        let b: SubscriptionBody =
            serde_json::from_slice(body).map_err(|e| GraphError::Malformed {
                reason: format!("a subscription answer is not one: {e}"),
            })?;
        Ok(Subscribed {
            id: b.id,
            expires: b.expiration_date_time,
        })
    }

    /// `POST /subscriptions` for created, updated and deleted events; Graph validates both
    /// URLs (its handshake reaches calsync's receiver) before it answers 201.
    pub async fn create_subscription(
        &self,
        s: &NewSubscription<'_>,
    ) -> Result<Subscribed, GraphError> {
        let body = json!({
            "changeType": "created,updated,deleted",
            "notificationUrl": s.notification_url,
            "lifecycleNotificationUrl": s.lifecycle_url,
            "resource": s.resource,
            "expirationDateTime": s.expires.to_rfc3339_opts(SecondsFormat::Secs, true),
            "clientState": s.client_state.expose_secret(),
            "latestSupportedTlsVersion": "v1_2",
        });
        let (status, bytes, retry_after) = self
            .subscription_call(Method::POST, self.subscriptions_url(None, None), Some(body))
            .await?;
        match status {
            200 | 201 => Self::subscribed(&bytes),
            _ => Err(classify(status, retry_after, &bytes)),
        }
    }

    /// `PATCH /subscriptions/{id}` with a new expiry. `None`: Graph no longer has it (404):
    /// create it again.
    pub async fn renew_subscription(
        &self,
        id: &str,
        expires: DateTime<Utc>,
    ) -> Result<Option<Subscribed>, GraphError> {
        let body =
            json!({"expirationDateTime": expires.to_rfc3339_opts(SecondsFormat::Secs, true)});
        let (status, bytes, retry_after) = self
            .subscription_call(
                Method::PATCH,
                self.subscriptions_url(Some(id), None),
                Some(body),
            )
            .await?;
        match status {
            200 => Self::subscribed(&bytes).map(Some),
            404 => Ok(None),
            _ => Err(classify(status, retry_after, &bytes)),
        }
    }

    /// `POST /subscriptions/{id}/reauthorize` (the answer to `reauthorizationRequired`).
    /// `false`: Graph no longer has it.
    pub async fn reauthorize_subscription(&self, id: &str) -> Result<bool, GraphError> {
        let (status, bytes, retry_after) = self
            .subscription_call(
                Method::POST,
                self.subscriptions_url(Some(id), Some("reauthorize")),
                None,
            )
            .await?;
        match status {
            200..=204 => Ok(true),
            404 => Ok(false),
            _ => Err(classify(status, retry_after, &bytes)),
        }
    }

    /// `DELETE /subscriptions/{id}`; one Graph no longer has is deleted already.
    pub async fn delete_subscription(&self, id: &str) -> Result<(), GraphError> {
        let (status, bytes, retry_after) = self
            .subscription_call(Method::DELETE, self.subscriptions_url(Some(id), None), None)
            .await?;
        match status {
            200..=204 | 404 => Ok(()),
            _ => Err(classify(status, retry_after, &bytes)),
        }
    }
}
