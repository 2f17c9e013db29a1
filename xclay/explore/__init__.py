"""What users do with embeddings once they have them: find similar places
(``search``), look at cubes and embeddings (``viz``), and measure what the vectors
know with linear probes (``probe``).

Modules: ``search`` and ``probe`` import only the layers below (outputs, datacube);
``viz`` may use ``search`` (similarity maps). Nothing below imports this package.
"""

from xclay.explore.search import SimilarityIndex, similar

__all__ = ["SimilarityIndex", "similar"]
