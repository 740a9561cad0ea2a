# balancer container image: `docker build -t balancer:0.1.0 .`
#
# Build arguments:
#   BASE_IMAGE  the Python base of both stages. Pinned by tag by default; to pin it by digest
#               (reproducible builds, no silent base changes), look the digest up and pass or
#               write it here, e.g.
#                 docker buildx imagetools inspect python:3.11-slim   # prints "Digest: sha256:..."
#                 --build-arg BASE_IMAGE=python:3.11-slim@sha256:<digest>
#               and bump it when Debian or Python security fixes land (re-run the inspect).
#   VERSION     org.opencontainers.image.version; keep it the package's version (a test does).
#   SOURCE_URL  org.opencontainers.image.source, e.g. `--build-arg SOURCE_URL=$(git remote
#               get-url origin)`; registries link the image to its repository with it.
#
# The configuration comes from a mounted file (the Helm chart mounts its ConfigMap at
# /etc/balancer); BALANCER_<SECTION>_<KEY> environment variables override it.
#   docker run -p 8080:8080 -v $PWD/balancer.yaml:/etc/balancer/balancer.yaml:ro balancer:0.1.0

ARG BASE_IMAGE=python:3.11-slim

# Build stage: the wheel, installed with its dependencies into a virtualenv. Every dependency
# ships manylinux wheels, so no compiler is needed here either.
FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY balancer ./balancer
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/balancer \
 && /opt/balancer/bin/pip install /wheels/*.whl \
 && /opt/balancer/bin/pip uninstall --yes pip

# Final stage: the base image and the virtualenv; no sources, wheels or build tools.
FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="balancer" \
      org.opencontainers.image.description="Kubernetes-native, KV-cache-aware load balancer for OpenAI-compatible LLM servers (CHWBL prefix routing)" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /opt/balancer /opt/balancer
ENV PATH=/opt/balancer/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# A numeric non-root user, so Kubernetes can check runAsNonRoot (the chart's is the same).
USER 65532:65532
EXPOSE 8080 9090
# `python -m balancer` rather than the `balancer` script: the processes that parse large
# bodies (limits.offload_parse_bytes) re-import the main module, and the script brings the
# whole program with it (~40 MB a worker, against ~17 MB from the package's __main__).
ENTRYPOINT ["python", "-m", "balancer"]
CMD ["serve", "--config", "/etc/balancer/balancer.yaml"]
