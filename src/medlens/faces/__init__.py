"""Faces: detection, alignment, dlib embeddings, and heads and galleries over them.

``detect`` finds the largest face, its 68 landmarks and the aligned chip; ``embed`` turns chips into dlib's
128-d descriptors, cached per image; ``heads`` (SVM, logistic, MLP) and ``gallery`` (nearest neighbours,
classes added without training) classify them; ``occlusion`` explains any head; ``pipeline`` trains,
checkpoints and predicts (``FacePredictor``); ``cli`` adds ``medlens faces``. dlib and its models load
lazily (``dlib_models``), from the 'faces' extra: pip install 'medlens[faces]'.
"""
