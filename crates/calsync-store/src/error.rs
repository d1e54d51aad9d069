//! The store's error type, and how a sqlx error maps onto it: callers decide on
//! [`StoreError`] and never see a sqlx type.

/// What went wrong with a store call, sized to what the engine must decide.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or went away: retry later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Another writer advanced this tuple's link first; the page was not applied.
    #[error("tuple {tuple_id} was changed by another writer")]
    Conflict {
        /// The tuple whose `link_version` moved.
        tuple_id: i64,
    },
    /// Applying the embedded migrations failed.
    #[error("database migration failed: {0}")]
    Migration(String),
    /// The server is older than [`crate::MIN_SERVER_VERSION`].
    #[error("database server is PostgreSQL {found}, calsync needs 12 or newer")]
    TooOld {
        /// `server_version_num` as the server reported it.
        found: i32,
    },
    /// A fault injected by a test at a chosen point inside a page transaction.
    #[cfg(any(test, feature = "testing"))]
    #[error("injected fault inside the page transaction")]
    InjectedFault,
    /// Any other database error.
    #[error("database error: {0}")]
    Query(String),
}

impl StoreError {
    /// Worth retrying: the database may answer differently soon.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            #[cfg(any(test, feature = "testing"))]
            StoreError::InjectedFault => true,
            _ => false,
        }
    }
}

pub(crate) fn db(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_) => StoreError::Unavailable(e.to_string()),
        sqlx::Error::Database(d) => {
            // Class 08 (connection exception) and 57P0x (admin shutdown, crash) are transient.
            let code = d.code().map(|c| c.into_owned()).unwrap_or_default();
            if code.starts_with("08") || code.starts_with("57P") {
                StoreError::Unavailable(d.to_string())
            } else {
                StoreError::Query(d.to_string())
            }
        }
        other => StoreError::Query(other.to_string()),
    }
}

/// sqlx's URL parse errors can echo the URL; keep only the reason.
pub(crate) fn redact_url_error(msg: &str) -> String {
    match msg.find("://") {
        Some(_) => "the url could not be parsed".into(),
        None => msg.to_owned(),
    }
}
