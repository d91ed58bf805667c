# CPU pipeline worker: OpenSlide (from the openslide-bin wheel), tiffslide, the cytosyn package.
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t cytosyn-worker .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DO_NOT_TRACK=1
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/cytosyn
COPY pyproject.toml README.md ./
COPY cytosyn ./cytosyn
RUN pip install .
ENTRYPOINT ["cytosyn"]
