# MLflow tracking server image for infra/k8s/mlflow.yaml: mlflow 3.17.2 with the
# PostgreSQL driver (backend store) and boto3 (artifacts in MinIO/S3), run as an
# unprivileged user. infra/k8s/buckets-job.yaml also uses it for its boto3 one-off.
#
#   docker build -f infra/docker/mlflow.Dockerfile -t vlforge-mlflow:3.17.2 infra/docker
#   docker run --rm -p 127.0.0.1:5000:5000 vlforge-mlflow:3.17.2 \
#     mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri sqlite:////tmp/mlflow.db
#
# The build needs no context files; credentials and URIs come from the environment.
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false

RUN python -m pip install mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.43.117 \
 && useradd --create-home --uid 1000 --shell /usr/sbin/nologin mlflow

USER 1000
WORKDIR /home/mlflow
EXPOSE 5000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]

CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
