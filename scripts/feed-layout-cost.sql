-- Issue 25: what a change would cost to store in other layouts, on synthetic rows shaped like
-- Graph's (152-character event ids, 96-character iCalUIds, a third of them occurrences with a
-- series master id, a 32-character user id): WAL bytes and time per change, medians of 5 reps,
-- 20,000 rows a statement. Layouts: `now` (migration 0011: four identity texts, op and cause
-- as text, the row as a calendar_change_row), `cols` (the row's fields as columns of their
-- own), `compact_row` (a tuple reference and one-byte op/cause codes instead of the texts),
-- `compact` (both). Run on a scratch database:
--   createdb -h 127.0.0.1 -U postgres feedexp
--   psql -h 127.0.0.1 -U postgres -d feedexp -f scripts/feed-layout-cost.sql
-- (BENCHMARKS.md, "The change feed", session 17.)
\set QUIET on
CREATE TYPE crow AS (
    ical_uid text, subject text, start_at timestamptz, end_at timestamptz, is_all_day boolean,
    event_type text, series_master_id text, last_modified_at timestamptz, is_cancelled boolean,
    start_date date, end_date date, organizer_email text, location text, show_as text,
    online_meeting_url text, original_start_time_zone text, time_error text, quarantined text);
CREATE TABLE evs AS
SELECT 'AAMkAGI2THVSAAA' || md5(i::text) || md5((i*7)::text) || md5((i*13)::text) || 'BAAA=' AS event_id,
       '040000008200E00074C5B7101A82E008' || md5(i::text) || md5((i*3)::text) AS ical_uid,
       'Subject of meeting number ' || i AS subject,
       now() + (i || ' hours')::interval AS start_at, now() + (i || ' hours')::interval + interval '1 hour' AS end_at,
       false AS is_all_day, CASE WHEN i % 3 = 0 THEN 'occurrence' ELSE 'singleInstance' END AS event_type,
       CASE WHEN i % 3 = 0 THEN 'AAMkAGI2THVSAAA' || md5((i/3)::text) || md5((i*5)::text) || md5((i*11)::text) || 'BAAA=' END AS series_master_id,
       now() AS last_modified_at, false AS is_cancelled, NULL::date AS start_date, NULL::date AS end_date,
       'organizer' || (i % 50) || '@contoso.onmicrosoft.com' AS organizer_email, 'Room ' || (i % 20) AS location,
       'busy' AS show_as, NULL::text AS online_meeting_url, 'W. Europe Standard Time' AS original_start_time_zone,
       NULL::text AS time_error, NULL::text AS quarantined
FROM generate_series(1, 20000) i;
-- current design
CREATE TABLE c_now (txid bigint NOT NULL DEFAULT txid_current(), seq bigserial, deployment text NOT NULL,
  tuple_key text NOT NULL, user_id text NOT NULL, calendar_id text NOT NULL, event_id text NOT NULL,
  op text NOT NULL CHECK (op IN ('upsert','delete')), cause text NOT NULL, data jsonb,
  written_at timestamptz NOT NULL DEFAULT now(), fields crow, PRIMARY KEY (txid, seq));
-- columns instead of the composite
CREATE TABLE c_cols (txid bigint NOT NULL DEFAULT txid_current(), seq bigserial, deployment text NOT NULL,
  tuple_key text NOT NULL, user_id text NOT NULL, calendar_id text NOT NULL, event_id text NOT NULL,
  op text NOT NULL CHECK (op IN ('upsert','delete')), cause text NOT NULL,
  written_at timestamptz NOT NULL DEFAULT now(),
  ical_uid text, subject text, start_at timestamptz, end_at timestamptz, is_all_day boolean,
  event_type text, series_master_id text, last_modified_at timestamptz, is_cancelled boolean,
  start_date date, end_date date, organizer_email text, location text, show_as text,
  online_meeting_url text, original_start_time_zone text, time_error text, quarantined text,
  PRIMARY KEY (txid, seq));
-- compact: tuple ref, op/cause codes, columns
CREATE TABLE c_compact (txid bigint NOT NULL DEFAULT txid_current(), seq bigserial, tuple_id bigint NOT NULL,
  op "char" NOT NULL, cause "char" NOT NULL, written_at timestamptz NOT NULL DEFAULT now(), event_id text NOT NULL,
  ical_uid text, subject text, start_at timestamptz, end_at timestamptz, is_all_day boolean,
  event_type text, series_master_id text, last_modified_at timestamptz, is_cancelled boolean,
  start_date date, end_date date, organizer_email text, location text, show_as text,
  online_meeting_url text, original_start_time_zone text, time_error text, quarantined text,
  PRIMARY KEY (txid, seq));
-- compact with the composite
CREATE TABLE c_compact_row (txid bigint NOT NULL DEFAULT txid_current(), seq bigserial, tuple_id bigint NOT NULL,
  op "char" NOT NULL, cause "char" NOT NULL, written_at timestamptz NOT NULL DEFAULT now(), event_id text NOT NULL,
  fields crow, PRIMARY KEY (txid, seq));
