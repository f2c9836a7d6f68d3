"""The object store, through boto3: credentials, endpoint, region and retries come from
the standard AWS environment variables and config files (AWS_ENDPOINT_URL, AWS_PROFILE,
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/config), as every S3 tool reads them.

Why boto3 (docs/design.md, "S3 client"): against obstore on the same server it moved
4 MiB objects as fast (the server is the limit: ~160-190 MiB/s up, 0.8-1.1 GiB/s down,
8 threads), and it is the library that reads the AWS config files and profiles users
already have; obstore reads the environment only. Its import (~0.2 s) is paid only by
the commands that reach a bucket.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from torpor.errors import InvalidArgument, NotFound, OperationFailed, TorporError

# Errors S3 answers that mean the request itself cannot succeed as given.
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"}


class Truncated(Exception):
    """A listing stopped at its page limit."""


class NoSuchObject(NotFound):
    """The bucket is there; the object is not."""


class ObjectStore:
    """One bucket. Thread-safe: boto3's clients may be shared between threads."""

    def __init__(self, bucket: str, *, connections: int = 16) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        # Retries as the AWS variables say (AWS_RETRY_MODE, AWS_MAX_ATTEMPTS); by default
        # the standard mode's 3 attempts with backoff.
        retries: dict[str, Any] = {"mode": os.environ.get("AWS_RETRY_MODE", "standard")}
        if os.environ.get("AWS_MAX_ATTEMPTS", "").isdigit():
            retries["total_max_attempts"] = int(os.environ["AWS_MAX_ATTEMPTS"])
        # Chunks carry their own hashes, checked on the way down: no CRC32 pass of every
        # body on top (botocore's default since 1.36), only where S3 requires one.
        config = Config(max_pool_connections=connections, retries=retries,
                        connect_timeout=10, read_timeout=60,
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required")
        try:
            self._client: Any = boto3.session.Session().client("s3", config=config)
        except Exception as exc:  # a malformed profile or config file
            raise InvalidArgument(f"S3 configuration: {exc}") from None

    def exists(self, key: str) -> bool:
        try:
            self._call("head_object", Key=key)
        except NoSuchObject:
            return False
        return True

    def put(self, key: str, body: bytes) -> None:
        self._call("put_object", Key=key, Body=body)

    def get(self, key: str) -> bytes:
        response = self._call("get_object", Key=key)
        try:
            data: bytes = response["Body"].read()
        except Exception as exc:
            raise OperationFailed(f"S3: reading {key}: {exc}") from None
        return data

    def keys(self, prefix: str, max_pages: int | None = None) -> Iterator[str]:
        """Every key under `prefix`; with `max_pages`, Truncated is raised once that many
        pages (1000 keys each) did not hold them all."""
        for key, _ in self.listing(prefix, max_pages):
            yield key

    def listing(self, prefix: str, max_pages: int | None = None
                ) -> Iterator[tuple[str, datetime]]:
        """`keys`, each with its LastModified (the server's clock)."""
        token: dict[str, str] = {}
        pages = 0
        while True:
            page = self._call("list_objects_v2", Prefix=prefix, **token)
            pages += 1
            for item in page.get("Contents", []):
                yield item["Key"], item["LastModified"]
            if not page.get("IsTruncated"):
                return
            if max_pages is not None and pages >= max_pages:
                raise Truncated(prefix)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            answer = self._call("delete_objects", Delete={"Objects": batch, "Quiet": True})
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise OperationFailed(f"S3: deleting {first.get('Key')}: {first.get('Message')}")

    def _call(self, operation: str, **params: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return getattr(self._client, operation)(Bucket=self.bucket, **params)
        except NoCredentialsError:  # the host's configuration, not the request
            raise OperationFailed("no S3 credentials: set AWS_ACCESS_KEY_ID and"
                                  " AWS_SECRET_ACCESS_KEY, or AWS_PROFILE") from None
        except ClientError as exc:
            raise _client_error(self.bucket, params.get("Key"), exc) from None
        except BotoCoreError as exc:  # the endpoint unreachable, a timeout, a bad URL
            raise OperationFailed(f"S3: {exc}") from None


def _client_error(bucket: str, key: str | None, exc: Any) -> TorporError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code == "NoSuchBucket":
        return NotFound(f"S3 bucket {bucket!r} does not exist")
    if code in ("NoSuchKey", "404", "NotFound") or status == 404:
        return NoSuchObject(f"s3://{bucket}/{key}: no such object")
    if code in _DENIED or status == 403:
        return OperationFailed(f"S3 refused access to bucket {bucket!r} ({code or status}):"
                               " check the credentials")
    return OperationFailed(f"S3: {code or status}: {error.get('Message', exc)}")
