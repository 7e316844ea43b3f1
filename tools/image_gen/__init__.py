"""IG's embedded backend: a procedural engine that draws defects described in the shared vocabulary.

Modules: `engine` (the `ProceduralEngine` that parses, places and composes), `placement` (position words
to areas, sizes to pixels), `shapes` (irregular outlines and paths as distance fields), `blending`
(texture-keeping colour changes) and one module per defect family (`line`, `blob`, `hole`, `missing`,
`deformation`, `texture`).
"""

from tools.image_gen.engine import FALLBACKS, RENDERERS, ProceduralEngine

__all__ = ["ProceduralEngine", "RENDERERS", "FALLBACKS"]
