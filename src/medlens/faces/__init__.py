"""Faces: detection, alignment, dlib embeddings, and galleries over them.

``detect`` finds the largest face, its 68 landmarks and the aligned chip; ``embed`` turns chips into dlib's
128-d descriptors, cached per image, and is the ``dlib_face`` embedder of probes (:mod:`medlens.models.embedders`);
``gallery`` ranks classes by nearest neighbours (classes added without training); ``align`` writes aligned
chips for the CNN route. dlib and its models load lazily (``dlib_models``), from
the 'faces' extra: pip install 'medlens[faces]'.
"""
