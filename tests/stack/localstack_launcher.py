"""Run LocalStack's runtime with its S3 object store moved into a folder of our own.

Run by s3.S3Server with LocalStack's Python (3.13), not imported by the tests:
    .venv-localstack/bin/python -P tests/stack/localstack_launcher.py S3_STORE_DIR
LocalStack keeps object bodies in `DEFAULT_S3_TMP_DIR` (a fixed /tmp folder shared by every
instance) whatever FILESYSTEM_ROOT says; the provider reads it when the service starts.
"""

import sys


def main() -> None:
    """Point the S3 object store at argv[1], then run LocalStack's runtime as its main does."""
    from localstack.services.s3 import provider

    provider.DEFAULT_S3_TMP_DIR = sys.argv[1]
    from localstack.runtime.main import main as runtime_main

    runtime_main()


if __name__ == "__main__":
    main()
