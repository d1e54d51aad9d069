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
    /// This process no longer holds the lease of the tuple's mailbox (it expired, or another
    /// replica took it with a newer fencing token): nothing was written.
    #[error("tuple {tuple_id}: this process no longer holds its mailbox's lease")]
    Fenced {
        /// The tuple whose write was refused.
        tuple_id: i64,
    },
    /// A registration based on one generation of the deployment's tracked set found a newer
    /// one (a reload elsewhere wrote it while a discovery pass or a re-base ran): nothing was
    /// written, and the writer follows the newer set instead.
    #[error(
        "the tracked set moved to generation {current} since generation {based_on} this change was computed from"
    )]
    Superseded {
        /// The generation the change was computed from.
        based_on: i64,
        /// The deployment's generation now.
        current: i64,
    },
    /// A change feed cursor older than what retention kept: following it would skip the
    /// deleted changes.
    #[error(
        "change feed cursor {cursor} is expired: the changes after it were deleted by retention; read the snapshot and follow from its cursor"
    )]
    Expired {
        /// The cursor asked for.
        cursor: String,
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
    /// PostgreSQL refused a value (SQLSTATE class 22, data exception): the item is at fault,
    /// not the database.
    #[error("database refused a value ({sqlstate}): {message}")]
    Refused {
        /// The SQLSTATE, e.g. `22P05`.
        sqlstate: String,
        /// PostgreSQL's message.
        message: String,
    },
    /// Our SQL does not fit the database (SQLSTATE class 42: syntax, a missing table or
    /// column): a bug or a schema changed behind calsync's back. Never retried quietly.
    #[error("calsync's SQL does not fit the database ({sqlstate}): {message}")]
    Bug {
        /// The SQLSTATE, e.g. `42P01`.
        sqlstate: String,
        /// PostgreSQL's message, which names the object.
        message: String,
    },
    /// Any other database error.
    #[error("database error: {0}")]
    Query(String),
}

/// What a SQLSTATE means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlClass {
    /// Worth retrying with backoff: the connection, the server's state (read-only after a
    /// failover, shutting down, out of connections or memory), or contention (serialization
    /// failure, deadlock, lock or statement timeout, a cancelled statement).
    Transient,
    /// The data: a value PostgreSQL refuses (class 22).
    Data,
    /// Our SQL or the schema (class 42).
    Bug,
    /// Anything else.
    Other,
}

/// Classifies a SQLSTATE (PostgreSQL's Appendix A). The table of cases is in the tests below.
pub fn sql_class(sqlstate: &str) -> SqlClass {
    let class = sqlstate.get(..2).unwrap_or("");
    match (class, sqlstate) {
        // Connection exception; insufficient resources (53100 disk full, 53200 out of memory,
        // 53300 too many connections); system error (58000, 58030 I/O error).
        ("08" | "53" | "58", _) => SqlClass::Transient,
        // Read-only transaction: a failover made this server a standby (or someone set
        // default_transaction_read_only); the next connection may reach the new primary.
        (_, "25006") => SqlClass::Transient,
        // Serialization failure, deadlock detected, statement completion unknown.
        ("40", _) => SqlClass::Transient,
        // Lock not available (lock_timeout, NOWAIT); object in use.
        (_, "55P03" | "55006") => SqlClass::Transient,
        // Query cancelled (statement_timeout, pg_cancel_backend); admin shutdown, crash
        // shutdown, cannot connect now, idle session timeout.
        ("57", _) if sqlstate.starts_with("57P") || sqlstate == "57014" => SqlClass::Transient,
        ("22", _) => SqlClass::Data,
        ("42", _) => SqlClass::Bug,
        _ => SqlClass::Other,
    }
}

impl StoreError {
    /// A short code for status and metrics: `DatabaseUnavailable`, `DatabaseRefusedValue`,
    /// `DatabaseBug`, `DatabaseError`.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "DatabaseUnavailable",
            StoreError::Refused { .. } => "DatabaseRefusedValue",
            StoreError::Bug { .. } => "DatabaseBug",
            StoreError::Conflict { .. } => "Conflict",
            StoreError::Fenced { .. } => "LeaseLost",
            StoreError::Superseded { .. } => "Superseded",
            _ => "DatabaseError",
        }
    }

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
            let sqlstate = d.code().map(|c| c.into_owned()).unwrap_or_default();
            let message = d.message().to_owned();
            match sql_class(&sqlstate) {
                SqlClass::Transient => StoreError::Unavailable(format!("{message} ({sqlstate})")),
                SqlClass::Data => StoreError::Refused { sqlstate, message },
                SqlClass::Bug => StoreError::Bug { sqlstate, message },
                SqlClass::Other => StoreError::Query(format!("{message} ({sqlstate})")),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sqlstate_class_calsync_meets_is_classified() {
        let cases = [
            // Connection trouble and server state: retry with backoff.
            ("08000", SqlClass::Transient),
            ("08006", SqlClass::Transient),
            ("08P01", SqlClass::Transient),
            ("25006", SqlClass::Transient), // read-only transaction (a standby after failover)
            ("40001", SqlClass::Transient), // serialization failure
            ("40P01", SqlClass::Transient), // deadlock detected
            ("53100", SqlClass::Transient), // disk full
            ("53200", SqlClass::Transient), // out of memory
            ("53300", SqlClass::Transient), // too many connections
            ("55P03", SqlClass::Transient), // lock not available
            ("55006", SqlClass::Transient), // object in use
            ("57014", SqlClass::Transient), // query cancelled (statement_timeout)
            ("57P01", SqlClass::Transient), // admin shutdown
            ("57P02", SqlClass::Transient), // crash shutdown
            ("57P03", SqlClass::Transient), // cannot connect now
            ("57P05", SqlClass::Transient), // idle session timeout
            ("58030", SqlClass::Transient), // I/O error
            // A value the database refuses: the item's fault.
            ("22P05", SqlClass::Data), // untranslatable character (\u0000 in jsonb)
            ("22021", SqlClass::Data), // character not in repertoire (NUL in text)
            ("22001", SqlClass::Data), // string too long
            ("22008", SqlClass::Data), // datetime field overflow
            // Our SQL or the schema: a bug, loud.
            ("42P01", SqlClass::Bug), // undefined table
            ("42703", SqlClass::Bug), // undefined column
            ("42601", SqlClass::Bug), // syntax error
            ("42501", SqlClass::Bug), // insufficient privilege
            // The rest.
            ("23505", SqlClass::Other), // unique violation
            ("25P02", SqlClass::Other), // in failed transaction
            ("57000", SqlClass::Other),
            ("", SqlClass::Other),
        ];
        for (state, want) in cases {
            assert_eq!(sql_class(state), want, "{state}");
        }
    }
}
