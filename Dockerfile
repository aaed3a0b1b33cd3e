# One image for the API, the fitting worker and the Ray nodes (see docker-compose.yml).
# CPU torch by default; for GPU nodes build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY hyperlaw ./hyperlaw
COPY client ./client
COPY server ./server
COPY fitting ./fitting
COPY trainer ./trainer
COPY migrations ./migrations
RUN pip install --no-cache-dir torch==2.13.0 --index-url "$TORCH_INDEX" \
    && DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation "deepspeed>=0.15,<0.20" \
    && pip install --no-cache-dir ".[all]"
EXPOSE 8000 8265
CMD ["hyperlaw", "serve", "--host", "0.0.0.0"]
