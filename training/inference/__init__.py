"""Generating with a trained model: the sampler loop (``generate``), ``onegen sample``
(``sample``, ``multiview``), the labelled grids the fit logs (``grid``) and image files."""
