"""Side-by-side benchmarks of converted B-cos models against their original Hugging Face models.

Run ``python -m benchmarks.run`` (``--quick`` for tiny models and a few iterations); see ``run.py``.
"""
