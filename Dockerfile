# mtlsgate: one image for every role (control plane, proxy node, CLI, demo echo backend).
#   docker build -t mtlsgate .                      # on the public Python image
#   docker build --build-arg BASE_IMAGE=mtlsgate-base:ci -t mtlsgate .   # any Debian-like image with python3 + venv
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
WORKDIR /src
# Dependencies first, so editing the code does not re-download them.
COPY pyproject.toml setup.py README.md ./
COPY proto ./proto
RUN /opt/venv/bin/python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); \
print('\n'.join(d['project']['dependencies']))" > /tmp/requirements.txt \
 && /opt/venv/bin/pip install -q -r /tmp/requirements.txt
COPY control_plane ./control_plane
COPY data_plane ./data_plane
RUN /opt/venv/bin/pip install -q . && /opt/venv/bin/mtlsgate --help >/dev/null

FROM ${BASE_IMAGE}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/venv /opt/venv
# Unprivileged user; /pki and /data are the volumes compose mounts (PKI files, SQLite store, node caches).
RUN groupadd --system --gid 10001 mtlsgate \
 && useradd --system --uid 10001 --gid mtlsgate --home-dir /data --shell /usr/sbin/nologin mtlsgate \
 && mkdir -p /pki /data \
 && chown mtlsgate:mtlsgate /pki /data
USER mtlsgate
WORKDIR /data
# 18000 control plane (gRPC API + xDS), 9901 proxy admin, 8443/8444 demo listeners, 9000 echo backend.
EXPOSE 18000 9901 8443 8444 9000
ENTRYPOINT ["mtlsgate"]
CMD ["--help"]
