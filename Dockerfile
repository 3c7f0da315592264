# The streamer image: the package, its schemas and the `streamer` command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY streamer ./streamer
RUN pip install -e . && useradd --create-home --uid 10001 streamer \
    && mkdir -p /app/models && chown streamer /app/models
USER streamer

ENTRYPOINT ["streamer"]
CMD ["run"]
