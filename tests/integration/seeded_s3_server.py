"""An S3-compatible server (moto) that comes up already holding a directory's files.

moto keeps objects in memory, so a restarted moto server is empty. This script loads the
files first (into moto's in-process backend) and only then binds the port, which is what a
restarted server with durable storage looks like to its clients: connection refused while
it is down, then the same objects. Used by the fault-injection tests:

    python tests/integration/seeded_s3_server.py --port 9000 --bucket b --prefix corpus/scenes --src data/corpus/scenes

Requests are logged to stderr one line each (werkzeug's access log).
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bucket", required=True)
    p.add_argument("--prefix", default="", help="key prefix of the uploaded files")
    p.add_argument("--src", required=True, help="directory whose files are served")
    args = p.parse_args(argv)

    import boto3
    from moto import mock_aws
    from moto.server import ThreadedMotoServer

    mock = mock_aws()
    mock.start()  # kept on: the server thread serves this process's in-memory backend
    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="seed", aws_secret_access_key="seed")
    client.create_bucket(Bucket=args.bucket)
    src = Path(args.src)
    files = sorted(f for f in src.rglob("*") if f.is_file())
    for f in files:
        key = "/".join(x for x in (args.prefix.strip("/"), f.relative_to(src).as_posix()) if x)
        client.put_object(Bucket=args.bucket, Key=key, Body=f.read_bytes())
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=args.port)
    server.start()
    print(
        f"seeded {len(files)} objects into s3://{args.bucket}/{args.prefix}; serving on 127.0.0.1:{args.port}",
        flush=True,
    )
    threading.Event().wait()


if __name__ == "__main__":
    main()
