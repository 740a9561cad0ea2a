# balancer container image: `docker build -t balancer:0.1.0 .`
#
# The configuration comes from a mounted file (the Helm chart mounts its ConfigMap at
# /etc/balancer); BALANCER_<SECTION>_<KEY> environment variables override it.
#   docker run -p 8080:8080 -v $PWD/balancer.yaml:/etc/balancer/balancer.yaml:ro balancer:0.1.0

ARG PYTHON_VERSION=3.11

# Build stage: the wheel, installed with its dependencies into a virtualenv. Every dependency
# ships manylinux wheels, so no compiler is needed here either.
FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY balancer ./balancer
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/balancer \
 && /opt/balancer/bin/pip install /wheels/*.whl \
 && /opt/balancer/bin/pip uninstall --yes pip

# Final stage: the base image and the virtualenv; no sources, wheels or build tools.
FROM python:${PYTHON_VERSION}-slim
LABEL org.opencontainers.image.title="balancer" \
      org.opencontainers.image.description="KV-cache-aware LLM load balancer (CHWBL)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/balancer /opt/balancer
ENV PATH=/opt/balancer/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# A numeric non-root user, so Kubernetes can check runAsNonRoot (the chart's is the same).
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["balancer"]
CMD ["serve", "--config", "/etc/balancer/balancer.yaml"]
