#!/bin/sh
# LocalStack ready hook (see docker-compose.yml): create bloblo's bucket, and make S3 abort
# multipart uploads left incomplete for a day (an interrupted blob upload leaves parts behind).
set -eu

bucket="${BLOBLO_S3_BUCKET_NAME:-sample-bucket}"

s3api() {
    if command -v awslocal >/dev/null 2>&1; then
        awslocal s3api "$@"
    else
        aws --endpoint-url "${AWS_ENDPOINT_URL:-http://localhost:4566}" s3api "$@"
    fi
}

s3api head-bucket --bucket "$bucket" >/dev/null 2>&1 || s3api create-bucket --bucket "$bucket"
s3api put-bucket-lifecycle-configuration --bucket "$bucket" --lifecycle-configuration '{
  "Rules": [{
    "ID": "abort-incomplete-multipart-uploads",
    "Status": "Enabled",
    "Filter": {"Prefix": ""},
    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}
  }]
}'
echo "bloblo: bucket $bucket ready"
