//! Comparing the read model with the simulator's truth: what "correct" means in tests, the
//! demo and the benchmarks.

use calsync_engine::Tuple;
use calsync_store::{EventSummary, Store};
use graph_sim::{Sim, TruthItem, Window};

/// How one tuple's rows differ from the truth.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// The tuple's name.
    pub tuple: String,
    /// Ids Graph has that the read model lacks.
    pub missing: Vec<String>,
    /// Ids the read model has that Graph does not.
    pub extra: Vec<String>,
    /// Ids both have, with different fields.
    pub different: Vec<String>,
}

impl Divergence {
    /// The read model matches the truth.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.different.is_empty()
    }

    /// How many ids differ in any way.
    pub fn count(&self) -> usize {
        self.missing.len() + self.extra.len() + self.different.len()
    }
}

/// Every field the truth API gives, as the read model shows it (an occurrence's series fields
/// included: a stub stored without them differs).
fn same(row: &EventSummary, truth: &TruthItem) -> bool {
    row.event_type.as_deref() == Some(truth.event_type.as_str())
        && row.subject.as_deref() == Some(truth.subject.as_str())
        && row.start_at == Some(truth.start)
        && row.end_at == Some(truth.end)
        && row.is_all_day == Some(truth.is_all_day)
        && row.series_master_id == truth.series_master_id
        && row.organizer_email.as_deref() == Some(truth.organizer_email.as_str())
        && row.location.as_deref().unwrap_or("") == truth.location
        && row.show_as.as_deref() == Some(truth.show_as.as_str())
        && row.is_cancelled == truth.is_cancelled
        && row.start_date == truth.start_date
        && row.end_date == truth.end_date
}

/// Compares every tuple's rows with the live instances of its window in the simulator.
pub async fn compare(
    store: &Store,
    sim: &Sim,
    tuples: &[Tuple],
) -> anyhow::Result<Vec<Divergence>> {
    let mut out = Vec::new();
    for t in tuples {
        let rows = store.event_summaries(&t.key).await?;
        let truth = sim
            .lock()
            .truth(
                &t.user,
                t.calendar_name(),
                Window {
                    start: t.window.start,
                    end: t.window.end,
                },
            )
            .unwrap_or_default();
        let mut d = Divergence {
            tuple: t.key.clone(),
            ..Default::default()
        };
        let mut i = 0;
        let mut j = 0;
        while i < rows.len() || j < truth.len() {
            match (rows.get(i), truth.get(j)) {
                (Some(r), Some(tr)) if r.event_id == tr.id => {
                    if !same(r, tr) {
                        d.different.push(r.event_id.clone());
                    }
                    i += 1;
                    j += 1;
                }
                (Some(r), Some(tr)) if r.event_id < tr.id => {
                    d.extra.push(r.event_id.clone());
                    i += 1;
                }
                (Some(_), Some(tr)) | (None, Some(tr)) => {
                    d.missing.push(tr.id.clone());
                    j += 1;
                }
                (Some(r), None) => {
                    d.extra.push(r.event_id.clone());
                    i += 1;
                }
                (None, None) => break,
            }
        }
        out.push(d);
    }
    Ok(out)
}
