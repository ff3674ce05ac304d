# The service image: the same scripts/setup.sh that CI runs installs the dependencies.
# CPU by default; the torch wheel is a CUDA build, so the same image uses a GPU when compose grants one.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VLS_VENV=/opt/venv \
    VLS_EXTRAS="" \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLS_DATA_DIR=/data \
    VLS_WEIGHTS_DIR=/app/weights

WORKDIR /app
COPY pyproject.toml ./
COPY scripts/setup.sh scripts/setup.sh
RUN bash scripts/setup.sh

COPY service ./service
COPY models ./models
COPY training ./training
COPY weights ./weights
RUN useradd --create-home --uid 10001 vls && mkdir -p /data && chown vls /data
USER 10001

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["/opt/venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["/opt/venv/bin/uvicorn", "service.app:app", "--host", "0.0.0.0", "--port", "8000"]
