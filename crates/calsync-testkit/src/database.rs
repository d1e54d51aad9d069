//! A scratch database for a demo, a benchmark or a process-level test: recreated on the server
//! `DATABASE_URL` names, or on a throwaway local cluster when there is none.

use crate::localpg::LocalPostgres;
use anyhow::Context;

/// A database made for one run; a local cluster behind it lives as long as this does.
#[derive(Debug)]
pub struct ScratchDatabase {
    /// Where to connect (it may carry a password: print it redacted).
    pub url: String,
    local: Option<LocalPostgres>,
}

impl ScratchDatabase {
    /// Drops and creates database `name` on `server_url`'s server, or on a new throwaway
    /// cluster when `server_url` is `None`.
    pub async fn open(server_url: Option<&str>, name: &str) -> anyhow::Result<Self> {
        let (admin, local) = match server_url {
            Some(url) => (url.to_owned(), None),
            None => {
                let pg = tokio::task::spawn_blocking(LocalPostgres::start).await??;
                (pg.url(), Some(pg))
            }
        };
        let url = calsync_store::recreate_database(&admin, name)
            .await
            .with_context(|| format!("cannot create database {name}"))?;
        Ok(ScratchDatabase { url, local })
    }

    /// Whether the database lives on a throwaway cluster started for this run.
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }
}
