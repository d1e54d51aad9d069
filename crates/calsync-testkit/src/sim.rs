//! Graph client settings for a simulator on loopback: its token endpoint, its default app's
//! credentials, its Graph base URL.

use calsync_graph::{AuthConfig, GraphConfig};
use secrecy::SecretString;

/// Client credentials for the simulator's default app, at the simulator on `origin`
/// (`http://127.0.0.1:port`).
pub fn auth(origin: &str) -> anyhow::Result<AuthConfig> {
    Ok(AuthConfig {
        token_url: format!("{origin}/{}/oauth2/v2.0/token", graph_sim::DEFAULT_TENANT).parse()?,
        client_id: graph_sim::DEFAULT_CLIENT_ID.into(),
        credential: calsync_graph::Credential::Secret(SecretString::from(
            graph_sim::DEFAULT_CLIENT_SECRET.to_owned(),
        )),
        scope: "https://graph.microsoft.com/.default".into(),
    })
}

/// Graph settings for the simulator on `origin`, asking for `page_size` items per page.
pub fn graph(origin: &str, page_size: u32) -> anyhow::Result<GraphConfig> {
    let mut g = GraphConfig::new(format!("{origin}/v1.0").parse()?);
    g.page_size = Some(page_size);
    Ok(g)
}
