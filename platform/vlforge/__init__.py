"""vlforge: pretrain and distil vision-language models on Ray.

Layout (see README.md for the annotated tree): ``config`` (typed configs),
``data`` (shards, corpus, Ray Data pipelines), ``models``, ``objectives``,
``train``, ``tune``, ``tracking``, ``evaluation``, ``cli``.
"""

__version__ = "0.1.0"
