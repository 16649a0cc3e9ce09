-- port25 fleet registry: database, roles and grants (PostgreSQL 13+).
-- Run once as a superuser:  psql -v fleet_password="'...'" -f deploy/port25-fleet.sql
--
-- Two roles: `port25_owner` owns the schema and runs its migrations (the first daemon that
-- connects with it creates the tables; later versions add steps), `port25` is what every
-- router's daemon uses day to day: row access to the tables it uses, no DDL, no superuser.
-- A daemon connecting as `port25` to a schema older than its binary cannot migrate it. The
-- owner cannot log in: start one daemon once with a superuser's connection string that takes
-- the owner's role, `host=... dbname=port25 user=postgres options='-c role=port25_owner'`,
-- run the GRANTs at the end of this file, then go back to `user=port25`
-- (tests/tests/fleet.rs `the_deploy_scripts_roles_are_enough_and_no_more` does exactly this).

CREATE ROLE port25_owner NOLOGIN;
CREATE ROLE port25 LOGIN PASSWORD :fleet_password;
CREATE DATABASE port25 OWNER port25_owner;
\connect port25
ALTER SCHEMA public OWNER TO port25_owner;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO port25;

-- Tables created by port25_owner (a migration) get these grants by default:
ALTER DEFAULT PRIVILEGES FOR ROLE port25_owner IN SCHEMA public
    REVOKE ALL ON TABLES FROM PUBLIC;
-- users, bindings, entries: the fleet's policy (upserts and deletes of a policy change).
-- sessions: each router's published live sessions.
-- audit: append-only (an UPDATE/DELETE trigger guards it as well); changes: appended,
-- and its oldest rows deleted past registry.keep_changes (changes_pruned records the cut).
-- schema_version: read at every connection.
ALTER DEFAULT PRIVILEGES FOR ROLE port25_owner IN SCHEMA public
    GRANT SELECT ON TABLES TO port25;
ALTER DEFAULT PRIVILEGES FOR ROLE port25_owner IN SCHEMA public
    GRANT USAGE ON SEQUENCES TO port25;

-- Once the owner has created the tables (first start with the owner's connection string):
--   GRANT SELECT, INSERT, UPDATE, DELETE ON users, bindings, entries, sessions, routers TO port25;
--   GRANT INSERT ON audit, changes TO port25;
--   GRANT DELETE ON changes TO port25;                     -- registry.keep_changes
--   GRANT SELECT, INSERT, UPDATE ON changes_pruned TO port25;
-- (Run these GRANTs again after an upgrade that adds tables; the release notes say so.)
