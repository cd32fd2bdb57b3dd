"""Random builds of every labeler's model, one module per model: tiny ones for ``weights:
random-tiny``, the tests and the demo (seeded, so every build of a tiny model is the same
bytes), and real architectures with random weights for benches. Their labels are
MEANINGLESS: they exist so the mechanics run anywhere without weights.

The wrappers (``datagen.stages.models.<model>``) import a builder here only where
``random-tiny`` is asked for; nothing here imports a wrapper.
"""
