"""The `s3_server` fixture is a real S3 server: s3fs writes, reads and lists through it, and it
refuses a wrong secret, an unknown access key and a bucket that was never made, with the
errors AWS gives (tests/s3_server.py: versitygw, built by `make cluster-tools`)."""

from __future__ import annotations

import pytest
from s3_server import S3Server


def s3_code(error: BaseException) -> str:
    """The S3 error code behind an s3fs exception (s3fs keeps botocore's error as the cause)."""
    return error.__cause__.response["Error"]["Code"]  # type: ignore[union-attr]


def test_an_object_written_is_read_back_and_listed_under_its_prefix(s3_server: S3Server) -> None:
    bucket = s3_server.make_bucket("roundtrip")
    fs = s3_server.filesystem()
    fs.pipe(f"{bucket}/run-1/checkpoint-2/model.bin", b"\x00weights\xff")
    fs.pipe(f"{bucket}/run-1/metrics.json", b'{"step": 2}')
    fs.pipe(f"{bucket}/run-2/metrics.json", b'{"step": 9}')

    assert fs.cat(f"{bucket}/run-1/checkpoint-2/model.bin") == b"\x00weights\xff"
    # A second client with nothing cached sees what the first wrote: it is on the server.
    fresh = s3_server.filesystem()
    assert sorted(fresh.ls(f"{bucket}/run-1", detail=False)) == [
        "roundtrip/run-1/checkpoint-2",
        "roundtrip/run-1/metrics.json",
    ]
    assert fresh.find(f"{bucket}/run-1") == [
        "roundtrip/run-1/checkpoint-2/model.bin",
        "roundtrip/run-1/metrics.json",
    ]
    # The posix backend keeps the object as a file under the server's data folder.
    assert (s3_server.data / "roundtrip/run-2/metrics.json").read_bytes() == b'{"step": 9}'


@pytest.mark.parametrize(
    ("credentials", "code"),
    [
        ({"secret": "not-the-secret"}, "SignatureDoesNotMatch"),
        ({"key": "nobody"}, "InvalidAccessKeyId"),
    ],
)
def test_wrong_credentials_are_refused(
    s3_server: S3Server, credentials: dict[str, str], code: str
) -> None:
    bucket = s3_server.make_bucket(f"guarded-{code.lower()}")
    s3_server.filesystem().pipe(f"{bucket}/kept.txt", b"kept")
    intruder = s3_server.filesystem(**credentials)

    # A listing and a write, which carry S3's error body (a HEAD's refusal is a bare 403).
    with pytest.raises(PermissionError) as listing:
        intruder.ls(bucket)
    assert s3_code(listing.value) == code, listing.value
    with pytest.raises(PermissionError) as write:
        intruder.pipe(f"{bucket}/planted.txt", b"planted")
    assert s3_code(write.value) == code, write.value
    with pytest.raises(PermissionError):
        intruder.cat(f"{bucket}/kept.txt")
    assert not (s3_server.data / bucket.removeprefix("s3://") / "planted.txt").exists()
    assert s3_server.filesystem().cat(f"{bucket}/kept.txt") == b"kept"


def test_a_bucket_never_made_is_refused(s3_server: S3Server) -> None:
    fs = s3_server.filesystem()
    with pytest.raises(FileNotFoundError) as write:
        fs.pipe("never-made/output/metrics.json", b"{}")
    assert s3_code(write.value) == "NoSuchBucket", write.value
    with pytest.raises(FileNotFoundError) as read:
        fs.cat("never-made/output/metrics.json")
    assert s3_code(read.value) == "NoSuchBucket", read.value
    assert not (s3_server.data / "never-made").exists()
