"""lmflow-ray: LMFlow's fine-tuning recipes as a Ray-native cluster service.

Data flows one way through the package: config -> storage -> data -> model -> train -> serve / eval,
with cli on top. A module imports only from upstream of it (tests/test_layering.py checks).
"""

__version__ = "0.1.0"
