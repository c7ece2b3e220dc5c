#!/usr/bin/env bash
# Start a local PostgreSQL (installing it if needed) with a throwaway role and database for the
# shared-study tests; prints the SQLAlchemy URL. Loopback only.
set -euo pipefail
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
fi
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | grep -q "^$version main"; then
  pg_createcluster "$version" main >/dev/null
fi
pg_ctlcluster "$version" main start 2>/dev/null || true
for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done
su postgres -c "psql -q -c \"DROP DATABASE IF EXISTS lora_search_test\"" 2>/dev/null
su postgres -c "psql -q -c \"DO \\\$\\\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='lora') THEN CREATE ROLE lora LOGIN PASSWORD 'lora'; END IF; END \\\$\\\$\""
su postgres -c "psql -q -c \"CREATE DATABASE lora_search_test OWNER lora\""
echo "postgresql+psycopg://lora:lora@127.0.0.1:5432/lora_search_test"
