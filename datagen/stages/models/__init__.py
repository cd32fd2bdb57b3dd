"""The labelers' model wrappers, one per model, apart from the stages that batch rows through
them: each loads offline from a local path (``common``: the load checks; ``offline``: no hub),
or builds a random-tiny model for tests and the demo (``tiny/``)."""
