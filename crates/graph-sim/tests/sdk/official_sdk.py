"""graph-sim driven by Microsoft's official Python SDK (msgraph-sdk, Kiota-generated), unmodified.

What any Graph user would write: a GraphServiceClient whose base URL points at the simulator,
event writes through the SDK's own models and request builders, a full calendarView delta round
(`…/calendarView/delta()` is how every Kiota SDK spells it) and an incremental round from the
deltaLink. What the SDK received must equal the simulator's truth API. Only the token comes from
our code: a client-credentials grant against the simulator's token endpoint (azure-identity
insists on Microsoft's authority over https), through Kiota's own bearer-token provider.

Usage: official_sdk.py PATH/TO/graph-sim SCENARIO.toml
(it starts the simulator itself on 127.0.0.1:0 with the scenario beside this script)
Exit status 0 when every check holds; the first failed check is printed.
"""

import asyncio
import json
import subprocess
import sys
import urllib.parse
import urllib.request

from kiota_abstractions.authentication import (
    AccessTokenProvider,
    AllowedHostsValidator,
    BaseBearerTokenAuthenticationProvider,
)
from kiota_abstractions.base_request_configuration import RequestConfiguration
from msgraph import GraphRequestAdapter, GraphServiceClient
from msgraph.generated.models.date_time_time_zone import DateTimeTimeZone
from msgraph.generated.models.day_of_week import DayOfWeek
from msgraph.generated.models.event import Event
from msgraph.generated.models.location import Location
from msgraph.generated.models.patterned_recurrence import PatternedRecurrence
from msgraph.generated.models.recurrence_pattern import RecurrencePattern
from msgraph.generated.models.recurrence_pattern_type import RecurrencePatternType
from msgraph.generated.models.recurrence_range import RecurrenceRange
from msgraph.generated.models.recurrence_range_type import RecurrenceRangeType
from msgraph.generated.users.item.calendar_view.delta.delta_request_builder import (
    DeltaRequestBuilder,
)

USER = "adele@contoso.onmicrosoft.com"
START, END = "2026-01-01T00:00:00Z", "2026-04-01T00:00:00Z"
TENANT, CLIENT_ID, SECRET = "sim-tenant", "calsync-sim-client", "calsync-sim-secret"


class SimTokens(AccessTokenProvider):
    """The client-credentials grant (the same form Azure AD takes) at the simulator."""

    def __init__(self, origin: str):
        self.origin = origin

    async def get_authorization_token(self, uri, additional_authentication_context=None) -> str:
        form = urllib.parse.urlencode(
            {
                "grant_type": "client_credentials",
                "client_id": CLIENT_ID,
                "client_secret": SECRET,
                "scope": "https://graph.microsoft.com/.default",
            }
        ).encode()
        url = f"{self.origin}/{TENANT}/oauth2/v2.0/token"
        with urllib.request.urlopen(url, data=form) as r:
            return json.load(r)["access_token"]

    def get_allowed_hosts_validator(self) -> AllowedHostsValidator:
        return AllowedHostsValidator([urllib.parse.urlparse(self.origin).netloc])


def check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)


def times(dt: str, zone: str = "UTC") -> DateTimeTimeZone:
    return DateTimeTimeZone(date_time=dt, time_zone=zone)


async def delta_round(client: GraphServiceClient, link: str | None):
    """Follows a round to its deltaLink with the SDK's own builder; returns items and the link."""
    builder = client.users.by_user_id(USER).calendar_view.delta
    config = RequestConfiguration(
        query_parameters=DeltaRequestBuilder.DeltaRequestBuilderGetQueryParameters(
            start_date_time=START, end_date_time=END
        )
    )
    config.headers.add("Prefer", 'outlook.timezone="UTC"')
    config.headers.add("Prefer", "odata.maxpagesize=5")
    page = await (builder.with_url(link).get(config) if link else builder.get(config))
    items, pages = [], 0
    while True:
        pages += 1
        items.extend(page.value or [])
        if page.odata_delta_link:
            return items, page.odata_delta_link, pages
        check(page.odata_next_link is not None, "a page has a nextLink or a deltaLink")
        page = await builder.with_url(page.odata_next_link).get(config)


def truth(admin: str) -> list:
    q = urllib.parse.urlencode({"user": USER, "start": START, "end": END})
    with urllib.request.urlopen(f"{admin}/truth?{q}") as r:
        return json.load(r)


def sdk_time(t: DateTimeTimeZone) -> str:
    check(t.time_zone == "UTC", f"rendered in UTC: {t.time_zone}")
    return t.date_time[:19]


