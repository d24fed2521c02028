#!/bin/sh
# Runs once, when PostgreSQL initialises an empty data directory (/docker-entrypoint-initdb.d):
# one role and one database per service, so that a service reaches only its own data, as in
# production (database per service). docker compose (deploy/compose/init-databases.sh) and
# the dev cluster (deploy/k8s/overlays/dev/postgres-init.sh) run the same script; a test keeps
# the two copies identical.
#
# Each password comes from the environment, <SERVICE>_DB_PASSWORD (compose: from the
# git-ignored .env; dev cluster: from the Secret lotse-postgres-roles; both written by
# `./lotse dev-secrets`), never from the repository. psql quotes it (:'password'), so no value
# can change the statements. The image's entrypoint may source this file instead of running
# it: hence no `set` and no `exit` except on failure.

for lotse_service in ${LOTSE_DB_SERVICES:-intake visits referrals reporting delivery}; do
    lotse_variable="$(echo "$lotse_service" | tr '[:lower:]' '[:upper:]')_DB_PASSWORD"
    lotse_password="$(printenv "$lotse_variable")"
    if [ -z "$lotse_password" ]; then
        echo "init-databases: $lotse_variable is not set (run ./lotse dev-secrets)" >&2
        exit 1
    fi
    psql -v ON_ERROR_STOP=1 --no-psqlrc \
        --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
        -v service="$lotse_service" -v password="$lotse_password" <<'SQL' || exit 1
CREATE ROLE :"service" LOGIN PASSWORD :'password';
CREATE DATABASE :"service" OWNER :"service";
REVOKE ALL ON DATABASE :"service" FROM PUBLIC;
SQL
done
unset lotse_service lotse_variable lotse_password
