# The streamer image: the package (its Avro schemas inside it) and the `streamer` command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies first, in their own layer: rebuilt when the lock changes, not on every code edit.
# requirements.lock pins the runtime closure and the build backend (`make lock` writes it; the
# venv of `make` installs the same pins), so the image runs the scikit-learn the model card names.
WORKDIR /src
COPY requirements.lock ./
RUN pip install -r requirements.lock

# Then the package itself, without dependencies: everything it needs is installed above, and the
# locked setuptools builds it (no build isolation: nothing is fetched at this step).
COPY pyproject.toml README.md ./
COPY streamer ./streamer
RUN pip install --no-deps --no-build-isolation . \
    && rm -rf /src/build /src/*.egg-info \
    && useradd --create-home --uid 10001 streamer \
    && mkdir -p /app/models && chown streamer /app/models

WORKDIR /app
USER streamer

ENTRYPOINT ["streamer"]
CMD ["run"]