CHECKPOINT;
-- Each rep: every layout's INSERT between two marks (WAL position, clock), then the tables
-- emptied and a checkpoint, so no layout pays for another's WAL. Temporary tables write none.
CREATE TEMP TABLE marks (kind text, rep int, at text, lsn pg_lsn, t timestamptz);
CREATE TEMP TABLE variant (n int, kind text, stmt text);
INSERT INTO variant VALUES
  (1, 'now', $q$INSERT INTO c_now (deployment, tuple_key, user_id, calendar_id, event_id, op, cause, fields)
SELECT 'default', 'bench-00042', 'user0042@contoso.onmicrosoft.com', 'default', e.event_id, 'upsert', 'delta', ROW(
  e.ical_uid, e.subject, e.start_at, e.end_at, e.is_all_day, e.event_type, e.series_master_id,
  e.last_modified_at, e.is_cancelled, e.start_date, e.end_date, e.organizer_email,
  e.location, e.show_as, e.online_meeting_url, e.original_start_time_zone, e.time_error,
  e.quarantined)::crow FROM evs e;$q$),
  (2, 'cols', $q$INSERT INTO c_cols (deployment, tuple_key, user_id, calendar_id, event_id, op, cause,
  ical_uid, subject, start_at, end_at, is_all_day, event_type, series_master_id, last_modified_at, is_cancelled,
  start_date, end_date, organizer_email, location, show_as, online_meeting_url, original_start_time_zone, time_error, quarantined)
SELECT 'default', 'bench-00042', 'user0042@contoso.onmicrosoft.com', 'default', e.event_id, 'upsert', 'delta',
  e.ical_uid, e.subject, e.start_at, e.end_at, e.is_all_day, e.event_type, e.series_master_id,
  e.last_modified_at, e.is_cancelled, e.start_date, e.end_date, e.organizer_email,
  e.location, e.show_as, e.online_meeting_url, e.original_start_time_zone, e.time_error,
  e.quarantined FROM evs e;$q$),
  (3, 'compact', $q$INSERT INTO c_compact (tuple_id, op, cause, event_id,
  ical_uid, subject, start_at, end_at, is_all_day, event_type, series_master_id, last_modified_at, is_cancelled,
  start_date, end_date, organizer_email, location, show_as, online_meeting_url, original_start_time_zone, time_error, quarantined)
SELECT 42, 'u', 'd', e.event_id,
  e.ical_uid, e.subject, e.start_at, e.end_at, e.is_all_day, e.event_type, e.series_master_id,
  e.last_modified_at, e.is_cancelled, e.start_date, e.end_date, e.organizer_email,
  e.location, e.show_as, e.online_meeting_url, e.original_start_time_zone, e.time_error,
  e.quarantined FROM evs e;$q$),
  (4, 'compact_row', $q$INSERT INTO c_compact_row (tuple_id, op, cause, event_id, fields)
SELECT 42, 'u', 'd', e.event_id, ROW(
  e.ical_uid, e.subject, e.start_at, e.end_at, e.is_all_day, e.event_type, e.series_master_id,
  e.last_modified_at, e.is_cancelled, e.start_date, e.end_date, e.organizer_email,
  e.location, e.show_as, e.online_meeting_url, e.original_start_time_zone, e.time_error,
  e.quarantined)::crow FROM evs e;$q$);
SELECT s FROM (
  SELECT r.rep, v.n * 3 + k AS o,
         CASE k WHEN 1 THEN v.stmt
           ELSE format('INSERT INTO marks SELECT %L, %s, %L, pg_current_wal_insert_lsn(), clock_timestamp()',
                       v.kind, r.rep, CASE k WHEN 0 THEN 'start' ELSE 'end' END) END AS s
  FROM generate_series(1, 5) r(rep), variant v, generate_series(0, 2) k
  UNION ALL SELECT r.rep, 100, 'TRUNCATE c_now, c_cols, c_compact, c_compact_row' FROM generate_series(1, 5) r(rep)
  UNION ALL SELECT r.rep, 101, 'CHECKPOINT' FROM generate_series(1, 5) r(rep)
) x ORDER BY rep, o \gexec

\set QUIET off
SELECT b.kind,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY pg_wal_lsn_diff(e.lsn, b.lsn)) / 20000) AS wal_b,
       round((percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM e.t - b.t)) * 1e6 / 20000)::numeric, 2) AS us
FROM marks b JOIN marks e ON e.kind = b.kind AND e.rep = b.rep AND e.at = 'end'
WHERE b.at = 'start' GROUP BY b.kind ORDER BY b.kind;
DROP TABLE c_now, c_cols, c_compact, c_compact_row, evs;
DROP TYPE crow;