async def main(origin: str) -> None:
    admin = f"{origin}/_sim"
    adapter = GraphRequestAdapter(BaseBearerTokenAuthenticationProvider(SimTokens(origin)))
    adapter.base_url = f"{origin}/v1.0"
    client = GraphServiceClient(request_adapter=adapter)
    events = client.users.by_user_id(USER).events

    # Writes through the SDK's models.
    single = await events.post(
        Event(
            subject="Quarterly planning",
            start=times("2026-01-15T10:00:00"),
            end=times("2026-01-15T11:00:00"),
            location=Location(display_name="Room 4"),
        )
    )
    check(single is not None and single.id, "POST returns the created event")
    series = await events.post(
        Event(
            subject="Weekly standup",
            start=times("2026-01-05T09:00:00", "Pacific Standard Time"),
            end=times("2026-01-05T09:15:00", "Pacific Standard Time"),
            recurrence=PatternedRecurrence(
                pattern=RecurrencePattern(
                    type=RecurrencePatternType.Weekly,
                    interval=1,
                    days_of_week=[DayOfWeek.Monday],
                ),
                range=RecurrenceRange(
                    type=RecurrenceRangeType.Numbered,
                    start_date=__import__("datetime").date(2026, 1, 5),
                    number_of_occurrences=12,
                ),
            ),
        )
    )
    check(series.type.value == "seriesMaster", f"a series master: {series.type}")

    # A full round with the SDK's request builders.
    items, delta_link, pages = await delta_round(client, None)
    check(pages > 1, f"the round was paged: {pages}")
    live = [i for i in items if i.additional_data.get("@removed") is None]
    masters = {i.id for i in live if i.type and i.type.value == "seriesMaster"}
    check(masters == {series.id}, f"Outlook lists the series master: {masters}")
    instances = {i.id: i for i in live if i.id not in masters}
    expected = {t["id"]: t for t in truth(admin)}
    check(set(instances) == set(expected), f"instances {sorted(instances)} != truth {sorted(expected)}")
    for id_, t in expected.items():
        got = instances[id_]
        check(sdk_time(got.start) == t["start"][:19], f"{id_} start {got.start.date_time} != {t['start']}")
        check(sdk_time(got.end) == t["end"][:19], f"{id_} end")
        check(got.type.value == t["event_type"], f"{id_} type")
        check(got.series_master_id == t["series_master_id"], f"{id_} series")
        if got.type.value == "occurrence":
            check(got.subject is None, "occurrences come as stubs (outlook profile)")
        else:
            check(got.subject == t["subject"], f"{id_} subject")
    # The stubs' series, read with the SDK (calendar-scoped, as a hydrating client does).
    master = await client.users.by_user_id(USER).calendar.events.by_event_id(series.id).get()
    check(master.subject == "Weekly standup", "the master has the series' fields")
    check(master.original_start_time_zone == "Pacific Standard Time", "its zone")

    # Writes, then the incremental round from the deltaLink.
    await events.by_event_id(single.id).patch(Event(subject="Quarterly planning (moved)"))
    occurrence = next(i for i in instances.values() if i.type.value == "occurrence")
    await events.by_event_id(occurrence.id).delete()
    items, _, _ = await delta_round(client, delta_link)
    changed = {i.id: i for i in items}
    check(changed[single.id].subject == "Quarterly planning (moved)", "the edit arrives")
    check(series.id in changed, "the cancelled occurrence's master comes back changed")
    check(occurrence.id not in changed, "and the occurrence itself is silent (outlook profile)")
    after = {t["id"] for t in truth(admin)}
    check(occurrence.id not in after and single.id in after, "the truth agrees")
    print(f"official SDK: {len(expected)} instances over {pages} pages, incremental round ok")


def run() -> int:
    binary, scenario = sys.argv[1], sys.argv[2]
    sim = subprocess.Popen(
        [binary, "--listen", "127.0.0.1:0", "--scenario", scenario],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        origin = None
        for line in sim.stdout:
            if line.startswith("graph-sim listening on "):
                origin = line.split()[-1].strip()
                break
        check(origin is not None, "graph-sim printed its address")
        origin = origin.rstrip("/")
        if not origin.startswith("http"):
            origin = f"http://{origin}"
        asyncio.run(main(origin))
        return 0
    except AssertionError as e:
        print(f"official SDK check failed: {e}", file=sys.stderr)
        return 1
    finally:
        sim.terminate()
        sim.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(run())
