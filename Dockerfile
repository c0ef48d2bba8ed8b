# ExpertPlane: controller, operator, node agent, reference worker and the CLI in one image.
#
#   docker build -t expertplane:0.1.0 .                      # CPU torch (controller, operator, agent)
#   docker build -t expertplane:0.1.0-cu128 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .   # CUDA torch for workers
#   docker run --rm expertplane:0.1.0 plan --help
#
# The tag follows the version in pyproject.toml; manifests/ and manifests/kustomization.yaml use
# the same tag (checked by tests/test_manifests_image.py). See docs/operator.md.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
# torch comes first, from TORCH_INDEX, so pip does not pull the default (CUDA) wheel from PyPI.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/expertplane
ENV PATH=/opt/expertplane/bin:$PATH
RUN pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"
COPY . /src
RUN pip install "/src[postgres]"
# Compile the planner now (numba cache) so that no pod compiles it on its first plan. Generic
# x86-64 code: the cache is keyed by the CPU model, and the image runs on other machines.
ENV NUMBA_CPU_NAME=generic
RUN NUMBA_CACHE_DIR=/opt/expertplane/numba-cache expertplane warm

FROM ${PYTHON_IMAGE}
RUN useradd --create-home --uid 10001 --user-group expertplane
COPY --from=build /opt/expertplane /opt/expertplane
# The pods run with a read-only root filesystem and an emptyDir on /tmp: numba's compile cache
# and matplotlib's config go there. Every expertplane command first copies the cache warmed at
# build time (EXPERTPLANE_NUMBA_CACHE_SEED) into it (numba_cache.py).
ENV PATH=/opt/expertplane/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    NUMBA_CPU_NAME=generic \
    EXPERTPLANE_NUMBA_CACHE_SEED=/opt/expertplane/numba-cache \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
WORKDIR /home/expertplane
ENTRYPOINT ["expertplane"]
CMD ["--help"]
