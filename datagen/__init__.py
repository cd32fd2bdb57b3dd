"""The datagen half: the sample contract (``schema``), camera math, sources, stages, model
wrappers and the shard format. ``pipelines`` composes these into DAGs; training reads only
``schema``, ``shards`` and ``cameras``."""
