"""What every stage shares: the params schema, paths, atomic files, the runtime and the on-disk dataset.

Nothing here imports torch or scikit-learn at module level, so loading params stays cheap.
"""
