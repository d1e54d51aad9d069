//! How the simulator serves recurring series and bad tokens where the production service and its
//! documentation disagree (graph-delta-notes.md §1.7, §1.7a, §2).
//!
//! Two profiles: `outlook`, the default, does what Outlook has been reported to do in production;
//! `documented` does what Microsoft's pages describe. Every behaviour is its own switch, so a test
//! can take one profile and change one thing. A scenario file writes
//! `[sim.behaviour] profile = "documented"` and any switch below it; the admin API takes the same
//! object at `PUT /_sim/behaviour`; the binary has `--profile`.

use serde::{Deserialize, Serialize};

/// A named set of behaviours.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// As reported from production (the default).
    #[default]
    Outlook,
    /// As Microsoft's documentation describes.
    Documented,
}

/// The switches. Each names the report it follows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "BehaviourSpec", into = "BehaviourSpec")]
pub struct Behaviour {
    /// The profile the switches started from.
    pub profile: Profile,
    /// Occurrences in calendarView delta (full and incremental rounds) are bare stubs:
    /// `@odata.type`, `@odata.etag`, `id`, `seriesMasterId`, `type`, `start`, `end`. Exceptions
    /// still come in full. (microsoft-graph-docs #1716, #7632, #22197; docs-contrib #34;
    /// keeper.sh PR #409; OpenWhispr PRs #1665, #1835.)
    pub stub_occurrences: bool,
    /// Series masters are listed in calendarView delta, with the first occurrence's start and
    /// end, whenever any of their instances is in the window, and listed again whenever the
    /// series changes (keeper.sh PRs #409, #410). Documented: never listed (event-delta.md).
    pub list_series_masters: bool,
    /// An occurrence that stops existing while its series goes on (cancelled, or left behind by
    /// a retimed or re-patterned series) gets no `@removed`; only its master changes
    /// (docs PR #4501, "found via experimentation"; closeio/sync-engine #389).
    pub silent_occurrence_removal: bool,
    /// A deleted series reports its occurrences `@removed` as well as its master. Off in the
    /// outlook profile: only the master's id is reported, so a client must drop the series'
    /// occurrences itself.
    pub removed_series_lists_occurrences: bool,
    /// A delta or skip token that cannot be read (edited, foreign, truncated) answers 400
    /// `InvalidDeltaToken` instead of 410 (microsoft-graph-docs #6599 comments; corso and the
    /// SDKs see `ErrorInvalidSyncStateData` on mailbox delta). An evicted state stays 410.
    pub bad_token_is_400: bool,
    /// An item written in another zone is rendered in that zone, under its Windows name,
    /// despite `Prefer: outlook.timezone` (Microsoft Q&A 1382503). Occurrence stubs follow the
    /// header.
    pub own_time_zone_despite_prefer: bool,
}

impl Behaviour {
    /// What production Outlook does.
    pub fn outlook() -> Self {
        Behaviour {
            profile: Profile::Outlook,
            stub_occurrences: true,
            list_series_masters: true,
            silent_occurrence_removal: true,
            removed_series_lists_occurrences: false,
            bad_token_is_400: true,
            own_time_zone_despite_prefer: true,
        }
    }

    /// What the documentation describes.
    pub fn documented() -> Self {
        Behaviour {
            profile: Profile::Documented,
            stub_occurrences: false,
            list_series_masters: false,
            silent_occurrence_removal: false,
            removed_series_lists_occurrences: true,
            bad_token_is_400: false,
            own_time_zone_despite_prefer: false,
        }
    }

    /// The switches of `profile`.
    pub fn of(profile: Profile) -> Self {
        match profile {
            Profile::Outlook => Behaviour::outlook(),
            Profile::Documented => Behaviour::documented(),
        }
    }
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour::outlook()
    }
}

/// The written form: a profile and any switch that differs from it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct BehaviourSpec {
    profile: Profile,
    stub_occurrences: Option<bool>,
    list_series_masters: Option<bool>,
    silent_occurrence_removal: Option<bool>,
    removed_series_lists_occurrences: Option<bool>,
    bad_token_is_400: Option<bool>,
    own_time_zone_despite_prefer: Option<bool>,
}

impl From<BehaviourSpec> for Behaviour {
    fn from(s: BehaviourSpec) -> Self {
        let b = Behaviour::of(s.profile);
        Behaviour {
            profile: s.profile,
            stub_occurrences: s.stub_occurrences.unwrap_or(b.stub_occurrences),
            list_series_masters: s.list_series_masters.unwrap_or(b.list_series_masters),
            silent_occurrence_removal: s
                .silent_occurrence_removal
                .unwrap_or(b.silent_occurrence_removal),
            removed_series_lists_occurrences: s
                .removed_series_lists_occurrences
                .unwrap_or(b.removed_series_lists_occurrences),
            bad_token_is_400: s.bad_token_is_400.unwrap_or(b.bad_token_is_400),
            own_time_zone_despite_prefer: s
                .own_time_zone_despite_prefer
                .unwrap_or(b.own_time_zone_despite_prefer),
        }
    }
}

impl From<Behaviour> for BehaviourSpec {
    fn from(b: Behaviour) -> Self {
        BehaviourSpec {
            profile: b.profile,
            stub_occurrences: Some(b.stub_occurrences),
            list_series_masters: Some(b.list_series_masters),
            silent_occurrence_removal: Some(b.silent_occurrence_removal),
            removed_series_lists_occurrences: Some(b.removed_series_lists_occurrences),
            bad_token_is_400: Some(b.bad_token_is_400),
            own_time_zone_despite_prefer: Some(b.own_time_zone_despite_prefer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_sets_every_switch_and_a_switch_overrides_it() {
        let b: Behaviour = toml::from_str("profile = \"documented\"\nstub_occurrences = true")
            .expect("valid behaviour");
        assert_eq!(
            b,
            Behaviour {
                stub_occurrences: true,
                ..Behaviour::documented()
            }
        );
        let b: Behaviour = toml::from_str("").expect("empty is the default");
        assert_eq!(b, Behaviour::outlook());
        let err = toml::from_str::<Behaviour>("stub_ocurrences = true").unwrap_err();
        assert!(err.to_string().contains("stub_ocurrences"));
    }
}
