"""The one place where Lethe creates boto3 clients, so AWS, MinIO and LocalStack all serve.

Endpoint: `LETHE_AWS_ENDPOINT_URL` when set. Otherwise boto3 reads `AWS_ENDPOINT_URL`
and the per-service `AWS_ENDPOINT_URL_S3` and `AWS_ENDPOINT_URL_SQS` itself (checked with
boto3 1.44.8; the AWS SDKs and Tools guide calls this "service-specific endpoints").
Without either, the AWS endpoint of the region serves. Region: `AWS_DEFAULT_REGION`, else the
region of the AWS config file, else us-east-1.
"""

from __future__ import annotations

import os
from typing import Any

ENDPOINT_OVERRIDE_VARIABLE = "LETHE_AWS_ENDPOINT_URL"
DEFAULT_REGION = "us-east-1"


def endpoint_override() -> str | None:
    return os.environ.get(ENDPOINT_OVERRIDE_VARIABLE) or None


def client(service: str) -> Any:
    """Create a boto3 client for `service` ("s3" or "sqs") with Lethe's endpoint and region."""
    import boto3

    session = boto3.session.Session()
    region = session.region_name or DEFAULT_REGION
    return session.client(service, region_name=region, endpoint_url=endpoint_override())
