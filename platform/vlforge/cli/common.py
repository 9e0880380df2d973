"""What the ``vlforge`` commands share: the S3 storage settings of ``--s3-endpoint``.

from vlforge.cli.common import storage_config
list_shards(args.uri, storage_config(args))
"""

from __future__ import annotations

from vlforge import config as C


def storage_config(args) -> C.StorageConfig:
    return C.StorageConfig(s3_endpoint_url=getattr(args, "s3_endpoint", None))
