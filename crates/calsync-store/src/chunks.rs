//! Work cut into statements of bounded size: consecutive runs of items whose weights add up to
//! at most a limit, an item heavier than the limit a run of its own. The events upsert cuts a
//! page by payload bytes (`upsert`), registration the calendars it untracks by their rows
//! (`changes::write_tracking`).

/// `items` in consecutive runs whose `weight`s add up to at most `limit` each (an item heavier
/// than `limit` is a run of its own); none for no items.
pub(crate) fn runs<T>(items: &[T], limit: usize, weight: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let (mut from, mut total) = (0, 0usize);
    for (i, item) in items.iter().enumerate() {
        let w = weight(item);
        if i > from && total.saturating_add(w) > limit {
            out.push(&items[from..i]);
            (from, total) = (i, 0);
        }
        total = total.saturating_add(w);
    }
    if from < items.len() {
        out.push(&items[from..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn runs_stay_under_the_limit_and_never_split_an_item() {
        let items = [("a", 40), ("b", 70), ("c", 10), ("d", 250), ("e", 0)];
        let keys = |limit| -> Vec<Vec<&str>> {
            runs(&items, limit, |(_, w)| *w)
                .into_iter()
                .map(|r| r.iter().map(|(k, _)| *k).collect())
                .collect()
        };
        assert_eq!(keys(100), [vec!["a"], vec!["b", "c"], vec!["d"], vec!["e"]]);
        assert_eq!(keys(1_000), [vec!["a", "b", "c", "d", "e"]]);
        assert!(runs(&[] as &[(&str, usize)], 100, |(_, w)| *w).is_empty());
    }
}
