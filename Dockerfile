# syntax=docker/dockerfile:1
# The Kubetune operator (kopf). Build from the repository root:
#   docker build -t ghcr.io/kubetune/operator:0.1.0 .
# Base: python:3.11.13-slim-bookworm, pinned by digest (multi-arch index).

FROM python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1 AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/kubetune
COPY pyproject.toml ./
COPY api/ api/
COPY search/ search/
COPY operator/ operator/
COPY trainer-image/kubetune_trainer/ trainer-image/kubetune_trainer/
RUN /opt/kubetune/bin/pip install --no-cache-dir ".[operator]"

FROM python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.description="Kubetune operator: reconciles FineTuneJobs" \
      org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 65532 kubetune \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin kubetune
COPY --from=build /opt/kubetune /opt/kubetune
ENV PATH=/opt/kubetune/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KUBETUNE_METRICS_PORT=8080 \
    KUBETUNE_HEALTH_PORT=8081
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "kubetune_operator"]
CMD ["--all-namespaces"]
