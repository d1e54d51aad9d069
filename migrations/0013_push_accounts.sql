-- calsync schema v13: change notifications for calendars read through a delegated account
-- (issue 26). Such a subscription is made with the account's token on `/me/...`, and Graph
-- lets only its maker renew or delete it, so the row keeps whose it is: `account` (NULL: the
-- app's). Append-only: never edit this file once released.
ALTER TABLE push_subscriptions ADD COLUMN account text;
