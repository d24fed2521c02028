-- Runs once, when the compose PostgreSQL volume is first initialised
-- (/docker-entrypoint-initdb.d). One role and one database per service: a service can reach
-- only its own data, as in production (database per service).
--
-- Passwords are for local development only. Production credentials live in the Kubernetes
-- Secrets lotse-<service>-db (key "url"), never in this repository.

CREATE ROLE intake LOGIN PASSWORD 'intake';
CREATE DATABASE intake OWNER intake;
REVOKE ALL ON DATABASE intake FROM PUBLIC;

CREATE ROLE visits LOGIN PASSWORD 'visits';
CREATE DATABASE visits OWNER visits;
REVOKE ALL ON DATABASE visits FROM PUBLIC;

CREATE ROLE referrals LOGIN PASSWORD 'referrals';
CREATE DATABASE referrals OWNER referrals;
REVOKE ALL ON DATABASE referrals FROM PUBLIC;

CREATE ROLE reporting LOGIN PASSWORD 'reporting';
CREATE DATABASE reporting OWNER reporting;
REVOKE ALL ON DATABASE reporting FROM PUBLIC;
