//! The directory: `/users` (paging, `$filter`, `$select`), group members, rooms, calendars of a
//! mailbox, and users without a mailbox.

use super::*;
use graph_sim::MailboxKind;

async fn tenant() -> Session {
    let s = start().await;
    {
        let mut st = s.sim.lock();
        for i in 0..250 {
            let (kind, dept) = match i % 10 {
                0 => (MailboxKind::None, "Sales"),
                1 => (MailboxKind::Room, "Facilities"),
                _ => (MailboxKind::User, if i % 2 == 0 { "Sales" } else { "R&D" }),
            };
            st.tenant.add_directory_user(
                &format!("u{i:03}@contoso.onmicrosoft.com"),
                &format!("User {i}"),
                kind,
                Some(dept),
            );
        }
    }
    s
}

/// Every page of a list, following `@odata.nextLink` as given.
async fn all_pages(s: &Session, first: &str) -> (Vec<Value>, usize) {
    let (mut out, mut pages, mut url) = (Vec::new(), 0, first.to_owned());
    loop {
        let (status, _, body) = s.get(&url, None).await;
        assert_eq!(status, 200, "{body}");
        pages += 1;
        out.extend(body["value"].as_array().unwrap().iter().cloned());
        match body["@odata.nextLink"].as_str() {
            Some(next) => url = next.to_owned(),
            None => return (out, pages),
        }
    }
}

#[tokio::test]
async fn users_are_listed_100_a_page_by_default_and_at_most_999() {
    let s = tenant().await;
    let (users, pages) = all_pages(&s, &format!("{}/users", s.base())).await;
    assert_eq!((users.len(), pages), (252, 3));
    // The default property set: no accountEnabled, no department (user-list docs).
    assert!(
        users[0].get("accountEnabled").is_none() && users[0].get("userPrincipalName").is_some()
    );
    let (_, pages) = all_pages(&s, &format!("{}/users?$top=999", s.base())).await;
    assert_eq!(pages, 1);
    let (status, _, body) = s.get(&format!("{}/users?$top=1000", s.base()), None).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("between 1 and 999")
    );
}

#[tokio::test]
async fn users_are_filtered_and_selected_as_graph_does() {
    let s = tenant().await;
    let url = format!(
        "{}/users?$filter={}&$select=id,userPrincipalName,department,accountEnabled,mail&$top=50",
        s.base(),
        "accountEnabled eq true and department eq 'Sales'".replace(' ', "%20")
    );
    let (users, _) = all_pages(&s, &url).await;
    // Sales: every even index; rooms are disabled accounts and in Facilities.
    assert_eq!(users.len(), 125);
    assert!(
        users
            .iter()
            .all(|u| u["department"] == "Sales" && u["accountEnabled"] == true)
    );
    assert!(
        users[0].get("displayName").is_none(),
        "$select keeps what it names"
    );
    // Mailbox-less users have no mail.
    assert_eq!(users.iter().filter(|u| u["mail"].is_null()).count(), 25);
    let (r, _) = all_pages(
        &s,
        &format!(
            "{}/users?$filter=startswith(userPrincipalName,'u00')",
            s.base()
        ),
    )
    .await;
    assert_eq!(r.len(), 10);
    // `ne` is an advanced query: refused without `ConsistencyLevel: eventual` and `$count`.
    let ne = format!("{}/users?$filter=accountEnabled%20ne%20true", s.base());
    let (status, _, body) = s.get(&ne, None).await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (400, Some("Request_UnsupportedQuery"))
    );
    let advanced: Value = s
        .http
        .get(format!("{ne}&$count=true"))
        .bearer_auth(&s.token)
        .header("ConsistencyLevel", "eventual")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        advanced["@odata.count"], 25,
        "the rooms' accounts are disabled"
    );
    let (status, _, body) = s
        .get(
            &format!("{}/users?$filter=jobTitle%20eq%20'x'", s.base()),
            None,
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (400, Some("Request_UnsupportedQuery"))
    );
}

