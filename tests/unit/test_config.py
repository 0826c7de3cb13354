"""Configuration: the original variables keep their defaults; bad values stop start-up clearly."""

import pytest

from bloblo.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("BLOBLO_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BLOBLO_DOTENV", "0")


def test_defaults_of_the_original_variables():
    s = load_settings()
    assert (s.listen_host, s.listen_port) == ("", 7777)
    assert s.s3_bucket == "sample-bucket"
    assert s.upstream_url == "http://localhost:6666"
    assert s.preserve_host is False
    assert s.s3_endpoint_url is None
    assert s.presign_expires == 1200
    assert s.auth_cache_ttl == 0
    assert (s.cache_check_seconds, s.cache_refresh_seconds) == (30, 0)  # issue #8: expiry


def test_use_localstack_means_local_endpoint_region_and_test_credentials(monkeypatch):
    monkeypatch.setenv("BLOBLO_USE_LOCALSTACK", "true")
    s = load_settings()
    assert s.s3_endpoint_url == s.s3_public_endpoint_url == "http://localhost:4566"
    assert (s.s3_region, s.s3_access_key, s.s3_secret_key) == ("us-east-1", "test", "test")


def test_public_endpoint_and_prefix(monkeypatch):
    monkeypatch.setenv("BLOBLO_S3_ENDPOINT_URL", "http://minio.internal:9000")
    monkeypatch.setenv("BLOBLO_S3_PUBLIC_ENDPOINT_URL", "https://s3.example.com")
    monkeypatch.setenv("BLOBLO_S3_PREFIX", "/registry/cache/")
    s = load_settings()
    assert s.s3_endpoint_url == "http://minio.internal:9000"
    assert s.s3_public_endpoint_url == "https://s3.example.com"
    assert s.s3_prefix == "registry/cache/"


@pytest.mark.parametrize(
    ("addr", "expected"),
    [(":7777", ("", 7777)), ("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:9000", ("::1", 9000))],
)
def test_listen_addresses(monkeypatch, addr, expected):
    monkeypatch.setenv("BLOBLO_LISTEN_ADDR", addr)
    s = load_settings()
    assert (s.listen_host, s.listen_port) == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BLOBLO_LISTEN_ADDR", "7777"),
        ("BLOBLO_LISTEN_ADDR", ":99999"),
        ("BLOBLO_PRESERVE_HOST", "maybe"),
        ("BLOBLO_UPSTREAM_URL", "localhost:6666"),
        ("BLOBLO_S3_BUCKET_NAME", "Bad_Bucket"),
        ("BLOBLO_PRESIGN_EXPIRES", "864000"),
        ("BLOBLO_AUTH_CACHE_TTL", "3600"),
        ("BLOBLO_STREAM_NETWORKS", "10.0.0.0/33"),
        ("BLOBLO_STREAM_USER_AGENTS", "(unclosed"),
        ("BLOBLO_WORKERS", "0"),
        ("BLOBLO_CACHE_CHECK_SECONDS", "61"),
        ("BLOBLO_CACHE_REFRESH_SECONDS", "-1"),
        ("BLOBLO_UPLOAD_HOLD_SECONDS", "601"),
        ("BLOBLO_UPLOAD_HOLD_SECONDS", "soon"),
        ("BLOBLO_S3_BACKOFF_SECONDS", "0"),
        ("BLOBLO_S3_BACKOFF_SECONDS", "601"),
    ],
)
def test_an_invalid_value_names_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


def test_dotenv_file_is_read_and_the_environment_wins(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("BLOBLO_S3_BUCKET_NAME=from-dotenv\nBLOBLO_WORKERS=3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BLOBLO_DOTENV", "1")
    monkeypatch.setenv("BLOBLO_WORKERS", "5")
    s = load_settings()
    assert (s.s3_bucket, s.workers) == ("from-dotenv", 5)


def test_the_upload_hold_defaults_to_ten_seconds_and_zero_turns_it_off(monkeypatch):
    assert load_settings().upload_hold_seconds == 10.0
    monkeypatch.setenv("BLOBLO_UPLOAD_HOLD_SECONDS", "0")
    assert load_settings().upload_hold_seconds == 0.0


def test_the_s3_backoff_defaults_to_ten_seconds(monkeypatch):
    assert load_settings().s3_backoff_seconds == 10.0
    monkeypatch.setenv("BLOBLO_S3_BACKOFF_SECONDS", "1")
    assert load_settings().s3_backoff_seconds == 1.0
