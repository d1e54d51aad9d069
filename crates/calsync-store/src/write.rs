//! What a page write is: the page's changes with the link after it and the checks it must pass
//! ([`PageWrite`]), and what applying it did ([`PageApplied`]).

use crate::page::PageChanges;
use crate::tuples::{LinkKind, LinkStamp};
use serde::Serialize;

/// Which round a page begins, if it is the first page of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundStart {
    /// A full round (initial sync or resync): rows not seen in it are swept at its end.
    Full,
    /// An incremental round from a deltaLink.
    Delta,
}

/// One page's effect, applied atomically with the link that follows it.
#[derive(Debug)]
pub struct PageWrite<'a> {
    /// The tuple the page belongs to.
    pub tuple_id: i64,
    /// The `link_version` the writer read; the write fails with `Conflict` if it moved.
    pub expected_version: i64,
    /// Set on the first page of a round.
    pub round_start: Option<RoundStart>,
    /// The page's writes, reduced to at most one per id.
    pub changes: &'a PageChanges,
    /// The link that follows the page.
    pub link: &'a str,
    /// Whether `link` is a nextLink or the round's deltaLink.
    pub link_kind: LinkKind,
    /// What `link` was made for.
    pub stamp: &'a LinkStamp,
    /// The fencing token of the mailbox lease the writer holds; the write fails with
    /// `Fenced` unless that lease is current. `None` only for a writer outside any lease (a
    /// test or benchmark driving the engine directly).
    pub fence: Option<i64>,
}

/// What applying a page did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PageApplied {
    /// The tuple's `link_version` after the commit.
    pub version: i64,
    /// Rows inserted or changed.
    pub upserted: u64,
    /// Rows deleted by `@removed`.
    pub removed: u64,
    /// Rows deleted by the sweep at the end of a full round.
    pub swept: u64,
    /// Items PostgreSQL refused even after repair, kept as quarantined rows.
    pub quarantined: u64,
}
