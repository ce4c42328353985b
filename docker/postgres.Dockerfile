# PostgreSQL for the HA compose variant where no registry is reachable (CI): Debian's `postgresql` package
# on the same Debian base image as mtlsgate's, configured by the official image's variables (POSTGRES_USER,
# POSTGRES_PASSWORD, POSTGRES_DB, PGDATA), so compose.ha.yaml runs unchanged on either image.
#   docker build -f docker/postgres.Dockerfile --build-arg BASE_IMAGE=mtlsgate-base:ci -t mtlsgate-postgres .
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# No default cluster: the entrypoint initialises PGDATA on first start, as the official image does.
RUN mkdir -p /etc/postgresql-common \
 && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf \
 && apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s "$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"/* /usr/local/bin/ \
 && mkdir -p /var/lib/postgresql/data \
 && chown -R postgres:postgres /var/lib/postgresql
COPY docker/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PGDATA=/var/lib/postgresql/data
USER postgres
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
