"""Datagen DAGs: the YAML files, their one typed form (``dag.Dag``) and the builder that runs
them through Ray Data into shards."""
