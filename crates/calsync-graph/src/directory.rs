//! Directory reads for discovery: the tenant's users (`/users`, with the operator's `$filter`),
//! a group's transitive members, rooms (`/places/microsoft.graph.room`) and a mailbox's
//! calendars. Every list is followed through its `@odata.nextLink`s, which are held to the
//! configured Graph origin like any link.

use crate::{Connection, GraphClient, GraphError};
use serde::Deserialize;
use url::Url;

/// A mailbox a directory source names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Principal {
    /// The directory object id (for rooms: the place id).
    pub id: String,
    /// The address calsync syncs it by: the user's `userPrincipalName`, a room's
    /// `emailAddress`.
    pub address: String,
    /// Whether the directory gives it a mail address (a user without one has no mailbox).
    pub has_mail: bool,
}

/// One of a mailbox's calendars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalendarInfo {
    /// Graph id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Whether it is the mailbox's default calendar.
    pub is_default: bool,
}

#[derive(Deserialize)]
struct Page<T> {
    value: Vec<T>,
    #[serde(rename = "@odata.nextLink")]
    next: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawUser {
    id: String,
    user_principal_name: Option<String>,
    mail: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRoom {
    id: String,
    email_address: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawCalendar {
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    is_default_calendar: bool,
}

/// The most a directory page holds (Graph: `$top` at most 999).
const DIRECTORY_PAGE: &str = "999";

impl GraphClient {
    fn directory_url(&self, segments: &[&str]) -> Url {
        let mut url = self.base_url().clone();
        if let Ok(mut segs) = url.path_segments_mut() {
            segs.pop_if_empty().extend(segments);
        }
        url
    }

    /// Every item of a list, page after page.
    async fn list_all<T: for<'de> Deserialize<'de>>(
        &self,
        first: Url,
        what: &str,
        eventual: bool,
    ) -> Result<Vec<T>, GraphError> {
        let mut out = Vec::new();
        let mut url = first;
        loop {
            let (body, _) = self.get_ok_with(&url, Connection::Reuse, eventual).await?;
            let page: Page<T> =
                serde_json::from_slice(&body).map_err(|e| GraphError::Malformed {
                    reason: format!("a page of {what} is not what Graph sends: {e}"),
                })?;
            out.extend(page.value);
            match page.next {
                Some(next) => url = self.check_link(&next)?,
                None => return Ok(out),
            }
        }
    }

    /// The tenant's users (`User.Read.All`), narrowed by an OData `$filter` if given (e.g.
    /// `accountEnabled eq true and department eq 'Sales'`). A filter is sent as an advanced
    /// query (`ConsistencyLevel: eventual`, `$count=true`), so `ne`, `not` and `endsWith` work
    /// too (Microsoft Learn, "Advanced query capabilities on Microsoft Entra ID objects").
    pub async fn list_users(&self, filter: Option<&str>) -> Result<Vec<Principal>, GraphError> {
        let mut url = self.directory_url(&["users"]);
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("$select", "id,userPrincipalName,mail")
                .append_pair("$top", DIRECTORY_PAGE);
            if let Some(f) = filter {
                q.append_pair("$filter", f).append_pair("$count", "true");
            }
        }
        let users: Vec<RawUser> = self.list_all(url, "users", filter.is_some()).await?;
        Ok(users.into_iter().filter_map(principal).collect())
    }

    /// Every user in a group or a group nested in it (`GroupMember.Read.All`).
    pub async fn list_group_users(&self, group: &str) -> Result<Vec<Principal>, GraphError> {
        let mut url =
            self.directory_url(&["groups", group, "transitiveMembers", "microsoft.graph.user"]);
        url.query_pairs_mut()
            .append_pair("$select", "id,userPrincipalName,mail")
            .append_pair("$top", DIRECTORY_PAGE);
        let users: Vec<RawUser> = self.list_all(url, "group members", false).await?;
        Ok(users.into_iter().filter_map(principal).collect())
    }

    /// The tenant's rooms (`Place.Read.All`), by their mailbox address.
    pub async fn list_rooms(&self) -> Result<Vec<Principal>, GraphError> {
        let mut url = self.directory_url(&["places", "microsoft.graph.room"]);
        url.query_pairs_mut().append_pair("$top", DIRECTORY_PAGE);
        let rooms: Vec<RawRoom> = self.list_all(url, "rooms", false).await?;
        Ok(rooms
            .into_iter()
            .filter_map(|r| {
                let address = r.email_address.filter(|a| !a.is_empty())?;
                Some(Principal {
                    id: r.id,
                    address,
                    has_mail: true,
                })
            })
            .collect())
    }

    /// A mailbox's calendars (`Calendars.Read`). A mailbox Graph refuses answers its error
    /// (`MailboxNotEnabledForRESTAPI` is a `NotFound`).
    pub async fn list_calendars(&self, user: &str) -> Result<Vec<CalendarInfo>, GraphError> {
        let mut url = self.directory_url(&["users", user, "calendars"]);
        url.query_pairs_mut()
            .append_pair("$select", "id,name,isDefaultCalendar");
        let cals: Vec<RawCalendar> = self.list_all(url, "calendars", false).await?;
        Ok(cals
            .into_iter()
            .map(|c| CalendarInfo {
                id: c.id,
                name: c.name,
                is_default: c.is_default_calendar,
            })
            .collect())
    }
}

fn principal(u: RawUser) -> Option<Principal> {
    let address = u.user_principal_name.filter(|a| !a.is_empty())?;
    Some(Principal {
        id: u.id,
        address,
        has_mail: u.mail.is_some_and(|m| !m.is_empty()),
    })
}
