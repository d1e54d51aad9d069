-- What one change costs to store, as jsonb (`data`) and as a calendar_change_row (`fields`),
-- and with neither: WAL bytes and time per change for 20,000 of the events a benchmark left.
-- Run after calsync-bench, on its database:
--   psql -h 127.0.0.1 -U postgres -d calsync_bench -f scripts/feed-row-cost.sql
-- (BENCHMARKS.md, issue 25.) Writes three tables of its own (temporary tables write no WAL)
-- and drops them.
\set QUIET on
\pset footer off
CREATE TEMP TABLE evs AS
SELECT e.*, COALESCE(e.subject, s.subject) AS s_subject, s.is_all_day AS s_all_day
FROM events e LEFT JOIN series s ON s.tuple_id = e.tuple_id AND s.master_id = e.series_master_id
LIMIT 20000;
CREATE TABLE feed_cost_jsonb (LIKE calendar_changes INCLUDING DEFAULTS INCLUDING INDEXES);
CREATE TABLE feed_cost_row (LIKE calendar_changes INCLUDING DEFAULTS INCLUDING INDEXES);
CREATE TABLE feed_cost_none (LIKE calendar_changes INCLUDING DEFAULTS INCLUDING INDEXES);
CREATE TEMP TABLE cost (kind text, wal_bytes numeric, ms numeric);

SELECT pg_current_wal_insert_lsn() AS l0, clock_timestamp() AS t0 \gset
INSERT INTO feed_cost_jsonb (deployment, tuple_key, user_id, calendar_id, event_id, op, cause, data)
SELECT 'd', 't', 'u', 'c', e.event_id, 'upsert', 'delta', jsonb_build_object(
  'event_id', e.event_id, 'ical_uid', e.ical_uid, 'subject', e.s_subject, 'start_at', e.start_at,
  'end_at', e.end_at, 'is_all_day', e.is_all_day, 'event_type', e.event_type,
  'series_master_id', e.series_master_id, 'last_modified_at', e.last_modified_at,
  'is_cancelled', COALESCE(e.is_cancelled, false), 'start_date', e.start_date, 'end_date', e.end_date,
  'organizer_email', e.organizer_email, 'location', e.location, 'show_as', e.show_as,
  'online_meeting_url', e.online_meeting_url, 'original_start_time_zone', e.original_start_time_zone,
  'time_error', e.time_error, 'quarantined', e.quarantined)
FROM evs e;
INSERT INTO cost SELECT 'jsonb', pg_wal_lsn_diff(pg_current_wal_insert_lsn(), :'l0'),
  extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) * 1000;

SELECT pg_current_wal_insert_lsn() AS l0, clock_timestamp() AS t0 \gset
INSERT INTO feed_cost_row (deployment, tuple_key, user_id, calendar_id, event_id, op, cause, fields)
SELECT 'd', 't', 'u', 'c', e.event_id, 'upsert', 'delta', ROW(
  e.ical_uid, e.s_subject, e.start_at, e.end_at, e.is_all_day, e.event_type, e.series_master_id,
  e.last_modified_at, COALESCE(e.is_cancelled, false), e.start_date, e.end_date, e.organizer_email,
  e.location, e.show_as, e.online_meeting_url, e.original_start_time_zone, e.time_error,
  e.quarantined)::calendar_change_row
FROM evs e;
INSERT INTO cost SELECT 'calendar_change_row', pg_wal_lsn_diff(pg_current_wal_insert_lsn(), :'l0'),
  extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) * 1000;

SELECT pg_current_wal_insert_lsn() AS l0, clock_timestamp() AS t0 \gset
INSERT INTO feed_cost_none (deployment, tuple_key, user_id, calendar_id, event_id, op, cause)
SELECT 'd', 't', 'u', 'c', e.event_id, 'upsert', 'delta' FROM evs e;
INSERT INTO cost SELECT 'no row', pg_wal_lsn_diff(pg_current_wal_insert_lsn(), :'l0'),
  extract(epoch FROM clock_timestamp() - :'t0'::timestamptz) * 1000;

\set QUIET off
SELECT kind, round(wal_bytes / (SELECT count(*) FROM evs)) AS wal_bytes_per_change,
       round(ms * 1000 / (SELECT count(*) FROM evs), 2) AS us_per_change
FROM cost;
DROP TABLE feed_cost_jsonb, feed_cost_row, feed_cost_none;
