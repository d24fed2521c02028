-- Runs once, when the dev PostgreSQL (postgres.yaml) initialises its empty data directory.
-- One role and one database per service, as in production (database per service). The
-- passwords match the dev Secrets lotse-<service>-db in kustomization.yaml: development only.

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
