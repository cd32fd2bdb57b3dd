"""The ``onegen`` command line and cluster jobs: datagen jobs on Ray, fits under torchrun."""