#[tokio::test]
async fn a_user_without_a_mailbox_is_listed_but_its_calendar_is_refused() {
    let s = tenant().await;
    let url = format!("{}/users/u000@contoso.onmicrosoft.com/calendars", s.base());
    let (status, _, body) = s.get(&url, None).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "MailboxNotEnabledForRESTAPI");
    // The directory still knows the user.
    let (status, _, _) = s
        .get(
            &format!("{}/users/u000@contoso.onmicrosoft.com", s.base()),
            None,
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn rooms_groups_and_calendars_are_listed_and_follow_their_changes() {
    let s = tenant().await;
    let (rooms, _) = all_pages(&s, &format!("{}/places/microsoft.graph.room", s.base())).await;
    assert_eq!(rooms.len(), 25);
    assert!(
        rooms[0]["emailAddress"]
            .as_str()
            .unwrap()
            .ends_with("@contoso.onmicrosoft.com")
    );
    let (group, inner) = {
        let mut st = s.sim.lock();
        let inner = st.tenant.add_group("inner", vec![5, 6], vec![]);
        let outer = st.tenant.add_group("outer", vec![2, 5], vec![inner]);
        (st.tenant.groups[outer].id.clone(), inner)
    };
    let url = format!(
        "{}/groups/{group}/transitiveMembers/microsoft.graph.user?$select=id,userPrincipalName",
        s.base()
    );
    let (members, _) = all_pages(&s, &url).await;
    assert_eq!(members.len(), 3, "each user once: {members:?}");
    let (direct, _) = all_pages(&s, &url.replace("transitiveMembers", "members")).await;
    assert_eq!(direct.len(), 2);
    s.sim.lock().tenant.groups[inner].users.push(7);
    assert_eq!(all_pages(&s, &url).await.0.len(), 4);
    let (status, _, _) = s
        .get(
            &format!(
                "{}/groups/nope/transitiveMembers/microsoft.graph.user",
                s.base()
            ),
            None,
        )
        .await;
    assert_eq!(status, 404);
    // A calendar created, renamed, deleted.
    let cals = format!("{}/users/u002@contoso.onmicrosoft.com/calendars", s.base());
    let id = {
        let mut st = s.sim.lock();
        let u = st
            .tenant
            .user_index("u002@contoso.onmicrosoft.com")
            .unwrap();
        st.tenant.add_calendar(u, "Team")
    };
    let names = async || -> Vec<String> {
        let (_, _, b) = s.get(&cals, None).await;
        b["value"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names().await, ["Calendar", "Team"]);
    {
        let mut st = s.sim.lock();
        let u = st
            .tenant
            .user_index("u002@contoso.onmicrosoft.com")
            .unwrap();
        assert!(st.tenant.rename_calendar(u, &id, "Team (old)"));
    }
    assert_eq!(names().await, ["Calendar", "Team (old)"]);
    {
        let mut st = s.sim.lock();
        let u = st
            .tenant
            .user_index("u002@contoso.onmicrosoft.com")
            .unwrap();
        assert!(st.tenant.delete_calendar(u, &id));
    }
    assert_eq!(names().await, ["Calendar"]);
    // A user deleted from the directory leaves the list and its mailbox.
    {
        let mut st = s.sim.lock();
        let u = st
            .tenant
            .user_index("u002@contoso.onmicrosoft.com")
            .unwrap();
        st.tenant.delete_user(u);
    }
    assert_eq!(s.get(&cals, None).await.0, 404);
    assert_eq!(
        all_pages(&s, &format!("{}/users?$top=999", s.base()))
            .await
            .0
            .len(),
        251
    );
}

#[tokio::test]
async fn directory_reads_need_a_token() {
    let s = tenant().await;
    let r = s
        .http
        .get(format!("{}/users", s.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn an_administrator_changes_users_groups_and_calendars_over_the_admin_api() {
    let s = start().await;
    let admin = |m: reqwest::Method, path: &str| {
        s.http
            .request(m, format!("{}{path}", s.server.admin_url()))
            .send()
    };
    let r = admin(
        reqwest::Method::POST,
        "/users?upn=new@contoso.onmicrosoft.com&name=New&mailbox=on_premises&department=Ops",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        admin(
            reqwest::Method::POST,
            "/users?upn=new@contoso.onmicrosoft.com"
        )
        .await
        .unwrap()
        .status(),
        409
    );
    assert_eq!(
        admin(reqwest::Method::POST, "/users?upn=x@y&mailbox=mars")
            .await
            .unwrap()
            .status(),
        400
    );
    let users = format!(
        "{}/users?$select=userPrincipalName,department&$filter=department%20eq%20'Ops'",
        s.base()
    );
    assert_eq!(
        s.get(&users, None).await.2["value"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let g: Value = admin(
        reqwest::Method::POST,
        "/groups?name=ops&members=new@contoso.onmicrosoft.com",
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let g = g["id"].as_str().unwrap();
    let members = format!("{}/groups/{g}/members/microsoft.graph.user", s.base());
    assert_eq!(
        s.get(&members, None).await.2["value"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let alex = "alex@contoso.onmicrosoft.com";
    assert_eq!(
        admin(
            reqwest::Method::POST,
            &format!("/groups/members?group={g}&user={alex}")
        )
        .await
        .unwrap()
        .status(),
        200
    );
    assert_eq!(
        s.get(&members, None).await.2["value"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    admin(
        reqwest::Method::DELETE,
        &format!("/groups/members?group={g}&user={alex}"),
    )
    .await
    .unwrap();
    assert_eq!(
        s.get(&members, None).await.2["value"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let c: Value = admin(
        reqwest::Method::POST,
        &format!("/calendars?user={alex}&name=Side"),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let id = c["id"].as_str().unwrap();
    assert_eq!(
        admin(
            reqwest::Method::PATCH,
            &format!("/calendars?user={alex}&id={id}&name=Side2")
        )
        .await
        .unwrap()
        .status(),
        200
    );
    let cals = format!("{}/users/{alex}/calendars", s.base());
    assert_eq!(s.get(&cals, None).await.2["value"][1]["name"], "Side2");
    assert_eq!(
        admin(
            reqwest::Method::DELETE,
            &format!("/calendars?user={alex}&id={id}")
        )
        .await
        .unwrap()
        .status(),
        200
    );
    assert_eq!(
        s.get(&cals, None).await.2["value"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        admin(
            reqwest::Method::DELETE,
            "/users?user=new@contoso.onmicrosoft.com"
        )
        .await
        .unwrap()
        .status(),
        200
    );
    assert_eq!(
        s.get(&users, None).await.2["value"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
}
